"""The real app in headless Chromium: SmolLM2 + prompt lookup, Run, coloured tokens appear.

Starts ``streamlit run app/main.py`` on loopback, drives it with playwright's sync
API and Debian's /usr/bin/chromium (see /work/shared/BROWSER.md: never
``playwright install``), and saves a screenshot for a person to look at
(``/tmp/live_page.png`` as well as the test's tmp folder). Server and browser
helpers: ``browser_util.py``.
"""

from __future__ import annotations

import pytest

from browser_util import browser_page, choose, save_screenshot, serve_app, set_number, skip_unless_ready

RUN_TIMEOUT_MS = 240_000

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


@pytest.fixture
def app_url(tmp_path):
    """The app served on a free loopback port; stopped (by its process id) at the end."""
    skip_unless_ready()
    with serve_app(tmp_path / "streamlit.log") as url:
        yield url


def test_live_page_streams_coloured_tokens(app_url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, browser_page(playwright, app_url, {"width": 1400, "height": 2200}) as page:
        page.get_by_role("heading", name="Speculative Decoding Lab").wait_for(timeout=60_000)

        page.locator(".tok-legend .tok-accepted").wait_for()
        choose(page, "Target", "SmolLM2-135M-Instruct")
        choose(page, "Drafter", "draft-model (a smaller model)")  # no preset shares SmolLM2's tokenizer: said, not offered
        page.get_by_text("No draft model shares the tokenizer of SmolLM2-135M-Instruct").wait_for()
        assert page.get_by_role("combobox", name="Draft model", exact=True).count() == 0
        choose(page, "Drafter", "prompt-lookup (n-grams)")
        set_number(page, "Max new tokens", 32)

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
        save_screenshot(page, tmp_path, "live_page.png")
    assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
