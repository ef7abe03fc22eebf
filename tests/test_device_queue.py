"""One timed run at a time per device: two threads queue, a thread and a process queue, a waiting run cancels.

Each test points the lab's cache folder (where the lock files live) at its own
temporary folder, so it never waits for a real run of the lab on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab import device_queue

ROOT = Path(__file__).resolve().parents[1]
HOLD_S = 0.4


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path))
    return tmp_path


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_two_threads_queue_in_order_and_never_overlap():
    first = device_queue.join("cpu", "Compare, session aaaa")
    spans: dict[str, tuple[float, float]] = {}
    seen_places = []

    def run_second():
        second = device_queue.join("cpu", "Live, session bbbb",
                                   on_wait=lambda t: seen_places.append((t.place, t.describe())))
        with second:
            spans["second"] = (time.monotonic(), time.monotonic())

    with first:
        assert first.place == 0 and first.describe() == "running"
        started = time.monotonic()
        thread = threading.Thread(target=run_second)
        thread.start()
        wait_until(lambda: seen_places)  # the second is in line and told so
        time.sleep(HOLD_S)
        spans["first"] = (started, time.monotonic())
    thread.join(10)
    assert not thread.is_alive()
    assert seen_places[0] == (1, "waiting: 1st in line behind Compare, session aaaa")
    assert spans["second"][0] >= spans["first"][1]  # it ran only after the first ended
    assert first.place is None and first.describe() == "done"


def join_from_another_thread(device: str, holder: str) -> device_queue.Ticket:
    """A ticket joined by another thread (the holding thread itself would get a nested hold, place 0)."""
    tickets = []
    thread = threading.Thread(target=lambda: tickets.append(device_queue.join(device, holder)))
    thread.start()
    thread.join(10)
    return tickets[0]


def test_places_count_every_run_ahead():
    with device_queue.hold("cpu", "Batch, session a"):
        second = join_from_another_thread("cpu", "Compare, session b")
        third = join_from_another_thread("cpu", "Live, session c")
        assert (second.place, third.place) == (1, 2)
        assert third.describe() == "waiting: 2nd in line behind Batch, session a"
        assert device_queue.line_for("cpu").holders() == [("Batch, session a", 0), ("Compare, session b", 1),
                                                            ("Live, session c", 2)]
        for ticket in (second, third):
            ticket.cancel("test")
            with pytest.raises(device_queue.Cancelled):
                ticket.__enter__()
    assert device_queue.line_for("cpu").holders() == []


def test_devices_have_separate_lines():
    with device_queue.hold("cpu", "one"):
        other = device_queue.join("cuda", "two")
        assert other.device == "cuda:0"
        with other:  # no wait: another device
            assert other.place == 0


def test_a_waiting_run_is_cancelled_and_told_why():
    outcome = {}

    def run_second(ticket):
        try:
            with ticket:
                outcome["ran"] = True
        except device_queue.Cancelled as cancelled:
            outcome["reason"] = cancelled.reason

    with device_queue.hold("cpu", "Compare, session aaaa"):
        second = join_from_another_thread("cpu", "Live, session bbbb")
        thread = threading.Thread(target=run_second, args=(second,))
        thread.start()
        wait_until(lambda: second.place == 1)
        second.cancel("you pressed Cancel")
        thread.join(10)
        assert outcome == {"reason": "you pressed Cancel"}
        assert second.place is None and second.describe() == "cancelled: you pressed Cancel"
    # the line goes on: the next run gets the device at once
    with device_queue.hold("cpu", "next") as ticket:
        assert ticket.place == 0


def test_a_nested_hold_in_the_same_thread_does_not_wait():
    with device_queue.hold("cpu", "page"):
        with device_queue.hold("cpu", "study inside the page") as inner:  # would deadlock without nesting
            assert inner.place == 0
        assert device_queue.line_for("cpu").holders() == [("page", 0)]


HOLDER_SCRIPT = """
import sys, time
from lab import device_queue
with device_queue.hold("cpu", "compare (CLI)"):
    print("held", time.time(), flush=True)
    time.sleep(float(sys.argv[1]))
    print("released", time.time(), flush=True)
"""


def test_a_process_and_a_thread_exclude_each_other(own_cache):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, "1.5"], stdout=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    try:
        held_line = holder.stdout.readline().split()
        assert held_line[0] == "held", held_line
        seen = []
        ticket = device_queue.join("cpu", "Live, session bbbb", on_wait=lambda t: seen.append(t.describe()))
        with ticket:
            got_s = time.time()
        released_line = holder.stdout.readline().split()
    finally:
        holder.wait(30)
    assert released_line[0] == "released"
    assert got_s >= float(released_line[1])  # the thread ran only after the process let go
    assert seen and seen[0].startswith("waiting: 1st in line behind compare (CLI) (pid ")


@pytest.mark.parametrize("n, text", [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (22, "22nd")])
def test_ordinal(n, text):
    assert device_queue.ordinal(n) == text


def test_the_lock_folder_follows_lab_lock_dir(tmp_path, monkeypatch):
    """The suite (conftest) and a user can move the cross-process locks out of the cache folder."""
    monkeypatch.setenv("LAB_LOCK_DIR", str(tmp_path))
    assert device_queue.lock_path("cuda") == tmp_path / "cuda-0.lock"
    monkeypatch.delenv("LAB_LOCK_DIR")
    assert device_queue.lock_path("cpu").parent.name == "locks"
