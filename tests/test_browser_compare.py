"""The Compare page in headless Chromium with SmolLM2: a real comparison, then a cancelled one.

Reuses the server and Chromium helpers of ``test_browser.py``. Screenshots are
saved for a person to look at (``/tmp/compare_page.png`` and
``/tmp/compare_cancelled.png`` as well as the test's tmp folder).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_browser import CHROMIUM, CHROMIUM_ARGS, ROOT, SERVER_START_S, free_port, wait_healthy

RUN_TIMEOUT_MS = 600_000  # a shared 2-core machine under load can take minutes for a few SmolLM2 decodes
PAGE_TIMEOUT_MS = 180_000  # ... and a minute to draw a page
SCREENSHOT_COPIES = {"compare_page.png": Path("/tmp/compare_page.png"),
                     "compare_cancelled.png": Path("/tmp/compare_cancelled.png")}

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, log path) of the app on a free loopback port, shared by this file's tests; stopped by process id."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (see BROWSER.md)")
    from lab.models import is_prepared

    if not is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (run scripts/setup.sh test)")
    pytest.importorskip("playwright.sync_api")
    log_path = tmp_path_factory.mktemp("compare_app") / "streamlit.log"
    port = free_port()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "main.py"),
             "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1",
             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server, SERVER_START_S)
            yield url, log_path
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 3000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{url}/compare")
            page.get_by_role("heading", name="Compare drafters").wait_for()
            page.get_by_role("button", name="Run comparison").wait_for()
            yield page
        finally:
            browser.close()


def set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(500)  # let the rerun for the new value land before the next click


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    screenshot = tmp_path / name
    page.screenshot(path=str(screenshot))  # Streamlit scrolls inside the page: a tall viewport shows it all
    shutil.copyfile(screenshot, SCREENSHOT_COPIES[name])
    assert screenshot.stat().st_size > 10_000
    return screenshot


def test_compare_page_after_a_real_run(page, served, tmp_path):
    # one prompt (code editing), prompt lookup and layer skip at K = 2 and 4: 5 decodes of 16 tokens
    page.get_by_role("button", name="Remove creative_writing").click()
    page.wait_for_timeout(500)
    set_number(page, "Max new tokens", 16)
    page.get_by_text("5 decodes").wait_for()

    page.get_by_role("button", name="Run comparison").click()
    page.get_by_text("Complete: 5 runs on 1 prompt ").wait_for(timeout=RUN_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)  # script done

    page.get_by_role("heading", name="Per drafter and K").wait_for()
    page.get_by_role("heading", name="What each drafter costs").wait_for()
    charts = page.locator('[data-testid="stPlotlyChart"]')
    charts.first.locator(".main-svg").first.wait_for()  # plotly draws after the element arrives
    assert charts.count() >= 4  # acceptance curves, speedup, against K, timeline
    assert page.get_by_role("button", name="Download JSON").count() == 1
    save_screenshot(page, tmp_path, "compare_page.png")
    assert "Traceback" not in served[1].read_text()


def test_cancel_keeps_the_finished_runs(page, served, tmp_path):
    # 6 prompts x (target alone + 2 drafters x 2 K) = 30 decodes, far more than run before the Cancel click lands
    set_number(page, "Prompts per set", 3)
    set_number(page, "Max new tokens", 16)
    page.get_by_text("30 decodes").wait_for()
    page.get_by_role("button", name="Run comparison").click()
    page.get_by_text(re.compile(r"^([2-9]|1\d)/30 runs")).wait_for(timeout=RUN_TIMEOUT_MS)  # two or more finished
    page.get_by_role("button", name="Cancel").click()

    page.get_by_text("Cancelled after").wait_for(timeout=RUN_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)
    page.wait_for_timeout(2000)
    assert page.get_by_text(re.compile(r"^\d+/30 runs")).count() == 0  # the comparison did not start again
    assert page.get_by_role("button", name="Cancel").count() == 0
    page.get_by_role("heading", name="Per drafter and K").wait_for()  # the runs that finished are shown
    save_screenshot(page, tmp_path, "compare_cancelled.png")
    assert "Traceback" not in served[1].read_text()
