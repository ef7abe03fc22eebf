"""The results store: every finished run kept, in one SQLite file a team's sessions share.

Where: ``$LAB_RESULTS_DB`` if set, else ``results.sqlite3`` in the lab's cache
folder (``lab.models.cache_dir()``: ``$LAB_CACHE_DIR`` or
``~/.cache/speculative-decoding-lab``); an explicit ``path`` wins over both.

A run is one row (a frozen :class:`RunRecord` when read back):

- id: an integer, growing; kind: what made it (``KINDS``: live, compare, step,
  batch, batch-size, calibrate, serve, generate, bench, ...);
- created_at: UTC, ISO 8601 with microseconds (``2026-12-08T10:11:12.123456+00:00``);
- settings, figures, payload: JSON. figures holds the headline numbers
  (speedup, acceptance_rate, mean_acceptance_length, tokens_per_s, ...);
  payload the whole result, from which its page draws it again;
- models: {"target": name, "draft": name or None}; machine:
  ``lab.hardware.machine_info()`` with its ``machine_key`` beside it;
- status: "complete", "partial" (still running, or stopped before its end:
  a long run is saved "partial" when it starts and its finished parts point
  at it through parent_id) or "cancelled";
- loaded, load_note: whether the machine was busy during the run, and why
  (None: not measured).

Concurrency: one connection per call, WAL journal (readers never wait for a
writer), ``timeout`` seconds of waiting for a lock, so several Streamlit
sessions (threads) and CLI processes may write at once without losing a row.
The schema version is SQLite's ``PRAGMA user_version``; a file from a newer
lab, or one that is not a SQLite database, raises :class:`StoreError` saying
what to do.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

SCHEMA_VERSION = 1
DB_FILE = "results.sqlite3"
ENV_VAR = "LAB_RESULTS_DB"
KINDS = ("live", "compare", "compare-prompt", "step", "batch", "batch-size", "calibrate", "serve", "serve-level",
         "generate", "bench", "peer", "engine-bench", "workload")
"""The kinds the lab saves; another lowercase name (letters, digits, '-') is accepted too."""
STATUSES = ("complete", "partial", "cancelled")
Status = Literal["complete", "partial", "cancelled"]
LOCK_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    created_at TEXT NOT NULL,
    status TEXT NOT NULL,
    parent_id INTEGER,
    target TEXT,
    draft TEXT,
    machine_key TEXT,
    machine TEXT NOT NULL,
    settings TEXT NOT NULL,
    figures TEXT NOT NULL,
    payload TEXT,
    loaded INTEGER,
    load_note TEXT
);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at);
CREATE INDEX IF NOT EXISTS runs_kind ON runs (kind);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_id);
"""
_COLUMNS = ("id", "kind", "created_at", "status", "parent_id", "target", "draft", "machine_key", "machine",
            "settings", "figures", "payload", "loaded", "load_note")


class StoreError(RuntimeError):
    """The results store cannot be used as it is; the message says what to do."""


@dataclass(frozen=True)
class RunRecord:
    """One stored run (see the module docstring for each field)."""

    id: int
    kind: str
    created_at: str
    status: str
    settings: dict[str, Any]
    figures: dict[str, Any]
    models: dict[str, str | None]
    machine: dict[str, Any]
    machine_key: str | None = None
    parent_id: int | None = None
    payload: Any = field(default=None, repr=False)
    loaded: bool | None = None
    load_note: str | None = None

    def as_dict(self, payload: bool = False) -> dict[str, Any]:
        """Plain JSON-ready fields, the payload only when asked for."""
        out = {name: getattr(self, name) for name in (
            "id", "kind", "created_at", "status", "parent_id", "models", "machine_key", "machine", "settings",
            "figures", "loaded", "load_note")}
        if payload:
            out["payload"] = self.payload
        return out


