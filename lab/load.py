"""Was the machine busy with work from outside this run while it was timed? A ``LoadReport`` says so, with numbers.

``lab.device_queue`` keeps the lab's own timed runs apart; this notices what
the queue cannot see: another program, another user's job, a test suite, a
second lab outside this cache folder. Wrap a timed run::

    with measure_load() as meter:
        ...                       # the timed run
    report = meter.report         # LoadReport; report.as_dict() goes in the run's result under "load"

What is measured, over the run's wall time (``wall_s``):

- own_cpu_s: this process's CPU time (``time.process_time``: every thread,
  torch's worker threads included).
- others_cpu_s: CPU time every process spent on the cores this process may use
  (``os.sched_getaffinity``), from the kernel's per-core counters (psutil's
  ``cpu_times(percpu=True)``: user, nice, system, irq, softirq and steal, i.e.
  time taken by a hypervisor too), minus own_cpu_s.
- own_cores = own_cpu_s / wall_s and others_cores = others_cpu_s / wall_s: how
  many cores each kept busy on average.
- load1_before, load1_after: the 1-minute load average (``os.getloadavg``)
  before and after, for the record.

Decision (``loaded``), and why these thresholds:

1. others_cores >= ``OTHERS_MIN_CORES`` (0.5), i.e. something else kept at
   least half a core busy for the whole run. Below it, a daemon's wake-ups, the
   Streamlit server's other threads drawing pages and the counters' 10 ms ticks
   stay out of the verdict; a competing decode, compile or test run is far above.
2. and either the run had to share: own_cores + others_cores >
   cores - ``IDLE_MARGIN_CORES`` (0.5), i.e. less than half a core sat idle;
   or others kept half the machine busy (others_cores >= cores / 2), which
   slows a decode even with a core to spare (shared caches, memory bandwidth,
   clock boost). On the lab's 2-core machine one busy core of another program
   is therefore enough; on a 16-core GPU host a stray half core is not.
3. Runs shorter than ``MIN_WALL_S`` (50 ms) are not judged (too few ticks).

The load average is reported, not judged: it averages the last minute, lags
the run by seconds, and counts this process's own previous runs (a queue of
back-to-back runs keeps it near the core count with nothing else running).

Same-process limits: own_cpu_s includes other threads of this process (another
browser session drawing a page); those are the lab's own and the device queue
keeps their timed work apart.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import psutil

OTHERS_MIN_CORES = 0.5
IDLE_MARGIN_CORES = 0.5
MIN_WALL_S = 0.05
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")


@dataclass(frozen=True)
class LoadReport:
    """How busy the machine was during a timed run (see the module docstring for the rule).

    loaded: True when the timing is suspect. reason: the verdict in words with its numbers.
    wall_s, own_cpu_s, others_cpu_s: seconds over the run. cores: the cores this process may use.
    load1_before, load1_after: 1-minute load averages (None where the OS has none).
    """

    loaded: bool
    reason: str
    wall_s: float
    own_cpu_s: float
    others_cpu_s: float
    cores: int
    load1_before: float | None
    load1_after: float | None

    @property
    def own_cores(self) -> float:
        return self.own_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def others_cores(self) -> float:
        return self.others_cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        """A JSON-ready dict (the run's result keeps it under "load")."""
        return asdict(self) | {"own_cores": round(self.own_cores, 3), "others_cores": round(self.others_cores, 3)}

    def warning(self) -> str | None:
        """The line a page shows next to a speedup measured under load (None when not loaded)."""
        if not self.loaded:
            return None
        return f"Measured while the machine was busy: {self.reason}; rerun for a clean figure."


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity; all cores where the OS has no affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return psutil.cpu_count() or 1


def judge(wall_s: float, own_cpu_s: float, others_cpu_s: float, cores: int,
          load1_before: float | None = None, load1_after: float | None = None) -> LoadReport:
    """The verdict for measured figures (pure: the rule of the module docstring)."""
    others_cpu_s = max(others_cpu_s, 0.0)
    own_cores = own_cpu_s / wall_s if wall_s > 0 else 0.0
    others_cores = others_cpu_s / wall_s if wall_s > 0 else 0.0
    load = ("" if load1_before is None else
            f"; 1-minute load {load1_before:.2f} before, {load1_after:.2f} after")
    figures = (f"other processes kept {others_cores:.2f} of {cores} cores busy while this run used "
               f"{own_cores:.2f}, over the {wall_s:.2f} s of the timed run{load}")
    if wall_s < MIN_WALL_S:
        loaded, reason = False, f"too short to judge ({1e3 * wall_s:.0f} ms)"
    elif others_cores < OTHERS_MIN_CORES:
        loaded, reason = False, figures
    elif own_cores + others_cores > cores - IDLE_MARGIN_CORES:
        loaded, reason = True, figures + " (the run had to share the cores)"
    elif others_cores >= cores / 2:
        loaded, reason = True, figures + " (half the machine or more busy elsewhere)"
    else:
        loaded, reason = False, figures + " (cores to spare)"
    return LoadReport(loaded, reason, wall_s, own_cpu_s, others_cpu_s, cores, load1_before, load1_after)


class LoadMeter:
    """Context manager measuring load around a run; ``report`` is set on exit (also when the run raised)."""

    def __init__(self) -> None:
        self.report: LoadReport | None = None
        self._cores = _core_ids()

    def __enter__(self) -> "LoadMeter":
        self._load1 = _load1()
        self._busy = _busy_s(self._cores)
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall_s = time.perf_counter() - self._wall
        own_cpu_s = time.process_time() - self._cpu
        busy_s = _busy_s(self._cores) - self._busy
        self.report = judge(wall_s, own_cpu_s, busy_s - own_cpu_s, len(self._cores), self._load1, _load1())


def measure_load() -> LoadMeter:
    """``with measure_load() as meter: ...``, then ``meter.report``."""
    return LoadMeter()


def worst(reports: list[LoadReport | None]) -> LoadReport | None:
    """The report of a run made of several timed parts: the first loaded one, else the longest; None if none."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    return next((r for r in reports if r.loaded), max(reports, key=lambda r: r.wall_s))


def _core_ids() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:
        return list(range(psutil.cpu_count() or 1))


def _busy_s(cores: list[int]) -> float:
    per_core = psutil.cpu_times(percpu=True)
    return sum(getattr(per_core[i], name, 0.0) for i in cores if i < len(per_core) for name in BUSY_FIELDS)


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
