"""A tab reloaded mid-sweep loses nothing: the finished batch sizes are in History, and the sweep when it ends.

In headless Chromium with SmolLM2: start a Batch sweep, wait until its first
batch size is kept in the results store (``lab.store``, the file this test
process shares with the server through ``LAB_RESULTS_DB``), reload the tab
(a new browser session: the old one's page is gone, its job goes on in the
server), open History and find the finished part(s) listed; then, once the sweep
has finished in the background, find it listed complete. History lists runs in
a data grid, read here through its CSV download (the same rows). Screenshots:
``/tmp/history_mid_sweep.png`` and ``/tmp/history_after_sweep.png``.
"""

from __future__ import annotations

import csv
import io
import time

import pytest

from browser_util import browser_page, save_screenshot, serve_app, set_number, skip_unless_ready

RUN_TIMEOUT_S = 600  # a shared 2-core machine under load: warm-up and calibration can take minutes
PAGE_TIMEOUT_MS = 180_000

pytestmark = [pytest.mark.browser, pytest.mark.real_model]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (found := condition()):
            return found
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout_s} s")


def listed_runs(page) -> list[dict]:
    """The rows History lists now, read from its Download CSV button."""
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    return list(csv.DictReader(io.StringIO(open(download.value.path()).read())))


def open_history(page, parts: bool) -> None:
    page.get_by_role("link", name="History").click()
    page.get_by_role("heading", name="History").wait_for()
    if parts:
        page.get_by_text("Parts too").click()
    page.get_by_role("button", name="Download CSV").wait_for()
    page.wait_for_timeout(1000)


def test_a_reload_mid_sweep_finds_the_finished_parts_and_then_the_sweep_in_history(tmp_path):
    skip_unless_ready()
    from playwright.sync_api import sync_playwright

    from lab import store

    before = {r.id for r in store.list_runs()}
    new_runs = lambda kind, **options: [r for r in store.list_runs(kind, **options) if r.id not in before]  # noqa: E731
    with serve_app(tmp_path / "streamlit.log") as url, sync_playwright() as playwright, \
            browser_page(playwright, f"{url}/batch", {"width": 1500, "height": 2000}, PAGE_TIMEOUT_MS) as page:
        page.get_by_role("heading", name="Speculation against batch size").wait_for()
        set_number(page, "Max new tokens", 16)
        page.get_by_role("button", name="Run sweep").click()
        parts = wait_for(lambda: new_runs("batch-size"), RUN_TIMEOUT_S, "no batch size was kept")
        (sweep,) = new_runs("batch", top_level=True)
        assert sweep.status == "partial"  # still running

        page.reload()  # a new session, on the Batch page again: it knows nothing of the sweep
        page.get_by_role("heading", name="Speculation against batch size").wait_for()
        open_history(page, parts=True)
        save_screenshot(page, tmp_path, "history_mid_sweep.png")
        rows = {int(row["id"]): row for row in listed_runs(page)}
        for part in parts:  # every part kept before the reload is listed, under its sweep
            assert rows[part.id]["kind"] == "batch-size" and int(rows[part.id]["parent_id"]) == sweep.id
        assert rows[sweep.id]["status"] == "partial"
        pickers = [page.get_by_role("combobox", name=name, exact=True).input_value()
                   for name in ("Run", "First run", "Second run")]
        assert any(p.startswith(f"#{sweep.id} batch (partial) · ") for p in pickers), pickers  # the pickers say it

        wait_for(lambda: store.get_run(sweep.id).status == "complete", RUN_TIMEOUT_S, "the sweep did not finish")
        page.reload()
        page.get_by_role("heading", name="History").wait_for()
        open_history(page, parts=False)
        save_screenshot(page, tmp_path, "history_after_sweep.png")
        rows = {int(row["id"]): row for row in listed_runs(page)}
        assert rows[sweep.id]["kind"] == "batch" and rows[sweep.id]["status"] == "complete"
        assert len(new_runs("batch-size")) == 4  # batch sizes 1, 2, 4 and 8, each kept as it finished
    assert "Traceback" not in (tmp_path / "streamlit.log").read_text()
