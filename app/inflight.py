"""Long runs that a click can stop (Compare, Batch): handing what they did over to the next script run.

Streamlit handles a click only by running the script again. With its default
fast reruns it starts the new run at once, in a new thread, and tells the
running one to stop: that one gets a ``StopException`` (a
``ScriptControlException``) at its next ``st`` call, and at every one after it,
``st.session_state`` access included. So a stopped run cannot store its result
in session state. Before starting, it puts an ``InFlight`` there; when it ends,
stopped or not, it leaves its result (if any) on that object and sets ``done``.
The next script run calls ``take_over``: it waits for ``done`` and takes the
object out of session state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import ScriptControlException

STOP_WAIT_S = 120


@dataclass
class InFlight:
    """A run's hand-over. result: what it finished (None: nothing); last_progress: its last progress message."""

    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    last_progress: str = ""


def start(flight_key: str) -> InFlight:
    """A fresh hand-over, put in session state under ``flight_key`` before a run starts."""
    flight = InFlight()
    st.session_state[flight_key] = flight
    return flight


def take_over(flight_key: str, waiting_text: str) -> InFlight | None:
    """The hand-over of a run that the previous script run was stopped in, once that run has ended.

    None when no run was in flight, or it has not ended within ``STOP_WAIT_S``
    (then it stays in session state for the next script run). Shows a spinner
    with ``waiting_text`` while it waits.
    """
    flight: InFlight | None = st.session_state.get(flight_key)
    if flight is None:
        return None
    if not flight.done.is_set():
        with st.spinner(waiting_text):
            flight.done.wait(STOP_WAIT_S)
    if not flight.done.is_set():
        return None
    del st.session_state[flight_key]
    return flight


class StopCatcher:
    """Mixin for a run's watcher: ``_yield_point(call)`` makes one ``st`` call, catching a stop or rerun.

    Every ``st`` call, session state included, is where Streamlit delivers a
    stop or rerun: it is caught there once (a stopped run gets it again at every
    later call) and kept in ``interruption``; later calls are skipped.
    """

    interruption: ScriptControlException | None = None

    def _yield_point(self, call):
        if self.interruption is not None:
            return None
        try:
            return call()
        except ScriptControlException as interruption:
            self.interruption = interruption
            return None


def request_cancel(cancel_key: str) -> None:
    """The Cancel button's on_click: flag the cancel in session state under ``cancel_key``."""
    st.session_state[cancel_key] = True
