"""The real app in headless Chromium: SmolLM2 + prompt lookup, Run, coloured tokens appear.

Starts ``streamlit run app/main.py`` on loopback, drives it with playwright's sync
API and Debian's /usr/bin/chromium (see /work/shared/BROWSER.md: never
``playwright install``), and saves a screenshot for a person to look at
(``/tmp/live_page.png`` as well as the test's tmp folder).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SCREENSHOT_COPY = Path("/tmp/live_page.png")
SERVER_START_S = 60
RUN_TIMEOUT_MS = 240_000

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"streamlit did not answer {url}/_stcore/health within {timeout_s} s")


@pytest.fixture
def app_url(tmp_path):
    """The app served on a free loopback port; stopped (by its process id) at the end."""
    port = free_port()
    log = open(tmp_path / "streamlit.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
         "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, SERVER_START_S)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label`` (a combobox with a listbox)."""
    combobox = page.get_by_role("combobox", name=label, exact=True)  # "Target" must not match "Target precision"
    combobox.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_timeout(300)  # the rerun that reads the new value
    assert combobox.input_value() == option


def test_live_page_streams_coloured_tokens(app_url, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (see BROWSER.md)")
    from lab.models import is_prepared

    if not is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (run scripts/setup.sh test)")
    sync_api = pytest.importorskip("playwright.sync_api")

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(app_url)
            page.get_by_role("heading", name="Speculative Decoding Lab").wait_for(timeout=60_000)

            page.locator(".tok-legend .tok-accepted").wait_for()
            choose(page, "Target", "SmolLM2-135M-Instruct (Q4_1)")
            choose(page, "Drafter", "prompt lookup (n-grams)")

            tokens_box = page.get_by_label("Max new tokens")
            tokens_box.fill("32")
            tokens_box.press("Enter")
            page.wait_for_timeout(500)  # let the rerun for the new value land before clicking

            page.get_by_role("button", name="Run").click()
            page.locator(".tok-stream .tok-accepted").first.wait_for(timeout=RUN_TIMEOUT_MS)
            # the run is over when the metric cards are drawn (after the target-alone comparison too)
            page.get_by_text("Speedup vs target alone").wait_for(timeout=RUN_TIMEOUT_MS)
            page.locator(".tok-stream .tok-caret").first.wait_for(state="detached", timeout=RUN_TIMEOUT_MS)
            page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)  # script done

            streams = page.locator(".tok-stream")
            assert streams.count() == 2  # speculative, and the target alone
            assert streams.nth(0).locator(".tok").count() > 0
            assert streams.nth(1).locator(".tok-target").count() > 0
            check = page.get_by_text("Identical to the target alone").or_(page.get_by_text("Differs from the target alone"))
            assert check.count() >= 1

            screenshot = tmp_path / "live_page.png"
            page.screenshot(path=str(screenshot))  # Streamlit scrolls inside the page: a tall viewport shows it all
            shutil.copyfile(screenshot, SCREENSHOT_COPY)
            assert screenshot.stat().st_size > 10_000
        finally:
            browser.close()
    assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
