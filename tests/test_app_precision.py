"""The app's precision controls: per-model precision in the sidebar, models cached per precision,
the full-precision target beside a quantised one, and the memory of a run.

Tiny random Llamas are saved as bf16 folders and picked as local folders, so the
app loads and quantises them for real (bitsandbytes on the CPU) in under a second.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

from app import precision, resources, state, widgets  # noqa: E402
from app_util import MAIN, TIMEOUT_S, click, key  # noqa: E402
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402
from lab.hardware import host_float_precision  # noqa: E402
from lab.studies.precision import MemoryUse  # noqa: E402

LOCAL_FOLDER = widgets.LOCAL_FOLDER
HOST = host_float_precision("cpu")  # what "auto" resolves to here: measured, bf16 or fp32
TINY_PROMPT = "t3 t4 t5 t6 t3 t4 t5 t6 t3 t4"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """A tiny target (3 layers) and draft (1 layer) saved in bf16 with one tokenizer; sizes fit 4-bit blocks of 64."""
    out = {}
    for role, seed, layers in (("target", 0, 3), ("draft", 1, 1)):
        folder = tmp_path_factory.mktemp(role)
        tiny_llama(seed=seed, layers=layers, hidden=64).to(torch.bfloat16).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        out[role] = str(folder)
    return out


@pytest.fixture(autouse=True)
def fresh_store():
    """No model loaded by another test (the store is process-wide), none left behind."""
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()


def app(folders, **sidebar) -> AppTest:
    """The app after a first run, the tiny target picked as a local folder, sidebar values set (not yet rerun)."""
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    assert not at.exception
    at.session_state[key("live.target")] = LOCAL_FOLDER
    at.session_state[key("live.target_folder")] = folders["target"]
    at.session_state[key("live.prompt")] = TINY_PROMPT
    at.session_state[key("live.raw")] = True
    at.session_state[key("live.max_new_tokens")] = 10
    for name, value in sidebar.items():
        at.session_state[key(name)] = value
    return at


def click_run(at: AppTest) -> AppTest:
    return click(at, "Run")


def text_of(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# ---------------------------------------------------------------- runtime and store


@pytest.mark.parametrize(
    "widgets, expected",
    [
        ({}, state.Runtime("cpu", HOST)),  # auto: measured on this host, the draft as the target
        ({"dtype": "nf4"}, state.Runtime("cpu", "nf4")),
        ({"dtype": "int8", "draft_dtype": "nf4"}, state.Runtime("cpu", "int8", "nf4")),
        ({"dtype": "fp32", "draft_dtype": "auto"}, state.Runtime("cpu", "fp32", HOST)),
    ],
)
def test_runtime_has_a_precision_per_model(widgets, expected):
    runtime = state.runtime({key("device"): "cpu", **{key(k): v for k, v in widgets.items()}})
    assert runtime == expected
    assert runtime.precision("target") == expected.dtype
    assert runtime.precision("draft") == (expected.draft_dtype or expected.dtype)


def test_models_are_cached_per_precision(folders):
    store = resources.ModelStore()
    nf4 = store.get(folders["target"], "cpu", "nf4")
    bf16 = store.get(folders["target"], "cpu", "bf16")
    assert (nf4.precision, bf16.precision) == ("nf4", "bf16")
    assert store.get(folders["target"], "cpu", "nf4") is nf4  # loaded once
    assert store.contains(folders["target"], "cpu", "nf4") and not store.contains(folders["target"], "cpu", "int8")
    assert sorted(info.precision for info in store.loaded()) == ["bf16", "nf4"]


@pytest.mark.parametrize(
    "num_bytes, expected",
    [(512, "512 B"), (1536, "1.5 KiB"), (3 * 2**20, "3.0 MiB"), (int(1.25 * 2**30), "1.25 GiB")],
)
def test_format_bytes(num_bytes, expected):
    assert precision.format_bytes(num_bytes) == expected


def test_memory_rows_end_with_the_total():
    memory = [MemoryUse("target", "t", "nf4", 3 * 2**20, 2**20, 0.5), MemoryUse("draft", "d", "nf4", 0, 2**20, None)]
    rows = precision.memory_rows(memory)
    assert [r["model"] for r in rows] == ["target: t", "draft: d", "total"]
    assert rows[1]["weights"] == "shared with the target" and rows[1]["load time"] == "—"
    assert (rows[2]["weights"], rows[2]["KV cache"]) == ("3.0 MiB", "2.0 MiB")


# ---------------------------------------------------------------- the sidebar and the Live page


def test_sidebar_offers_target_and_draft_precision(folders):
    at = app(folders, dtype="nf4", draft_dtype="int8").run()
    assert not at.exception and not at.error
    labels = [s.label for s in at.sidebar.selectbox]
    assert "Target precision" in labels and "Draft precision" in labels
    assert "target in **nf4**, draft in **int8**" in text_of(at.sidebar.caption)


def test_quantised_target_shows_the_reference_beside_it_and_the_memory(folders):
    at = app(folders, dtype="nf4")
    at.session_state[key("live.drafter")] = "layer-skip"
    at.session_state[key("live.exit_layer")] = 1
    at.session_state[key("live.reference")] = True
    at = click_run(at)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert "target precision nf4" in text_of(at.caption)  # the settings line says what ran
    info = text_of(at.info)
    assert "The target is quantised (nf4)" in info and "changes that reference" in info
    # the fp32 target (the default reference) ran beside it: it either writes the same or is marked where it parts
    said = text_of(at.success) + text_of(at.warning)
    assert "writes what the fp32 target writes" in said or "parts from the fp32 target at token" in said
    assert "fp32 target alone (reference)" in text_of(at.markdown)
    # memory of the run: the target, the layer-skip draft (no weights of its own), the total
    (table,) = [d.value for d in at.dataframe if "KV cache" in d.value.columns]
    assert list(table["model"])[-1] == "total" and list(table["precision"])[:2] == ["nf4", "nf4"]
    assert table["weights"].iloc[1] == "shared with the target"
    captions = text_of(at.caption)
    assert "(weights and KV caches of the target and draft)." in captions
    assert "The full-precision reference beside it is loaded too and is not counted here." in captions
    # the sidebar lists both loaded models, each with its precision, and their total
    sidebar = text_of(at.sidebar.caption)
    assert "of weights in all" in sidebar and "(nf4, cpu" in sidebar and "(fp32, cpu" in sidebar


@pytest.mark.parametrize("dtype", ["auto", "bf16", "nf4"])
def test_reference_defaults_to_fp32_unlike_the_target(folders, dtype):
    # the old default, bf16, equalled the default target's precision: the toggle then showed nothing, silently
    at = app(folders, dtype=dtype)
    at.session_state[key("live.reference")] = True
    at = at.run()
    assert not at.exception and not at.error
    (select,) = [s for s in at.selectbox if s.label == "Reference precision"]
    assert select.value == "fp32"
    assert not [w for w in at.warning if "the target's own" in w.value]


def test_reference_equal_to_the_target_says_so_and_runs_nothing(folders):
    at = app(folders, dtype="bf16")
    at.session_state[key("live.reference")] = True
    at.session_state[key("live.reference_precision")] = "bf16"
    at.session_state[key("live.drafter")] = "none"
    at = click_run(at)
    assert not at.exception and not at.error
    assert "The reference precision is the target's own (bf16)" in text_of(at.warning)
    assert "target alone (reference)" not in text_of(at.markdown)


def test_fp32_target_has_nothing_more_precise_to_compare_with(folders):
    at = app(folders, dtype="fp32")
    at.session_state[key("live.reference")] = True
    at.session_state[key("live.reference_precision")] = "bf16"  # a choice left from a bf16 target
    at.session_state[key("live.drafter")] = "none"
    at = click_run(at)
    assert not at.exception and not at.error
    assert "The target already runs in full precision (fp32)" in text_of(at.caption)
    assert "Reference precision" not in [s.label for s in at.selectbox]
    assert "target alone (reference)" not in text_of(at.markdown)


def test_quantised_draft_model_counts_its_own_memory(folders):
    at = app(folders, dtype="fp32", draft_dtype="int8")
    at.session_state[key("live.drafter")] = "draft-model"
    at.session_state[key("live.draft")] = LOCAL_FOLDER
    at.session_state[key("live.draft_folder")] = folders["draft"]
    at = click_run(at)
    assert not at.exception and not at.error, (at.exception, at.error)
    assert "draft precision int8" in text_of(at.caption)
    assert any("Identical to the target alone" in s.value for s in at.success)  # a quantised draft never changes output
    (table,) = [d.value for d in at.dataframe if "KV cache" in d.value.columns]
    assert list(table["precision"])[:2] == ["fp32", "int8"]
    assert table["weights"].iloc[1] != "shared with the target"
    # the target is not quantised: nothing to warn about (a loss hint depends on timing: not counted)
    assert not [i.value for i in at.info if not i.value.startswith("Speculation lost here")]


def test_missing_bitsandbytes_is_a_message_not_a_crash(folders, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )
    at = click_run(app(folders, dtype="int8"))
    assert not at.exception
    errors = text_of(at.error)
    assert "requires the bitsandbytes package" in errors and "pip install bitsandbytes==0.50.2" in errors
