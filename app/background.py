"""Runs that finish whatever the page does: a worker thread per run, holding its device, its outcome on a ``Job``.

Streamlit handles every click by running the script again, and stops the
script run in flight (a slider moved, another page opened). A decode run in
the script thread would be dropped there. So a page prepares a run in the
script thread (reads widgets, validates, loads models: errors show at once),
then hands the timed work to ``start``: a daemon thread that

1. waits for the device in ``lab.device_queue`` (the job's ticket says its
   place: "waiting: 2nd in line behind Compare, session ab12");
2. runs the work under ``lab.load``'s meter, with no ``st`` call (the work
   writes what the page draws while it runs into ``job.partial``);
3. leaves the result, the error, or why it was cancelled on the job, and sets
   ``job.done``.

The job lives in ``st.session_state``, so any later script run of the page
finds it: ``follow`` redraws it while it runs (and returns once it is done);
the page then takes its result. Cancel: ``Job.cancel(reason)``, e.g. from a
Cancel button's on_click; the work polls ``job.should_cancel()`` between
steps, and a ticket still waiting leaves the line at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
import torch

from lab import device_queue
from lab.load import LoadReport, measure_load

FOLLOW_EVERY_S = 0.15
_STARTED: list["Job"] = []  # every job this server process started, for a reloaded tab to find (``elsewhere``)
_STARTED_LOCK = threading.Lock()


class JobCancelled(Exception):
    """Raised inside the work when its job was cancelled (``check``); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Job:
    """One run in a worker thread.

    holder: who runs, as the device line shows it ("Live, session ab12").
    ticket: its place in ``lab.device_queue``. partial: what the work has so far, for the page
    to draw (written by the worker, read by the page). progress: a line saying what it does now.
    result / error / cancelled (the reason, in words) / load: the outcome, set before ``done``.
    """

    holder: str
    ticket: device_queue.Ticket
    done: threading.Event = field(default_factory=threading.Event)
    partial: dict[str, Any] = field(default_factory=dict)
    progress: str = ""
    result: Any = None
    error: BaseException | None = None
    cancelled: str | None = None
    load: LoadReport | None = None
    started_s: float = field(default_factory=time.monotonic)
    ended_s: float | None = None

    def cancel(self, reason: str) -> None:
        """Ask the run to stop: said to the device line (a waiting run leaves it) and to the work's checks."""
        if self.cancelled is None and not self.done.is_set():
            self.cancelled = reason
            self.ticket.cancel(reason)

    def should_cancel(self) -> bool:
        return self.cancelled is not None

    def check(self) -> None:
        """Raise ``JobCancelled`` if the job was cancelled (the work calls it between steps)."""
        if self.cancelled is not None:
            raise JobCancelled(self.cancelled)

    def cancellable(self, events):
        """``events`` (a decode's generator), checked for a cancel before each event; closed when cancelled."""
        try:
            for event in events:
                self.check()
                yield event
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def status(self) -> str:
        """What the job does now, in words: its place in line while it waits, else its progress line."""
        place = self.ticket.place
        if place is not None and place > 0:
            return self.ticket.describe()
        return self.progress or "running"


