"""The results store: round trip, filters, newest first, WAL, schema version, a corrupt file, concurrent writers,
a restart from another process, export, and the savers that long runs use."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lab.store import SCHEMA_VERSION, ResultsStore, RunSaver, StoreError, export_runs, list_runs, save_run

ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cpu": "test cpu", "cpu_flags": [], "torch": "0", "threads": 1, "device": "cpu"}


@pytest.fixture
def store(tmp_path) -> ResultsStore:
    return ResultsStore(tmp_path / "runs.sqlite3")


def keep(store: ResultsStore, kind: str = "live", **fields) -> int:
    return store.save_run(kind, machine=MACHINE, **fields)


def test_round_trip_keeps_every_field(store):
    run_id = keep(store, "compare", settings={"ks": [2, 4], "temperature": 0.0}, target="smollm2-135m", draft="tiny",
                  figures={"speedup": 1.5, "acceptance_rate": float("nan")}, status="partial",
                  payload={"runs": [{"k": 2, "text": "é ok"}]}, loaded=True, load_note="2 other runs")
    record = store.get_run(run_id)
    assert (record.id, record.kind, record.status) == (run_id, "compare", "partial")
    assert record.settings == {"ks": [2, 4], "temperature": 0.0}
    assert record.figures == {"speedup": 1.5, "acceptance_rate": None}  # NaN is kept as null (JSON has no NaN)
    assert record.models == {"target": "smollm2-135m", "draft": "tiny"}
    assert record.machine == MACHINE and len(record.machine_key) == 12
    assert record.payload == {"runs": [{"k": 2, "text": "é ok"}]}
    nan_kept = store.get_run(keep(store, payload={"speedup": float("nan")})).payload["speedup"]
    assert nan_kept != nan_kept  # a payload keeps NaN: a page reads back the very result it drew
    assert (record.loaded, record.load_note, record.parent_id) == (True, "2 other runs", None)
    assert record.created_at.endswith("+00:00")

    store.update_run(run_id, status="complete", figures={"speedup": 2.0})
    updated = store.get_run(run_id)
    assert (updated.status, updated.figures, updated.settings) == ("complete", {"speedup": 2.0}, record.settings)


def test_list_is_newest_first_and_filters(store):
    ids = [keep(store, kind, target=target, draft=draft, created_at=f"2026-12-0{day}T10:00:00.000000+00:00")
           for day, (kind, target, draft) in enumerate(
               [("live", "a", None), ("batch", "b", "a"), ("live", "b", None), ("calibrate", "c", None)], start=1)]
    part = keep(store, "batch-size", parent_id=ids[1], target="b", created_at="2026-12-05T10:00:00.000000+00:00")

    assert [r.id for r in store.list_runs()] == [part, *reversed(ids)]
    assert [r.id for r in store.list_runs(kind="live")] == [ids[2], ids[0]]
    assert [r.id for r in store.list_runs(kind=["live", "calibrate"], limit=2)] == [ids[3], ids[2]]
    assert [r.id for r in store.list_runs(model="a")] == [ids[1], ids[0]]  # the target or the draft
    assert [r.id for r in store.list_runs(since="2026-12-03T00:00:00")] == [part, ids[3], ids[2]]
    assert [r.id for r in store.list_runs(top_level=True)] == list(reversed(ids))
    assert [r.id for r in store.list_runs(parent_id=ids[1])] == [part]
    assert all(r.payload is None for r in store.list_runs())  # payloads only on request

    assert store.delete_run(ids[1]) == 2  # the sweep and its part
    assert [r.id for r in store.list_runs()] == [ids[3], ids[2], ids[0]]
    with pytest.raises(KeyError, match="no stored run"):
        store.get_run(ids[1])


def test_bad_kind_and_status_are_refused(store):
    with pytest.raises(ValueError, match="status requires one of complete, partial, cancelled; got 'done'"):
        keep(store, status="done")
    with pytest.raises(ValueError, match="kind requires a lowercase name"):
        keep(store, "Live run")


def test_the_file_is_in_wal_mode_with_a_schema_version(store):
    assert store.journal_mode() == "wal"
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_store_from_a_newer_lab_is_refused(tmp_path):
    path = tmp_path / "newer.sqlite3"
    ResultsStore(path)
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match=f"newer version of the lab \\(schema {SCHEMA_VERSION + 1}"):
        ResultsStore(path)


def test_a_corrupt_file_says_to_move_it_aside(tmp_path):
    path = tmp_path / "results.sqlite3"
    path.write_bytes(b"this is not a database, just text that someone saved here\n" * 100)
    with pytest.raises(StoreError, match="not a readable SQLite database.*Move it aside"):
        ResultsStore(path)


def test_a_saver_on_a_broken_store_warns_once_and_the_run_goes_on(tmp_path):
    store = ResultsStore(tmp_path / "runs.sqlite3")
    store.path.write_bytes(b"garbage " * 500)  # broken after opening: the next write fails
    said = []
    saver = RunSaver(store, "bench", target="t", on_error=said.append)
    saver._machine = MACHINE
    assert saver.begin() is None and saver.part("batch-size", {"x": 1}) is None
    assert saver.finish({"speedup": 1.0}) is None
    assert len(said) == 1 and "Move it aside" in said[0]


def test_a_long_run_is_partial_until_it_finishes_and_its_parts_point_at_it(store):
    saver = RunSaver(store, "bench", target="t", draft="d", settings={"k": 4})
    saver._machine = MACHINE
    run_id = saver.begin()
    assert store.get_run(run_id).status == "partial"
    saver.part("batch-size", {"batch_size": 1}, payload={"batch_size": 1})
    saver.part("batch-size", {"batch_size": 2}, payload={"batch_size": 2})
    assert saver.finish({"speedup": 1.2}, payload={"done": True}) == run_id
    run = store.get_run(run_id)
    assert (run.status, run.figures, run.payload) == ("complete", {"speedup": 1.2}, {"done": True})
    parts = store.list_runs(parent_id=run_id)
    assert [p.figures["batch_size"] for p in parts] == [2, 1] and {p.models["draft"] for p in parts} == {"d"}
    assert RunSaver(None, "live").finish({"speedup": 1.0}) is None  # --no-save keeps nothing


def test_two_threads_writing_at_once_lose_nothing(store):
    def write(name: str) -> None:
        for i in range(40):
            keep(store, "live", settings={"writer": name, "i": i})

    threads = [threading.Thread(target=write, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runs = store.list_runs()
    assert len(runs) == 80 and len({r.id for r in runs}) == 80
    assert sorted((r.settings["writer"], r.settings["i"]) for r in runs) == sorted(
        (name, i) for name in "ab" for i in range(40))


WRITER = """
import sys
from lab.store import ResultsStore
store = ResultsStore(sys.argv[1])
for i in range(int(sys.argv[3])):
    store.save_run("generate", settings={"writer": sys.argv[2], "i": i}, machine={"cpu": "x"})
