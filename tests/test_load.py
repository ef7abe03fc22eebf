"""LoadReport: a run beside a process spinning on every core reads as loaded; an idle machine's run does not."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lab import load

SPIN = "import time\nend = time.time() + float(__import__('sys').argv[1])\nwhile time.time() < end: pass\n"


def spin_every_core(seconds: float) -> list[subprocess.Popen]:
    """One busy subprocess per available core (processes, not threads: the GIL would keep threads on one core)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(seconds)]) for _ in range(load.available_cores())]


def busy_own_work(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_a_run_beside_busy_processes_is_loaded():
    spinners = spin_every_core(1.5)
    try:
        time.sleep(0.2)  # let them start spinning
        with load.measure_load() as meter:
            busy_own_work(1.0)
    finally:
        for p in spinners:
            p.wait(30)
    report = meter.report
    assert report.loaded, report.reason
    assert report.others_cores >= 0.5 and "other processes kept" in report.reason
    assert report.warning().startswith("Measured while the machine was busy: ")
    assert report.as_dict()["loaded"] is True


def test_an_idle_run_is_not_loaded():
    with load.measure_load() as meter:
        busy_own_work(0.5)
    report = meter.report
    if report.loaded:
        pytest.skip(f"the machine is busy with other work, so no idle run can be measured: {report.reason}")
    assert report.own_cores > 0.5  # this process's own spinning is not load from outside
    assert report.warning() is None


@pytest.mark.parametrize(
    "wall_s, own_s, others_s, cores, loaded",
    [
        (1.0, 1.0, 0.1, 2, False),   # a daemon's wake-ups: not load
        (1.0, 1.0, 0.8, 2, True),    # one busy core of another program on a 2-core machine: shares
        (1.0, 2.0, 0.5, 2, True),    # the run wants both cores and someone takes half of one
        (1.0, 1.0, 0.6, 16, False),  # a stray half core on a 16-core host: cores to spare
        (1.0, 1.0, 9.0, 16, True),   # half of a big host busy elsewhere: memory bandwidth, caches
        (0.01, 0.0, 0.02, 2, False),  # too short to judge
    ],
)
def test_judge_thresholds(wall_s, own_s, others_s, cores, loaded):
    assert load.judge(wall_s, own_s, others_s, cores).loaded is loaded


def test_worst_picks_a_loaded_part():
    calm = load.judge(2.0, 2.0, 0.0, 2)
    busy = load.judge(1.0, 1.0, 1.0, 2)
    assert load.worst([calm, busy, None]) is busy
    assert load.worst([calm]) is calm and load.worst([None]) is None
