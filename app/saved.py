"""What the pages keep in the results store (``lab.store``), and how a kept run opens again on its page.

Each page calls one function here at the point its run finishes (``keep_live``,
``keep_step``, ``keep_calibration``, ``keep_serve``, ``keep_workload``), or, for a long run, asks
for a saver first and hands the study its per-part callback (``sweep_part``,
``compare_part``) so each finished batch size or prompt is kept the moment it
finishes. A store that cannot be used shows a warning and the page goes on.

``reopen(record)`` puts a kept run where its page reads its last result in
``st.session_state`` and returns that page's path, for ``st.switch_page``.

The Live page's result (``app.state.LiveResult``: runs, trace steps, token
pieces, stats) and a Step-through run (its token trees included) are kept as a tagged JSON tree of
their dataclasses
(``to_tree``/``from_tree``), read back only into the classes of ``TREE_MODULES``.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import fields, is_dataclass
from typing import Any

import streamlit as st
import torch

from lab import figures as headline
from lab.store import ResultsStore, RunRecord, RunSaver, StoreError

ERROR_KEY = "history:store_error"  # the last store error this session saw (shown once as a warning)
STEP_REOPEN_KEY = "step:reopen"  # a kept step-through run the Step-through page turns into its session
TREE_MODULES = ("app.state", "app.render", "lab.trace", "lab.metrics", "lab.studies.precision", "lab.tree")
TENSOR_DTYPES = ("int64", "float32")  # a kept tensor (a step's token tree) is one of these, on the CPU

# kind -> (page script, the session key its page reads its last result from)
PAGES = {
    "live": ("app_pages/live.py", "live:result"),
    "step": ("app_pages/step.py", STEP_REOPEN_KEY),
    "compare": ("app_pages/compare.py", "compare:comparison"),
    "batch": ("app_pages/batch.py", "batch:sweep"),
    "bench": ("app_pages/batch.py", "batch:sweep"),
    "serve": ("app_pages/serve.py", "serve:bench"),
    "calibrate": ("app_pages/theory.py", None),
    "workload": ("app_pages/workload.py", "workload:result"),
}


# ---------------------------------------------------------------- the store, as the app opens it


def store() -> ResultsStore | None:
    """The shared store (``$LAB_RESULTS_DB`` or the cache folder's), or None with the reason kept for a warning."""
    try:
        return ResultsStore()
    except StoreError as error:
        st.session_state[ERROR_KEY] = str(error)
        return None


def _warn(message: str) -> None:
    st.session_state[ERROR_KEY] = message
    st.warning(f"This run is shown but not saved: {message}", icon=":material/database:")


def saver(kind: str, target: str | None, draft: str | None, device: str, settings: dict | None = None,
          on_error=None) -> RunSaver:
    """A ``RunSaver`` on the shared store; its errors become a warning on the page, or go to ``on_error(message)``
    (a run finishing in a worker thread, where no ``st`` call may be made)."""
    if on_error is None:
        return RunSaver(store(), kind, target=target, draft=draft, device=device, settings=settings, on_error=_warn)
    try:
        shared = ResultsStore()
    except StoreError as error:
        on_error(str(error))
        shared = None
    return RunSaver(shared, kind, target=target, draft=draft, device=device, settings=settings, on_error=on_error)


# ---------------------------------------------------------------- what each page keeps


def keep_live(result, device: str, on_error=None) -> int | None:
    """Keep a Live run (``app.state.LiveResult``): figures of the speculative run, speedup when measured (the
    interleaved pairs' pooled tokens/s). on_error: see ``saver`` (the Live worker thread passes one)."""
    stats = result.speculative.stats
    figures = headline.from_stats(stats.as_dict())
    if result.baseline is not None:
        figures = headline.with_speedup(figures, result.speculative_tokens_per_s, result.baseline_tokens_per_s)
    draft = next((m.name for m in result.memory if m.role == "draft" and m.weight_bytes), None)
    settings = dict(result.settings) | {"prompt_tokens": len(result.speculative.prompt_ids)}
    try:
        payload = to_tree(result)
    except TypeError:  # a field this module cannot write: keep the figures, the page cannot reopen it
        payload = None
    return saver("live", result.settings.get("target"), draft, device, settings, on_error).finish(figures, payload=payload)


def keep_step(session) -> int | None:
    """Keep a finished step-through run (the page's ``StepSession``, without its generator and tokenizer)."""
    stats = session.stats
    try:
        payload = {name: to_tree(getattr(session, name)) for name in (
            "prompt_ids", "greedy", "settings", "prefill_ms", "steps", "pieces", "committed", "starts", "finished",
            "eos_token_ids", "stats", "form")}
    except TypeError:
        payload = None
    form = session.form
    draft = form.get("step.draft") if form.get("step.drafter") == "draft-model" else None
    return saver("step", session.settings.get("target"), draft, "cpu", session.settings).finish(
        headline.from_stats(stats.as_dict()), payload=payload)


def keep_calibration(calibration) -> int | None:
    """Keep a calibration the Theory page measured (``lab.studies.calibrate.Calibration``)."""
    data = calibration.as_dict()
    settings = {"target": calibration.target, "draft": calibration.draft, "drafter": calibration.drafter,
                "acceptance": calibration.acceptance}
    return RunSaver(store(), "calibrate", target=calibration.target, draft=calibration.draft, settings=settings,
                    on_error=_warn, machine=data["machine"]).finish(headline.from_calibration(data), payload=data)


def keep_serve(bench: dict) -> int | None:
    """Keep a serve bench (its JSON dict); one stopped early is "partial"."""
    settings = bench.get("settings") or {}
    models = {e.get("model") for e in settings.get("endpoints", []) if e.get("model")}
    return saver("serve", next(iter(models), None), None, "cpu", settings).finish(
        headline.from_serve_bench(bench), payload=bench, status="partial" if bench.get("stopped") else "complete")


def keep_workload(data: dict, flip: str | None, settings: dict) -> int | None:
    """Keep a Workload map (``WorkloadMap.as_dict()``) with its sensitivity sentence; settings: the page's form."""
    target = settings.get("workload.target") if settings.get("workload.costs", "").startswith("This machine") else None
    return saver("workload", target, None, "cpu", settings).finish(headline.from_workload(data),
                                                                    payload={"map": data, "flip": flip})


def sweep_part(run: RunSaver):
    """``run_sweep``'s on_part: keep each finished batch size under the sweep."""
    return lambda part: run.part("batch-size", headline.from_batch_size(part), payload=part)


def finish_sweep(run: RunSaver, sweep: dict) -> int | None:
    """Complete a kept sweep with its JSON dict (cancelled or stopped: "cancelled"); one that finished no batch
    size, and so kept no part, is not kept at all (the page shows a notice instead)."""
    if not sweep.get("results") and run.id is None:
        return None
    status = sweep.get("settings", {}).get("status")
    return run.finish(headline.from_sweep(sweep), payload=sweep, settings=sweep.get("settings"),
                      status="complete" if status in (None, "complete") else "cancelled")


def compare_part(run: RunSaver):
    """``run_comparison``'s on_part: keep each finished prompt under the comparison."""
    return lambda part: run.part("compare-prompt", headline.from_compare_runs(part["runs"]), payload=part)


def finish_comparison(run: RunSaver, comparison) -> int | None:
    """Complete a kept comparison (``lab.studies.compare.Comparison``)."""
    status = comparison.settings.get("status")
    return run.finish(headline.from_summary_rows(comparison.summary().to_dict("records")),
                      payload=json.loads(comparison.to_json()), settings=comparison.settings,
                      status="complete" if status in (None, "complete") else "cancelled")


# ---------------------------------------------------------------- reopening


def can_reopen(record: RunRecord) -> bool:
    """A page can draw this run again (its kind has a page and it kept a payload, or parts to build one from)."""
    return record.kind in PAGES and (record.payload is not None or record.kind in ("batch", "bench", "compare"))


def reopen(record: RunRecord, kept: ResultsStore) -> str:
    """Put the kept run where its page reads its last result; returns the page's path for ``st.switch_page``.

    Raises ValueError when the run cannot be drawn again (no page for its kind, or nothing kept to draw).
    """
    if record.kind not in PAGES:
        raise ValueError(f"a {record.kind} run has no page to open it on; its figures and settings are shown here")
    page, session_key = PAGES[record.kind]
    payload = record.payload if record.payload is not None else _from_parts(record, kept)
    s = st.session_state
    if record.kind == "live":
        s[session_key] = from_tree(payload)
    elif record.kind == "step":
        s[session_key] = {name: from_tree(value) for name, value in payload.items()}
    elif record.kind == "compare":
        from lab.studies.compare import Comparison

        s[session_key] = comparison = Comparison.from_json(json.dumps(payload))
        comparison.settings["loaded_from"] = _source(record)
    elif record.kind in ("batch", "bench"):
        from app.render_batch import load_sweep

        s[session_key] = sweep = load_sweep(json.dumps(payload))
        sweep.setdefault("settings", {})["loaded_from"] = _source(record)
        s.pop("batch:notice", None)
    elif record.kind == "serve":
        from app.render_serve import load_bench

        s[session_key] = bench = load_bench(json.dumps(payload))
        bench.setdefault("settings", {})["loaded_from"] = _source(record)
        s.pop("serve:notice", None)
    elif record.kind == "workload":
        s[session_key] = (payload["map"] | {"loaded_from": _source(record)}, payload.get("flip"))
    elif record.kind == "calibrate":
        from app import calibration
        from lab.studies.calibrate import Calibration

        calibration.use_on_sliders(Calibration.from_dict(payload))
    return page


def _source(record: RunRecord) -> str:
    """Where a reopened result came from, as its page names a loaded file (the form above it is the user's own)."""
    return f"History run #{record.id} ({record.created_at[:16].replace('T', ' ')} UTC; the form above keeps your settings)"


def _from_parts(record: RunRecord, kept: ResultsStore) -> Any:
    """A long run cut short before its end (no payload): rebuilt from the parts it kept."""
    parts = sorted(kept.list_runs(parent_id=record.id, payload=True), key=lambda r: r.id)
    if not parts:
        raise ValueError(f"run {record.id} ({record.kind}, {record.status}) kept no finished part to show")
    if record.kind == "compare":
        return {"settings": record.settings | {"status": record.status},
                "prompts": [p.payload["prompt"] for p in parts],
                "runs": [run | {"prompt_index": i} for i, p in enumerate(parts) for run in p.payload["runs"]]}
    results = [p.payload for p in parts]
    return {"drafter": record.settings.get("drafter", "?"), "k": record.settings.get("k"),
            "settings": record.settings | {"status": "cancelled"}, "batch_sizes": [r["batch_size"] for r in results],
            "results": results, "crossover_batch_size": None, "throughput_crossover_batch_size": None}


# ---------------------------------------------------------------- dataclass trees <-> JSON


def to_tree(value: Any) -> Any:
    """A JSON-ready tree of ``value``: dataclasses tagged with their class, tuples, non-string keys and NaN kept;
    int64 / float32 tensors (a step's ``lab.tree.DraftTree``) as their values, dtype and shape."""
    if is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__type__": f"{cls.__module__}:{cls.__qualname__}",
                **{f.name: to_tree(getattr(value, f.name)) for f in fields(value) if f.init}}
    if isinstance(value, tuple):
        return {"__tuple__": [to_tree(v) for v in value]}
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: to_tree(v) for k, v in value.items()}
        return {"__items__": [[to_tree(k), to_tree(v)] for k, v in value.items()]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and str(value.dtype).removeprefix("torch.") in TENSOR_DTYPES:
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise TypeError("a kept tensor holds finite values only")
        return {"__tensor__": value.cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape)}
    raise TypeError(f"a kept result holds only dataclasses, containers and plain values; got {type(value).__name__}")


def from_tree(tree: Any) -> Any:
    """The value ``to_tree`` made the tree of. Raises ValueError for a class outside ``TREE_MODULES``."""
    if isinstance(tree, list):
        return [from_tree(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tuple__" in tree:
        return tuple(from_tree(v) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {from_tree(k): from_tree(v) for k, v in tree["__items__"]}
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__tensor__" in tree:
        if tree.get("dtype") not in TENSOR_DTYPES:
            raise ValueError(f"a kept tensor may only be of {', '.join(TENSOR_DTYPES)}; got {tree.get('dtype')}")
        return torch.tensor(tree["__tensor__"], dtype=getattr(torch, tree["dtype"])).reshape(tree["shape"])
    if "__type__" in tree:
        module, _, name = tree["__type__"].partition(":")
        if module not in TREE_MODULES:
            raise ValueError(f"a kept result may only hold classes of {', '.join(TREE_MODULES)}; got {module}:{name}")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: from_tree(v) for k, v in tree.items() if k != "__type__"})
    return {k: from_tree(v) for k, v in tree.items()}