"""


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_processes_opening_a_new_store_and_writing_at_once_lose_nothing(tmp_path):
    # Four writers race to create the file, switch it to WAL and make the schema
    # (a CI run once lost one to "database is locked" there), then write together.
    path = tmp_path / "shared.sqlite3"
    writers = [subprocess.Popen(python("-c", WRITER, str(path), name, "15"), env=env(), cwd=ROOT) for name in "abcd"]
    assert [w.wait(timeout=120) for w in writers] == [0, 0, 0, 0]
    runs = ResultsStore(path).list_runs()
    assert len(runs) == 60
    assert sorted((r.settings["writer"], r.settings["i"]) for r in runs) == sorted(
        (name, i) for name in "abcd" for i in range(15))


READER = """
import json, sys
from lab.store import list_runs
print(json.dumps([[r.id, r.kind, r.figures, r.payload] for r in list_runs(payload=True)]))
"""


def test_runs_survive_a_restart_and_read_the_same_from_a_new_process(tmp_path, monkeypatch):
    path = tmp_path / "restart.sqlite3"
    monkeypatch.setenv("LAB_RESULTS_DB", str(path))
    store = ResultsStore()  # the environment's path
    written = [save_run("live", figures={"speedup": 1.0 + i}, payload={"i": i}, machine=MACHINE) for i in range(3)]
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.list_runs()
    out = subprocess.run(python("-c", READER), env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [[i, "live", {"speedup": 1.0 + n}, {"i": n}] for n, i in reversed(list(enumerate(written)))]
    assert [r.id for r in list_runs()] == list(reversed(written))


def test_export_csv_and_json(store):
    keep(store, "live", settings={"k": 4}, figures={"speedup": 1.25, "per_position": [0.5]}, target="t", payload={"x": 1})
    keep(store, "calibrate", figures={"predicted_speedup": 0.9, "precision": "bf16"}, target="t")
    runs = store.list_runs(payload=True)
    rows = list(csv.DictReader(io.StringIO(export_runs(runs, "csv"))))
    assert [row["kind"] for row in rows] == ["calibrate", "live"]
    assert rows[1]["figure:speedup"] == "1.25" and json.loads(rows[1]["settings"]) == {"k": 4}
    assert "figure:per_position" not in rows[0]  # lists are in the JSON, not in a CSV cell
    data = json.loads(export_runs(runs, "json"))
    assert data[1]["payload"] == {"x": 1} and data[0]["figures"]["precision"] == "bf16"
    with pytest.raises(ValueError, match="'csv' or 'json'; got 'xml'"):
        export_runs(runs, "xml")
