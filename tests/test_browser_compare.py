"""The Compare page in headless Chromium with SmolLM2: a real comparison, then a cancelled one.

Server and Chromium helpers: ``browser_util.py``. Screenshots are
saved for a person to look at (``/tmp/compare_page.png`` and
``/tmp/compare_cancelled.png`` as well as the test's tmp folder).
"""

from __future__ import annotations

import re

import pytest

from browser_util import browser_page, save_screenshot, serve_app, set_number, skip_unless_ready

RUN_TIMEOUT_MS = 600_000  # a shared 2-core machine under load can take minutes for a few SmolLM2 decodes
PAGE_TIMEOUT_MS = 180_000  # ... and a minute to draw a page

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, log path) of the app on a free loopback port, shared by this file's tests; stopped by process id."""
    skip_unless_ready()
    log_path = tmp_path_factory.mktemp("compare_app") / "streamlit.log"
    with serve_app(log_path) as url:
        yield url, log_path


@pytest.fixture
def page(served):
    from playwright.sync_api import sync_playwright

    url, _ = served
    viewport = {"width": 1500, "height": 3000}
    with sync_playwright() as playwright, browser_page(playwright, f"{url}/compare", viewport, PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Compare drafters").wait_for()
        page.get_by_role("button", name="Run comparison").wait_for()
        yield page


def test_compare_page_after_a_real_run(page, served, tmp_path):
    # one prompt (code editing), prompt lookup and layer skip at K = 2 and 4: 5 decodes of 16 tokens
    page.get_by_role("button", name="Remove creative_writing").click()
    page.wait_for_timeout(500)
    # every chip keeps its text visible (a lone short chip's label was squeezed to 0 px by the wrap CSS)
    labels = page.locator("[data-testid=stMultiSelectTagsContainer] [data-tag] > span[title]")
    assert labels.count() >= 4 and all(labels.nth(i).bounding_box()["width"] > 4 for i in range(labels.count()))
    set_number(page, "Max new tokens", 16)
    page.get_by_text("5 decodes").wait_for()

    page.get_by_role("button", name="Run comparison").click()
    page.get_by_text("Complete: 5 runs on 1 prompt ").wait_for(timeout=RUN_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)  # script done

    page.get_by_role("heading", name="Per drafter and K").wait_for()
    page.get_by_text("All columns").wait_for()  # the compact table first, every column behind this expander
    page.get_by_role("heading", name="What each drafter costs").wait_for()
    charts = page.locator('[data-testid="stPlotlyChart"]')
    charts.first.locator(".main-svg").first.wait_for()  # plotly draws after the element arrives
    charts.nth(3).wait_for()  # the page draws its charts one after another: wait for the fourth, then count
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
