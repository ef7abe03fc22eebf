"""One timed run at a time per device: a first-come, first-served line, inside this process and across processes.

Why: several people share one lab. Each browser session is a thread of the one
Streamlit server, and a CLI run is another process. Two timed runs on the same
cores slow each other down by whatever the other one does, so a speedup taken
then says nothing about speculation (a target-alone baseline measured at 3.31 s
while three other sessions decoded, against 0.65 s alone, gave "3.48x" at 0 %
acceptance). So every timed run of the lab waits for its turn on its device.

Two layers:

- In this process (the server's session threads): one ``DeviceLine`` per
  device, a condition variable over a deque of ``Ticket`` objects, served in
  the order they joined. A ticket sees its place while it waits and can be
  cancelled.
- Across processes (a CLI run beside the app, two CLI runs): the head of each
  process's line also takes an exclusive ``fcntl.flock`` on
  ``<lab.models.cache_dir()>/locks/<device>.lock``; the holder writes its label
  and pid there, so a waiting process can say whom it waits for. The kernel
  drops the lock when the holder's process dies, so a crashed run never wedges
  the line.

Usage::

    from lab import device_queue

    with device_queue.hold("cpu", "Compare, session ab12") as ticket:
        ...  # timed work; ticket.cancelled says whether someone asked it to stop

    ticket = device_queue.join("cpu", "Live, session ab12")   # in line at once: ticket.place, ticket.describe()
    with ticket:                                               # waits its turn; raises Cancelled if cancelled meanwhile
        ...

Conventions:
- device: "cpu", "cuda:0", ... ; "cuda" means "cuda:0", a ``torch.device`` is
  taken by its string. Lines are per device: a CPU run and a GPU run do not wait
  for each other (they do share the host's cores; ``lab.load`` notices that).
- place: 0 while the ticket holds the device; n >= 1 while n runs are ahead of
  it (the one running included); None once it has left the line.
- Nested holds: a thread that already holds a device and asks for it again
  (a page holding the device calls a study that holds it too) gets it at once;
  only the outermost hold queues and releases.
- Times are ``time.monotonic()`` seconds (``started_s``, ``ended_s``).

Errors: ``Cancelled`` (a ``RuntimeError``) with ``.reason`` when a waiting
ticket is cancelled; ``OSError`` if the lock folder cannot be created.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.05  # how often a waiting ticket re-checks the file lock and calls on_wait
LOCK_FOLDER = "locks"


class Cancelled(RuntimeError):
    """A ticket was cancelled while it waited for its device; ``reason`` says who cancelled it and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"cancelled while waiting for the device: {reason}")
        self.reason = reason


def device_name(device: Any) -> str:
    """The line's name for ``device``: "cpu", "cuda:0", ... ("cuda" -> "cuda:0"; a torch.device by its string)."""
    name = str(device)
    if name in ("cuda", "gpu"):
        return "cuda:0"
    return name


def lock_path(device: Any) -> Path:
    """The file whose flock the processes of this machine share for ``device``: in ``$LAB_LOCK_DIR`` when set
    (the test suite sets its own, so tests never wait behind a real measurement), else the cache folder's locks/."""
    folder = os.environ.get("LAB_LOCK_DIR")
    if not folder:
        from lab.models.presets import cache_dir  # lazy: lab.models loads transformers

        folder = cache_dir() / LOCK_FOLDER
    return Path(folder) / (device_name(device).replace(":", "-") + ".lock")


class Ticket:
    """One run's place in a device's line.

    device: the line's device name; holder: who runs, in words ("Compare, session ab12");
    place: see the module docstring; cancelled: the reason it was cancelled (None: it was not);
    started_s / ended_s: when it got / gave back the device (monotonic s; None until then).
    """

    def __init__(self, line: "DeviceLine", holder: str, nested: bool = False) -> None:
        self.line = line
        self.device = line.device
        self.holder = holder
        self.nested = nested
        self.cancelled: str | None = None
        self.started_s: float | None = None
        self.ended_s: float | None = None
        self.waited_s = 0.0
        self.on_wait: Callable[["Ticket"], None] | None = None

    # -- what a waiting run shows

    @property
    def place(self) -> int | None:
        return self.line.place_of(self)

    @property
    def ahead(self) -> str | None:
        """Who holds the device while this ticket waits: a label of this process, or another process's "label (pid N)"."""
        return self.line.ahead_of(self)

    def describe(self) -> str:
        """"running", "waiting: 2nd in line behind Compare, session ab12", "cancelled: ...", "done"."""
        place = self.place
        if self.cancelled is not None and (place is None or place > 0):
            return f"cancelled: {self.cancelled}"
        if place is None:
            return "done" if self.ended_s is not None else "not in line"
        if place == 0:
            return "running"
        return f"waiting: {ordinal(place)} in line behind {self.ahead or 'another run'}"

    # -- cancel

    def cancel(self, reason: str) -> None:
        """Ask this run to stop. Waiting: it leaves the line and its ``with`` raises ``Cancelled(reason)``.
        Running: ``cancelled`` is set and the run's own cancel hook should read it."""
        self.line.cancel(self, reason)

    # -- context manager

    def __enter__(self) -> "Ticket":
        self.line.wait_for_turn(self)
        return self

    def __exit__(self, *exc) -> None:
        self.line.release(self)