def session_holder(page: str) -> str:
    """A run's label in the device line: the page and a short id of this browser session ("Live, session ab12")."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    session = ctx.session_id[:4] if ctx is not None else "none"
    return f"{page}, session {session}"


def start(work: Callable[[Job], Any], device: str, holder: str,
          on_finish: Callable[[Job], None] | None = None) -> Job:
    """Join ``device``'s line now and run ``work(job)`` in a worker thread once it is this job's turn.

    on_finish(job): called in the worker once the work has finished and its load report is known, whether or
    not anyone still watches the page (the results store keeps the run there); it must make no ``st`` call.
    What it raises is kept in ``job.partial["finish_error"]`` (the run itself stands).
    """
    job = Job(holder=holder, ticket=device_queue.join(device, holder))
    with _STARTED_LOCK:
        _STARTED[:] = [j for j in _STARTED if not j.done.is_set()] + [job]
    threading.Thread(target=_run, args=(job, work, on_finish), daemon=True, name=f"lab job: {holder}").start()
    return job


def _run(job: Job, work: Callable[[Job], Any], on_finish: Callable[[Job], None] | None = None) -> None:
    try:
        with job.ticket:
            with measure_load() as meter:
                try:
                    job.result = work(job)
                finally:
                    job.ended_s = time.monotonic()
            job.load = meter.report
        if on_finish is not None:
            try:
                on_finish(job)
            except Exception as error:  # noqa: BLE001 - the run stands; the page says what went wrong
                job.partial["finish_error"] = f"{type(error).__name__}: {error}"
    except (device_queue.Cancelled, JobCancelled) as cancelled:
        job.cancelled = job.cancelled or cancelled.reason
    except BaseException as error:  # the page shows it; a worker thread has nobody else to tell
        job.error = error
    finally:
        job.done.set()


def elsewhere(page: str) -> list[Job]:
    """The jobs of ``page`` still running that another browser session started (a tab since reloaded or closed)."""
    mine = session_holder(page)
    with _STARTED_LOCK:
        return [j for j in _STARTED if not j.done.is_set() and j.holder.startswith(f"{page}, ") and j.holder != mine]


def offer_elsewhere(page: str, job_key: str, what: str) -> None:
    """Say which runs of ``page`` another session started are still running, each with a button to follow it here.

    A reloaded tab is a new session, so the run it started is no longer in its session state; following it puts
    the job under ``job_key``, and the page draws and takes it over as if it had started it.
    """
    for i, job in enumerate(elsewhere(page)):
        with st.container(border=True):
            st.info(f"A {what} started by {job.holder.removeprefix(page + ', ')} (another tab, or this one before a "
                    f"reload) is running: {job.status()}. It is kept in History when it ends.",
                    icon=":material/sync:")
            if st.button("Follow it here", key=f"{job_key}:follow:{i}", icon=":material/visibility:"):
                st.session_state[job_key] = job
                st.rerun()


def follow(job: Job, draw: Callable[[Job], None], every_s: float = FOLLOW_EVERY_S) -> None:
    """Redraw a running job with ``draw(job)`` every ``every_s`` s until it is done (then once more).

    Runs in the script thread: a click or a page switch stops the script run at
    ``draw``'s next ``st`` call, and the job goes on in its thread; the next
    script run of the page follows it again.
    """
    while not job.done.wait(every_s):
        draw(job)
    draw(job)


def cancel_button(slot, job: Job, key: str, help: str) -> None:
    """A Cancel button in ``slot`` that cancels ``job`` ("you pressed Cancel")."""
    slot.button("Cancel", icon=":material/stop:", key=key, help=help, on_click=job.cancel, args=("you pressed Cancel",))


def waiting_text(job: Job) -> str:
    """"Waiting for the CPU: 2nd in line behind Compare, session ab12" while queued, else its progress."""
    place = job.ticket.place
    if place is not None and place > 0:
        return f"Waiting for the {job.ticket.device} device: {job.ticket.describe().removeprefix('waiting: ')}. " \
               "Timings are never taken while another run of the lab shares it."
    return job.progress or "Running…"


def drop_finished(key: str) -> Job | None:
    """Take the job under ``key`` out of session state once it is done; None when none or still running."""
    job = st.session_state.get(key)
    if job is None or not job.done.is_set():
        return None
    del st.session_state[key]
    return job


MEMORY_ERRORS = (torch.OutOfMemoryError, MemoryError)


def error_message(error: BaseException, smaller: str = "a smaller target or draft, or fewer new tokens"
                  ) -> tuple[str, str]:
    """What a page says about a failed run (message, icon); re-raises an error it does not expect.

    smaller: what to shrink after running out of memory (the Batch page adds its batch sizes).
    """
    from lab.models import ModelError

    if isinstance(error, (ValueError, ModelError, FileNotFoundError)):
        return str(error), ":material/error:"
    if isinstance(error, MEMORY_ERRORS):
        return (f"Out of memory ({type(error).__name__}). Free loaded models in the sidebar, pick {smaller}; then "
                "run again.", ":material/memory:")
    raise error