def default_path() -> Path:
    """``$LAB_RESULTS_DB``, else ``results.sqlite3`` in ``lab.models.cache_dir()``."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    from lab.models.presets import cache_dir  # no torch behind it

    return cache_dir() / DB_FILE


def now_utc() -> str:
    """The current UTC time as the store writes it (ISO 8601, microseconds, ``+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ResultsStore:
    """The store at ``path`` (default :func:`default_path`); opened and checked on construction.

    Holds no connection: every call opens its own and closes it, so one object
    may serve many threads, and ``close()`` only marks it closed.
    """

    def __init__(self, path: str | Path | None = None, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.timeout_s = timeout_s
        self.closed = False
        self._init()

    # ------------------------------------------------------------ connection and schema

    def _connect(self) -> sqlite3.Connection:
        if self.closed:
            raise StoreError(f"the results store {self.path} was closed; open it again with ResultsStore(path)")
        try:
            connection = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
            connection.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
        except sqlite3.Error as error:
            raise self._explain(error) from error
        return connection

    def _explain(self, error: sqlite3.Error) -> StoreError:
        text = str(error)
        if isinstance(error, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
            return StoreError(
                f"The results store {self.path} is not a readable SQLite database ({text}). Move it aside "
                f"(mv '{self.path}' '{self.path}.broken') and the lab starts a new, empty store there; or set "
                f"{ENV_VAR} to another file. Runs are not saved until then."
            )
        return StoreError(f"The results store {self.path} cannot be used: {text}. Check that its folder is writable, "
                          f"or set {ENV_VAR} to another file.")

    def _init(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot create the folder of the results store {self.path}: {error}; "
                             f"set {ENV_VAR} to a file in a writable folder") from error
        connection = self._connect()
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"The results store {self.path} was written by a newer version of the lab (schema {version}; "
                    f"this lab reads schema {SCHEMA_VERSION} and older). Update the lab, or set {ENV_VAR} to another "
                    "file to keep this one as it is."
                )
            self._use_wal(connection)
            if version < SCHEMA_VERSION:
                connection.execute("BEGIN IMMEDIATE")  # one writer creates it; a second finds it made
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                connection.execute("COMMIT")
        except sqlite3.Error as error:
            raise self._explain(error) from error
        finally:
            connection.close()

    def _use_wal(self, connection: sqlite3.Connection) -> None:
        """Switch the file to WAL (persistent: once per file), retrying while another process holds it.

        SQLite answers ``database is locked`` at once, without its busy handler, when a
        second connection changes the journal mode while the first creates the schema;
        so two processes opening a new store together retry here until ``timeout_s``.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    connection.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) and "busy" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.01, 0.05))

    def _run(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        """One statement in its own connection and transaction.

        Returns the rows of a SELECT, [(new id,)] after an INSERT, [(rows changed,)] after anything else.
        """
        verb = sql.lstrip().split(None, 1)[0].upper()
        connection = self._connect()
        try:
            connection.execute("BEGIN" if verb == "SELECT" else "BEGIN IMMEDIATE")  # writers queue at the start
            cursor = connection.execute(sql, parameters)
            rows = cursor.fetchall()
            connection.execute("COMMIT")
            if verb == "INSERT":
                return [(cursor.lastrowid,)]
            return rows if verb == "SELECT" else [(cursor.rowcount,)]
        except sqlite3.Error as error:
            raise self._explain(error) from error
        finally:
            connection.close()  # an open transaction rolls back

    def close(self) -> None:
        """Mark this object closed (it holds no open connection between calls)."""
        self.closed = True

    def journal_mode(self) -> str:
        """The file's journal mode ("wal")."""
        connection = self._connect()
        try:
            return connection.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            connection.close()

    # ------------------------------------------------------------ the API

    def save_run(
        self,
        kind: str,
        *,
        settings: dict[str, Any] | None = None,
        figures: dict[str, Any] | None = None,
        target: str | None = None,
        draft: str | None = None,
        machine: dict[str, Any] | None = None,
        device: str = "cpu",
        status: Status = "complete",
        parent_id: int | None = None,
        payload: Any = None,
        loaded: bool | None = None,
        load_note: str | None = None,
        created_at: str | None = None,
    ) -> int:
        """Keep one run; returns its id.

        kind: what made it (``KINDS``, or another lowercase name). settings,
        figures, payload: JSON-ready values (NaN and infinities are written as
        null, except in the payload, which keeps them). machine: ``lab.hardware.machine_info(device)`` when not given.
        status: "complete", "partial" or "cancelled". parent_id: the run this is
        a part of (a sweep's batch size points at the sweep). loaded, load_note:
        whether the machine was busy (None: not measured).

        Raises ValueError for an unknown status or a malformed kind, StoreError
        when the file cannot be written.
        """
        _check_kind(kind)
        _check_status(status)
        if machine is None:
            from lab.hardware import machine_info

            machine = machine_info(device)
        from lab.hardware import machine_key

        row = {
            "kind": kind, "created_at": created_at or now_utc(), "status": status, "parent_id": parent_id,
            "target": target, "draft": draft, "machine_key": machine_key(machine), "machine": _dumps(machine),
            "settings": _dumps(settings or {}), "figures": _dumps(figures or {}),
            "payload": None if payload is None else _dumps(payload, exact=True),
            "loaded": None if loaded is None else int(bool(loaded)), "load_note": load_note,
        }
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        return int(self._run(f"INSERT INTO runs ({names}) VALUES ({marks})", list(row.values()))[0][0])

    def update_run(
        self,
        run_id: int,
        *,
        status: Status | None = None,
        settings: dict[str, Any] | None = None,
        figures: dict[str, Any] | None = None,
        payload: Any = None,
        loaded: bool | None = None,
        load_note: str | None = None,
    ) -> None:
        """Change the given fields of run ``run_id`` (the others stay); e.g. a long run's status when it ends.

        Raises KeyError when there is no such run, ValueError for an unknown status.
        """
        changes: dict[str, Any] = {}
        if status is not None:
            _check_status(status)
            changes["status"] = status
        for name, value in (("settings", settings), ("figures", figures), ("payload", payload)):
            if value is not None:
                changes[name] = _dumps(value, exact=name == "payload")
        if loaded is not None:
            changes["loaded"] = int(bool(loaded))
        if load_note is not None:
            changes["load_note"] = load_note
        if not changes:
            self.get_run(run_id)  # still refuse an unknown id
            return
        assignments = ", ".join(f"{name} = ?" for name in changes)
        (count,) = self._run(f"UPDATE runs SET {assignments} WHERE id = ?", [*changes.values(), int(run_id)])[0]
        if count == 0:
            raise KeyError(f"no stored run has id {run_id}")

    def list_runs(
        self,
        kind: str | Sequence[str] | None = None,
        model: str | None = None,
        since: str | datetime | None = None,
        limit: int | None = None,
        *,
        parent_id: int | None = None,
        top_level: bool = False,
        payload: bool = False,
    ) -> list[RunRecord]:
        """Stored runs, newest first.

        kind: one kind or several. model: runs whose target or draft is this
        name. since: runs created at or after this time (a datetime, naive =
        UTC, or an ISO string). limit: at most this many. parent_id: only the
        parts of that run. top_level: leave parts out. payload: read the
        payloads too (they can be large; ``get_run`` always reads it).
        """
        where, parameters = [], []
        if kind:
            kinds = [kind] if isinstance(kind, str) else list(kind)
            where.append(f"kind IN ({', '.join('?' for _ in kinds)})")
            parameters += kinds
        if model:
            where.append("(target = ? OR draft = ?)")
            parameters += [model, model]
        if since is not None:
            where.append("created_at >= ?")
            parameters.append(_iso(since))
        if parent_id is not None:
            where.append("parent_id = ?")
            parameters.append(int(parent_id))
        if top_level:
            where.append("parent_id IS NULL")
        columns = ", ".join(name if name != "payload" or payload else "NULL" for name in _COLUMNS)
        sql = f"SELECT {columns} FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC, id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_record(row) for row in self._run(sql, parameters)]

    def get_run(self, run_id: int) -> RunRecord:
        """The run with this id, payload included. Raises KeyError when there is none."""
        rows = self._run(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE id = ?", [int(run_id)])
        if not rows:
            raise KeyError(f"no stored run has id {run_id}")
        return _record(rows[0])

    def delete_run(self, run_id: int) -> int:
        """Delete a run and its parts; returns how many rows went. Raises KeyError when there is no such run."""
        (count,) = self._run("DELETE FROM runs WHERE id = ? OR parent_id = ?", [int(run_id), int(run_id)])[0]
        if count == 0:
            raise KeyError(f"no stored run has id {run_id}")
        return count


class RunSaver:
    """One run being kept, as it goes: the way the CLI and the app save.

    A short run calls ``finish(...)`` once. A long one calls ``begin()`` first
    (the run is saved "partial" at once), ``part(...)`` for each finished part
    (saved with parent_id = the run), and ``finish(...)`` at the end, which
    sets its status, figures and payload; a run killed on the way stays
    "partial" with the parts it finished.

    machine: ``lab.hardware.machine_info`` as the run measured it (default: read
    for ``device`` at the first save).
    store: None keeps nothing (``--no-save``). A store that fails (a corrupt
    file, a full disk) never stops the run: ``on_error(message)`` is told once
    and nothing more is saved.
    """

    def __init__(self, store: ResultsStore | None, kind: str, *, target: str | None = None, draft: str | None = None,
                 device: str = "cpu", settings: dict[str, Any] | None = None,
                 on_error: Callable[[str], None] | None = None, machine: dict[str, Any] | None = None) -> None:
        _check_kind(kind)
        self.store, self.kind, self.settings = store, kind, dict(settings or {})
        self.models = {"target": target, "draft": draft}
        self.device, self.on_error = device, on_error
        self.id: int | None = None
        self.part_ids: list[int] = []
        self._machine = machine  # None: lab.hardware.machine_info(device), read at the first save

    def _try(self, action: Callable[[], Any]) -> Any:
        if self.store is None:
            return None
        try:
            return action()
        except StoreError as error:
            self.store = None  # told once; the run goes on unsaved
            if self.on_error is not None:
                self.on_error(str(error))
            return None

    def _fields(self) -> dict[str, Any]:
        if self._machine is None:
            from lab.hardware import machine_info

            self._machine = machine_info(self.device)
        return {"target": self.models["target"], "draft": self.models["draft"], "machine": self._machine}

    def begin(self) -> int | None:
        """Save the run as "partial" now (a long run, before its first part); returns its id."""
        self.id = self._try(lambda: self.store.save_run(self.kind, settings=self.settings, status="partial",
                                                        **self._fields()))
        return self.id

    def part(self, kind: str, figures: dict[str, Any], payload: Any = None,
             settings: dict[str, Any] | None = None) -> int | None:
        """Save one finished part of the run (kind e.g. "batch-size"), pointing at it; returns the part's id."""
        if self.id is None and self.store is not None:
            self.begin()
        part_id = self._try(lambda: self.store.save_run(kind, settings=settings or self.settings, figures=figures,
                                                        payload=payload, parent_id=self.id, **self._fields()))
        if part_id is not None:
            self.part_ids.append(part_id)
        return part_id

    def finish(self, figures: dict[str, Any], payload: Any = None, status: Status = "complete",
               settings: dict[str, Any] | None = None, loaded: bool | None = None,
               load_note: str | None = None) -> int | None:
        """Save the finished run (or complete the one ``begin`` saved); returns its id (None: not saved)."""
        if settings is not None:
            self.settings = dict(settings)
        if self.id is None:
            self.id = self._try(lambda: self.store.save_run(
                self.kind, settings=self.settings, figures=figures, payload=payload, status=status, loaded=loaded,
                load_note=load_note, **self._fields()))
        else:
            self._try(lambda: self.store.update_run(self.id, status=status, settings=self.settings, figures=figures,
                                                    payload=payload, loaded=loaded, load_note=load_note))
        return self.id if self.store is not None else None


# ---------------------------------------------------------------- module-level API on the default store


def open_store(path: str | Path | None = None) -> ResultsStore:
    """The store at ``path``, else at :func:`default_path` (``$LAB_RESULTS_DB`` or the cache folder)."""
    return ResultsStore(path)


def save_run(kind: str, *, path: str | Path | None = None, **fields: Any) -> int:
    """:meth:`ResultsStore.save_run` on the store at ``path`` (default: :func:`default_path`)."""
    return open_store(path).save_run(kind, **fields)


def update_run(run_id: int, *, path: str | Path | None = None, **fields: Any) -> None:
    """:meth:`ResultsStore.update_run` on the store at ``path``."""
    open_store(path).update_run(run_id, **fields)


def list_runs(kind=None, model=None, since=None, limit=None, *, path: str | Path | None = None,
              **options: Any) -> list[RunRecord]:
    """:meth:`ResultsStore.list_runs` on the store at ``path``: newest first."""
    return open_store(path).list_runs(kind, model, since, limit, **options)


def get_run(run_id: int, *, path: str | Path | None = None) -> RunRecord:
    """:meth:`ResultsStore.get_run` on the store at ``path``."""
    return open_store(path).get_run(run_id)


def delete_run(run_id: int, *, path: str | Path | None = None) -> int:
    """:meth:`ResultsStore.delete_run` on the store at ``path``."""
    return open_store(path).delete_run(run_id)


def export_runs(records: Iterable[RunRecord], format: Literal["csv", "json"] = "csv") -> str:
    """The runs as text: "json", a list of ``RunRecord.as_dict(payload=True)``; "csv", one row per run with
    its fields, settings as JSON text, and one column per figure (``figure:<name>``, the union over the runs).

    Raises ValueError for another format.
    """
    records = list(records)
    if format == "json":  # strict JSON: a payload's NaN becomes null here
        return json.dumps([_finite(r.as_dict(payload=True)) for r in records], indent=2, allow_nan=False)
    if format != "csv":
        raise ValueError(f"export format requires 'csv' or 'json'; got {format!r}")
    figure_names = sorted({name for r in records for name, value in r.figures.items() if _is_scalar(value)})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "kind", "created_at", "status", "parent_id", "target", "draft", "machine_key",
                     "loaded", "load_note", "settings", *(f"figure:{name}" for name in figure_names)])
    for r in records:
        writer.writerow([r.id, r.kind, r.created_at, r.status, r.parent_id, r.models.get("target"),
                         r.models.get("draft"), r.machine_key, r.loaded, r.load_note,
                         json.dumps(r.settings, sort_keys=True),
                         *(r.figures.get(name) if _is_scalar(r.figures.get(name)) else None for name in figure_names)])
    return out.getvalue()


# ---------------------------------------------------------------- helpers


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", kind):
        raise ValueError(f"a run's kind requires a lowercase name such as {', '.join(KINDS[:4])}, ...; got {kind!r}")


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"a run's status requires one of {', '.join(STATUSES)}; got {status!r}")


def _finite(value: Any) -> Any:
    """NaN and infinities become None (JSON has neither); containers are walked."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any, exact: bool = False) -> str:
    """JSON text; NaN and infinities become null, except in a payload (``exact``), which keeps them as Python's
    json writes them (NaN), so that a page reads back the very result it drew."""
    if exact:
        return json.dumps(value, default=str)
    return json.dumps(_finite(value), allow_nan=False, default=str)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def _iso(when: str | datetime) -> str:
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _record(row: tuple) -> RunRecord:
    data = dict(zip(_COLUMNS, row))
    return RunRecord(
        id=data["id"], kind=data["kind"], created_at=data["created_at"], status=data["status"],
        settings=json.loads(data["settings"]), figures=json.loads(data["figures"]),
        models={"target": data["target"], "draft": data["draft"]}, machine=json.loads(data["machine"]),
        machine_key=data["machine_key"], parent_id=data["parent_id"],
        payload=None if data["payload"] is None else json.loads(data["payload"]),
        loaded=None if data["loaded"] is None else bool(data["loaded"]), load_note=data["load_note"],
    )
