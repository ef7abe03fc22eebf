"""Tables of the History page: kept runs (``lab.store.RunRecord``) as rows, and two runs side by side. No streamlit."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from lab.store import RunRecord

# headline figures shown as columns, in this order, with their column names
FIGURE_COLUMNS = {
    "speedup": "speedup",
    "latency_speedup": "latency speedup",
    "throughput_speedup": "throughput speedup",
    "acceptance_rate": "acceptance rate",
    "mean_acceptance_length": "mean acceptance length",
    "tokens_per_s": "tokens/s",
    "predicted_speedup": "predicted speedup",
}
# settings a one-line summary names first (the rest follow while the line is short)
SUMMARY_FIRST = ("drafter", "k", "K", "ks", "drafters", "batch_sizes", "max_new_tokens", "max new tokens",
                 "temperature", "engine", "precision", "device")
SUMMARY_CHARS = 90


# the "When" filter of the History page: label -> how far back it reaches (None: no limit)
WINDOWS = {"any time": None, "last hour": timedelta(hours=1), "last 24 hours": timedelta(days=1),
           "last 7 days": timedelta(days=7)}


def within(runs: list[RunRecord], window: str, now: datetime) -> list[RunRecord]:
    """The runs kept no earlier than ``now`` minus the window named in ``WINDOWS``; KeyError for another name."""
    reach = WINDOWS[window]
    if reach is None:
        return runs
    return [r for r in runs if datetime.fromisoformat(r.created_at) >= now - reach]


def when(created_at: str) -> str:
    """``2026-12-08T10:11:12.123456+00:00`` -> ``2026-12-08 10:11 UTC``."""
    return created_at[:16].replace("T", " ") + " UTC"


def models(record: RunRecord) -> str:
    target, draft = record.models.get("target"), record.models.get("draft")
    return (target or "—") + (f" + {draft}" if draft else "")


def machine(record: RunRecord) -> str:
    """The device (or CPU model) and the short machine key."""
    info = record.machine or {}
    where = info.get("device") if info.get("device") not in (None, "cpu") else info.get("cpu", "?")
    return f"{where} ({record.machine_key})" if record.machine_key else str(where)


def settings_summary(settings: dict[str, Any]) -> str:
    """A short ``name value`` line of the settings that tell runs apart."""
    names = [n for n in SUMMARY_FIRST if n in settings] + [n for n in settings if n not in SUMMARY_FIRST]
    parts: list[str] = []
    for name in names:
        value = settings[name]
        if value is None or isinstance(value, (dict,)) or name in ("target", "prompts", "machine"):
            continue
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value).removeprefix("torch.")
        if len(text) > 40:
            continue
        parts.append(f"{name} {text}")
        if sum(len(p) + 3 for p in parts) > SUMMARY_CHARS:
            break
    return " · ".join(parts)


def label(record: RunRecord) -> str:
    """One line naming a run in a select box; a run that is not complete says so ("#3 batch (partial) · ...": a
    sweep still running, or cut short, whose finished parts are kept)."""
    status = "" if record.status == "complete" else f" ({record.status})"
    return f"#{record.id} {record.kind}{status} · {when(record.created_at)} · {models(record)}"


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: id, when, kind, status, models, settings, machine, headline figures."""
    rows = []
    for r in records:
        row = {"id": r.id, "when": when(r.created_at), "kind": r.kind, "status": r.status, "models": models(r),
               "settings": settings_summary(r.settings), "machine": machine(r)}
        for name, column in FIGURE_COLUMNS.items():
            value = r.figures.get(name)
            row[column] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if r.parent_id is not None:
            row["part of"] = r.parent_id
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.dropna(axis=1, how="all") if not frame.empty else frame


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def side_by_side(a: RunRecord, b: RunRecord) -> pd.DataFrame:
    """Two runs' kind, models, machine, figures and settings as rows, one column each, and whether they differ."""
    def fields(r: RunRecord) -> dict[str, str]:
        out = {"kind": r.kind, "when": when(r.created_at), "status": r.status, "models": models(r),
               "machine": machine(r)}
        out |= {f"figure: {name}": _cell(value) for name, value in r.figures.items()}
        out |= {f"setting: {name}": _cell(value) for name, value in r.settings.items()
                if name not in ("prompts", "results")}
        return out

    left, right = fields(a), fields(b)
    names = list(left) + [n for n in right if n not in left]
    return pd.DataFrame({
        "": names,
        f"#{a.id}": [left.get(n, "—") for n in names],
        f"#{b.id}": [right.get(n, "—") for n in names],
        "differs": [left.get(n, "—") != right.get(n, "—") for n in names],
    })


def highlight_differences(frame: pd.DataFrame):
    """A Styler shading the rows whose values differ (those a reader looks at first)."""
    return frame.style.apply(
        lambda row: ["background-color: rgba(255, 196, 0, 0.25)" if row["differs"] else "" for _ in row], axis=1)
