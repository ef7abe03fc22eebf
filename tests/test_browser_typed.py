"""A number typed into a number input without Enter is the number the run uses (Live, Compare, Batch).

A trial in a real browser reported a typed, unconfirmed number ignored at Run.
In headless Chromium the typed value is committed when the field loses focus,
which the click on Run causes, so the run uses it; these tests keep it so, on
each page that has a Run button after number inputs. Each reads the value the
run used from the page itself ("max new tokens 7", "up to 4 new tokens", "K=2").
Server and Chromium helpers: ``browser_util.py``.
"""

from __future__ import annotations

import re

import pytest

from browser_util import browser_page, save_screenshot, serve_app, set_number, skip_unless_ready

RUN_TIMEOUT_MS = 600_000  # a shared 2-core machine under load
PAGE_TIMEOUT_MS = 180_000

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, log path) of the app on a free loopback port, shared by this file's tests; stopped by process id."""
    skip_unless_ready()
    log_path = tmp_path_factory.mktemp("typed_app") / "streamlit.log"
    with serve_app(log_path) as url:
        yield url, log_path
    assert "Traceback" not in log_path.read_text()


def type_without_enter(page, label: str, value: int) -> None:
    """Select the number input's text and type ``value`` as a person does, with no Enter and no Tab."""
    box = page.get_by_role("spinbutton", name=label)
    box.click()
    box.press("Control+a")
    page.keyboard.type(str(value))


def script_done(page) -> None:
    page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)


def test_live_uses_a_typed_max_new_tokens(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as playwright, browser_page(playwright, url, {"width": 1400, "height": 2200},
                                                       PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Speculative Decoding Lab").wait_for()
        page.get_by_text("Compare with the target alone").click()  # one decode: quicker
        page.wait_for_timeout(500)
        type_without_enter(page, "Max new tokens", 7)
        page.get_by_role("button", name="Run").click()
        used = page.get_by_text(re.compile(r"^Last run:"))
        used.wait_for(timeout=RUN_TIMEOUT_MS)
        script_done(page)
        assert "max new tokens 7 " in used.inner_text()
        assert re.search(r"· [1-7] tokens in \d+ target passes", page.locator("body").inner_text())
        save_screenshot(page, tmp_path, "live_typed.png")


def test_compare_uses_a_typed_max_new_tokens(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as playwright, browser_page(playwright, f"{url}/compare", {"width": 1400, "height": 2400},
                                                       PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Compare drafters").wait_for()
        type_without_enter(page, "Max new tokens", 4)
        page.get_by_role("button", name="Run comparison").click()
        done = page.get_by_text(re.compile(r"^Complete:"))
        done.wait_for(timeout=RUN_TIMEOUT_MS)
        assert "up to 4 new tokens" in done.inner_text()
        save_screenshot(page, tmp_path, "compare_typed.png")


def test_batch_uses_a_typed_k(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, _ = served
    with sync_playwright() as playwright, browser_page(playwright, f"{url}/batch", {"width": 1400, "height": 2400},
                                                       PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Speculation against batch size").wait_for()
        set_number(page, "Max new tokens", 4)
        type_without_enter(page, "K (draft tokens per step)", 2)
        page.get_by_role("button", name="Run sweep").click()
        done = page.get_by_text(re.compile(r"^Swept batch sizes"))
        done.wait_for(timeout=RUN_TIMEOUT_MS)
        assert "K=2 " in done.inner_text() and "up to 4 new tokens" in done.inner_text()
        save_screenshot(page, tmp_path, "batch_typed.png")
