"""The Batch page in headless Chromium with SmolLM2: a sweep cancelled while it runs keeps what finished.

In the browser a Cancel click cancels the sweep's job (``app.background``) and
reruns the page at once, which follows the job to its end: a path AppTest
cannot take. Server and Chromium
helpers: ``browser_util.py``. The screenshot is saved for a person to look at
(``/tmp/batch_cancelled.png`` as well as the test's tmp folder).
"""

from __future__ import annotations

import re

import pytest

from browser_util import browser_page, save_screenshot, serve_app, set_number, skip_unless_ready

RUN_TIMEOUT_MS = 600_000  # a shared 2-core machine under load: warm-up and calibration can take minutes
PAGE_TIMEOUT_MS = 180_000

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


def test_cancel_keeps_the_batch_sizes_that_finished(tmp_path):
    skip_unless_ready()
    from playwright.sync_api import sync_playwright

    viewport = {"width": 1500, "height": 2400}
    with serve_app(tmp_path / "streamlit.log") as url, sync_playwright() as playwright, \
            browser_page(playwright, f"{url}/batch", viewport, PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Speculation against batch size").wait_for()
        set_number(page, "Max new tokens", 16)
        page.get_by_role("button", name="Run sweep").click()
        # batch size 1 has finished and batch size 2 (2 prompts: one batch) runs, of the 4 planned sizes
        page.get_by_text(re.compile(r"^batch size 2: batch")).wait_for(timeout=RUN_TIMEOUT_MS)
        page.get_by_role("button", name="Cancel").click()

        partial = page.get_by_text(re.compile(r"^Cancelled: a partial sweep\. Batch sizes? [\d, ]+ of 1, 2, 4, 8 finished"))
        partial.wait_for(timeout=RUN_TIMEOUT_MS)
        page.get_by_role("button", name="Stop").wait_for(state="detached", timeout=RUN_TIMEOUT_MS)  # script done
        page.wait_for_timeout(2000)
        assert "Batch sizes 1, 2 of" in partial.inner_text() or "Batch size 1 of" in partial.inner_text()
        assert page.get_by_text(re.compile(r"^batch size \d+: batch")).count() == 0  # the sweep did not go on
        assert page.get_by_role("button", name="Cancel").count() == 0
        assert page.get_by_text(re.compile(r"^Swept batch sizes")).count() == 0  # labelled partial, not complete
        assert page.locator("[data-testid=stPlotlyChart]").count() >= 4  # the finished batch sizes are drawn
        assert page.get_by_role("button", name="Download JSON").count() == 1  # and exportable
        assert page.get_by_role("button", name="Run sweep").is_enabled()
        save_screenshot(page, tmp_path, "batch_cancelled.png")
    assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
