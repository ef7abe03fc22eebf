"""A run the user started is never silently dropped: Live, Compare and Batch runs finish in a worker thread whatever
the page does.

The decode is held back by a gate (``lab.decode.decode`` patched: the page
imports it on every script run), so the script run that started it times out
while it runs: AppTest then stops that script run, as a click or a page switch
does in the browser. The run must finish anyway and be shown when the page is
drawn again; a cancelled one must say so and why.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lab.decode  # noqa: E402
import lab.studies.batch_sweep  # noqa: E402
import lab.studies.compare  # noqa: E402
from app import background  # noqa: E402
from app_util import app_on, click, html_of, key, live_app, tiny_models  # noqa: E402, F401
from lab import device_queue, load, store  # noqa: E402

TINY_PROMPT = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4"
STOPPED_AFTER_S = 3


@pytest.fixture
def gate(monkeypatch):
    """Every decode waits for the gate before each event; set it to let runs go."""
    opened = threading.Event()
    real_decode = lab.decode.decode

    def gated_decode(*args, **kwargs):
        for event in real_decode(*args, **kwargs):
            assert opened.wait(60), "the test never opened the gate"
            yield event

    monkeypatch.setattr(lab.decode, "decode", gated_decode)
    yield opened
    opened.set()  # never leave a worker waiting


def start_and_interrupt(at):
    """Click Run and let the script run be stopped mid-run (as a rerun or page switch stops it); returns the job."""
    (run,) = [b for b in at.button if b.label == "Run"]
    run.click()
    with pytest.raises(RuntimeError, match="timed out"):
        at.run(timeout=STOPPED_AFTER_S)
    run.set_value(False)  # in the browser a click triggers one script run; AppTest keeps the stale tree's click
    job = at.session_state["live:job"]
    assert not job.done.is_set()
    return job


def test_a_live_run_interrupted_by_a_page_switch_is_shown_finished_on_return(tiny_models, gate):
    at = live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3)
    job = start_and_interrupt(at)
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception
    gate.set()
    assert job.done.wait(60) and job.error is None and job.cancelled is None
    at.switch_page("app_pages/live.py").run()
    assert not at.exception and not at.error
    assert 'class="tok tok-' in html_of(at)
    assert any("Identical to the target alone" in s.value for s in at.success)
    assert "live:job" not in at.session_state
    assert at.session_state["live:result"].settings["drafter"].endswith("K=3")


def test_a_live_run_interrupted_by_a_rerun_finishes_with_its_own_settings(tiny_models, gate):
    at = live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3)
    start_and_interrupt(at)
    at.session_state[key("live.k")] = 5  # a slider moved mid-run
    gate.set()
    at.run()  # the rerun follows the run to its end
    assert not at.exception and not at.error
    result = at.session_state["live:result"]
    assert result.settings["drafter"].endswith("K=3")  # the run as started, not the moved slider
    assert any("Identical to the target alone" in s.value for s in at.success)
    # the speedup pools two interleaved pairs: speculative, target alone, target alone, speculative
    assert result.timing["order"] == ["speculative", "target alone", "target alone", "speculative"]
    assert len(result.timing["speculative_tokens_per_s"]) == len(result.timing["baseline_tokens_per_s"]) == 2


def test_a_cancelled_live_run_says_so_and_why(tiny_models, gate):
    at = live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=10, k=3)
    job = start_and_interrupt(at)
    job.cancel("you pressed Cancel")  # what the Cancel button's on_click does
    gate.set()
    at.run()
    assert not at.exception and not at.error
    assert any("The run you started was cancelled" in w.value and "you pressed Cancel" in w.value for w in at.warning)
    assert "live:result" not in at.session_state


def test_a_live_run_waits_for_the_device_and_can_leave_the_line(tiny_models):
    at = live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=6)
    with device_queue.hold("cpu", "Compare, session test"):
        job = start_and_interrupt(at)
        assert job.status() == "waiting: 1st in line behind Compare, session test"
        assert "1st in line behind Compare, session test" in background.waiting_text(job)
        job.cancel("you pressed Cancel")
        assert job.done.wait(10)
    at.run()
    assert any("cancelled before it started: you pressed Cancel" in w.value for w in at.warning)


def test_a_live_run_under_load_says_so_next_to_its_speedup(tiny_models, monkeypatch):
    class BusyMeter:  # the machine was busy: two other processes on a 2-core machine
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.report = load.judge(1.0, 1.0, 1.5, 2)

    monkeypatch.setattr(background, "measure_load", BusyMeter)
    at = click(live_app(prompt=TINY_PROMPT, raw=True, max_new_tokens=8, k=3), "Run")
    assert not at.exception and not at.error
    assert any(w.value.startswith("Measured while the machine was busy: other processes kept 1.50 of 2 cores")
               and "rerun for a clean figure" in w.value for w in at.warning)
    assert at.session_state["live:result"].settings["load"]["loaded"] is True


# ---------------------------------------------------------------- Compare and Batch: the same promise

TINY_PROMPTS = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4\n---\nt7 t8 t9 t7 t8 t9 t7 t8"


@pytest.fixture
def study_gate(monkeypatch):
    """Compare's decodes and the sweep's batches wait for the gate; set it to let them go."""
    opened = threading.Event()
    real_decode, real_run_batch = lab.studies.compare.decode, lab.studies.batch_sweep.run_batch

    def gated_decode(*args, **kwargs):
        for event in real_decode(*args, **kwargs):
            assert opened.wait(60), "the test never opened the gate"
            yield event

    def gated_run_batch(*args, **kwargs):
        assert opened.wait(60), "the test never opened the gate"
        return real_run_batch(*args, **kwargs)

    monkeypatch.setattr(lab.studies.compare, "decode", gated_decode)
    monkeypatch.setattr(lab.studies.batch_sweep, "run_batch", gated_run_batch)
    yield opened
    opened.set()


def start_study(at, label: str, job_key: str):
    """Click ``label`` and let the script run be stopped mid-run (as a page switch stops it); returns the job."""
    (run,) = [b for b in at.button if b.label == label]
    run.click()
    with pytest.raises(RuntimeError, match="timed out"):
        at.run(timeout=STOPPED_AFTER_S)
    run.set_value(False)
    job = at.session_state[job_key]
    assert not job.done.is_set()
    return job


STUDIES = {  # page, its Run button, its job's key, widget values for a tiny run
    "compare": ("Run comparison", "compare:job", dict(source="Paste prompts", pasted=TINY_PROMPTS, raw=True,
                                                     max_new_tokens=8, ks=[1, 3])),
    "batch": ("Run sweep", "batch:job", dict(source="Paste prompts", pasted=TINY_PROMPTS, raw=True, max_new_tokens=8,
                                             k=3, batch_sizes=[1, 2])),
}
COMPLETE = {"compare": "Complete: 10 runs on 2 prompts", "batch": "Swept batch sizes 1, 2"}


@pytest.mark.parametrize("page", ["compare", "batch"])
def test_a_study_interrupted_by_a_page_switch_is_shown_complete_on_return(tiny_models, study_gate, page, monkeypatch,
                                                                           tmp_path):
    monkeypatch.setenv("LAB_RESULTS_DB", str(tmp_path / "runs.sqlite3"))  # a store of its own: only this run in it
    label, job_key, widgets = STUDIES[page]
    at = app_on(page, **widgets)
    job = start_study(at, label, job_key)
    at.switch_page("app_pages/live.py").run()  # away, and to a second page, while it runs
    at.switch_page("app_pages/history.py").run()
    assert not at.exception
    study_gate.set()
    assert job.done.wait(60) and job.error is None and job.cancelled is None
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(s.value.startswith(COMPLETE[page]) for s in at.success), [s.value for s in at.success]
    assert not any(w.value.startswith(("Stopped", "Cancelled")) for w in at.warning)
    assert job_key not in at.session_state
    kind = "compare" if page == "compare" else "batch"
    (kept,) = store.list_runs(kind, top_level=True)  # kept by its worker, before anyone came back
    assert kept.status == "complete"
    at.run()  # a rerun keeps it and runs nothing again
    assert any(s.value.startswith(COMPLETE[page]) for s in at.success)


@pytest.mark.parametrize("page", ["compare", "batch"])
def test_a_cancelled_study_says_so_and_why(tiny_models, study_gate, page):
    label, job_key, widgets = STUDIES[page]
    at = app_on(page, **widgets)
    job = start_study(at, label, job_key)
    job.cancel("you pressed Cancel")  # what the Cancel button's on_click does
    study_gate.set()
    assert job.done.wait(60)
    at.run()
    assert not at.exception and not at.error
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("Cancelled") and "you pressed Cancel" in w for w in warnings), warnings
    assert not at.success and job_key not in at.session_state