class DeviceLine:
    """The line of one device in this process (see the module docstring). Get it with ``line_for(device)``."""

    def __init__(self, device: str) -> None:
        self.device = device
        self._condition = threading.Condition()
        self._tickets: deque[Ticket] = deque()  # waiting and running, in order; the head runs once it holds the file
        self._running: Ticket | None = None
        self._owner: int | None = None  # thread ident of the running ticket
        self._file = None  # the open lock file while this process holds the device

    # -- queries (under the condition's lock)

    def place_of(self, ticket: Ticket) -> int | None:
        with self._condition:
            if ticket.nested:
                return 0 if ticket.ended_s is None and ticket.started_s is not None else None
            if ticket is self._running:
                return 0
            try:
                index = self._tickets.index(ticket)
            except ValueError:
                return None
            return index + (0 if self._running is not None else 1)  # the head waiting on another process: 1

    def ahead_of(self, ticket: Ticket) -> str | None:
        with self._condition:
            if ticket is self._running or ticket not in self._tickets:
                return None
            if self._running is not None:
                return self._running.holder
        return other_process_holder(self.device)

    def holders(self) -> list[tuple[str, int]]:
        """(holder, place) of every ticket in this process's line, running first."""
        with self._condition:
            tickets = list(self._tickets)
        return [(t.holder, t.place) for t in tickets if t.place is not None]

    # -- joining, waiting, leaving

    def join(self, holder: str) -> Ticket:
        with self._condition:
            if self._running is not None and self._owner == threading.get_ident():
                return Ticket(self, holder, nested=True)
            ticket = Ticket(self, holder)
            self._tickets.append(ticket)
            return ticket

    def wait_for_turn(self, ticket: Ticket) -> None:
        if ticket.nested:
            ticket.started_s = time.monotonic()
            return
        joined_s = time.monotonic()
        with self._condition:
            while True:
                if ticket.cancelled is not None:
                    self._leave(ticket)
                    raise Cancelled(ticket.cancelled)
                if self._tickets and self._tickets[0] is ticket and self._try_lock_file(ticket):
                    self._running, self._owner = ticket, threading.get_ident()
                    ticket.started_s = time.monotonic()
                    ticket.waited_s = ticket.started_s - joined_s
                    return
                on_wait = ticket.on_wait
                if on_wait is not None:
                    self._condition.release()
                    try:
                        on_wait(ticket)
                    finally:
                        self._condition.acquire()
                    if ticket.cancelled is not None:
                        continue
                self._condition.wait(POLL_S)

    def release(self, ticket: Ticket) -> None:
        if ticket.nested:
            ticket.ended_s = time.monotonic()
            return
        with self._condition:
            if ticket is self._running:
                self._unlock_file()
                self._running, self._owner = None, None
            ticket.ended_s = time.monotonic()
            self._leave(ticket)

    def cancel(self, ticket: Ticket, reason: str) -> None:
        with self._condition:
            if ticket.cancelled is None:
                ticket.cancelled = reason
            self._condition.notify_all()

    def _leave(self, ticket: Ticket) -> None:
        try:
            self._tickets.remove(ticket)
        except ValueError:
            pass
        self._condition.notify_all()

    # -- the file lock, taken by the head of the line

    def _try_lock_file(self, ticket: Ticket) -> bool:
        path = lock_path(self.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"holder": ticket.holder, "pid": os.getpid(), "since": time.time()}))
        handle.flush()
        self._file = handle
        return True

    def _unlock_file(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            self._file.flush()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


_lines: dict[str, DeviceLine] = {}
_lines_lock = threading.Lock()


def line_for(device: Any) -> DeviceLine:
    """This process's line for ``device`` (one per device name, made on first use)."""
    name = device_name(device)
    with _lines_lock:
        if name not in _lines:
            _lines[name] = DeviceLine(name)
        return _lines[name]


def join(device: Any, holder: str, on_wait: Callable[[Ticket], None] | None = None) -> Ticket:
    """Enter ``device``'s line now and return the ticket; ``with ticket:`` waits for the turn and holds the device.

    holder: who runs, in words, shown to the runs behind it. on_wait(ticket) is
    called every ``POLL_S`` s while it waits (a progress line, a CLI message);
    it may call ``ticket.cancel``. A ticket that is never entered must still
    leave the line: enter it, or call ``ticket.cancel`` and enter it (it raises).
    """
    ticket = line_for(device).join(holder)
    ticket.on_wait = on_wait
    return ticket


def hold(device: Any, holder: str, on_wait: Callable[[Ticket], None] | None = None) -> Ticket:
    """``join`` for use directly in a ``with`` statement: ``with hold("cpu", "bench (CLI)"):``."""
    return join(device, holder, on_wait)


def other_process_holder(device: Any) -> str | None:
    """The label and pid another process wrote in ``device``'s lock file ("compare (CLI) (pid 1234)"), if any."""
    try:
        data = json.loads(lock_path(device).read_text() or "{}")
    except (OSError, ValueError):
        return None
    if not data:
        return None
    return f"{data.get('holder', 'another run')} (pid {data.get('pid', '?')})"


def ordinal(n: int) -> str:
    """1 -> "1st", 2 -> "2nd", 3 -> "3rd", 11 -> "11th"."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def cli_waiting_printer(stream) -> Callable[[Ticket], None]:
    """An ``on_wait`` for the CLI: prints the ticket's state to ``stream`` whenever it changes."""
    last = [None]

    def on_wait(ticket: Ticket) -> None:
        text = ticket.describe()
        if text != last[0]:
            last[0] = text
            print(f"[device {ticket.device}] {text}", file=stream, flush=True)

    return on_wait


def device_of(model_like: Any) -> str:
    """The device a model runs on: ``LoadedModel.device``, else its first parameter's device, else "cpu"."""
    device = getattr(model_like, "device", None)
    if device is None:
        model = getattr(model_like, "model", model_like)
        try:
            device = next(model.parameters()).device
        except (AttributeError, StopIteration, TypeError):
            device = "cpu"
    return device_name(device)
