"""What the browser tests share: the real app served on loopback, and Debian's Chromium driven by playwright.

See /work/shared/BROWSER.md: never ``playwright install``; launch
/usr/bin/chromium with ``CHROMIUM_ARGS``. ``serve_app`` starts
``streamlit run app/main.py`` on a free loopback port, waits for its health
check and stops it by its process id at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
SERVER_START_S = 60


def skip_unless_ready() -> None:
    """Skip the test without Chromium, the prepared SmolLM2 or playwright."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (see BROWSER.md)")
    from lab.models import is_prepared

    if not is_prepared("smollm2-135m"):
        pytest.skip("smollm2-135m is not prepared (run scripts/setup.sh test)")
    pytest.importorskip("playwright.sync_api")


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


@contextmanager
def serve_app(log_path: Path) -> Iterator[str]:
    """The app's URL while it is served on a free loopback port, its output in ``log_path``."""
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
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@contextmanager
def browser_page(playwright, url: str, viewport: dict, timeout_ms: float | None = None):
    """A Chromium page at ``url``; the browser closes at the end."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport=viewport)
        if timeout_ms is not None:
            page.set_default_timeout(timeout_ms)
        page.goto(url)
        yield page
    finally:
        browser.close()


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the Streamlit selectbox labelled ``label`` (a combobox with a listbox)."""
    combobox = page.get_by_role("combobox", name=label, exact=True)  # "Target" must not match "Target precision"
    combobox.click()
    page.get_by_role("option", name=option, exact=True).click()
    page.wait_for_timeout(300)  # the rerun that reads the new value
    assert combobox.input_value() == option


def set_number(page, label: str, value: int) -> None:
    """Type ``value`` into the number input labelled ``label`` and let the rerun for it land."""
    box = page.get_by_label(label)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(500)  # let the rerun for the new value land before the next click


def save_screenshot(page, folder: Path, name: str) -> Path:
    """A screenshot in ``folder`` and a copy in /tmp, for a person to look at."""
    screenshot = folder / name
    page.screenshot(path=str(screenshot))  # Streamlit scrolls inside the page: a tall viewport shows it all
    shutil.copyfile(screenshot, Path("/tmp") / name)
    assert screenshot.stat().st_size > 10_000
    return screenshot
