"""What the AppTest files share: the app's entry point, tiny stand-ins for the presets, and driving a page.

The ``tiny_models`` fixture patches ``lab.models``'s loaders (the app's only way
to models) so that presets load as tiny random models in milliseconds. The Qwen
presets share one tokenizer and SmolLM2 has its own: the tiny tokenizers mimic
that by word prefix ("q3" vs "t3"). Anything that is not a preset (a local
folder) goes to the real loader. A test file uses it by importing it:
``from app_util import tiny_models  # noqa: F401 (a fixture)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the app is not an installed package; its modules import as app.*
    sys.path.insert(0, str(ROOT))

import lab.models  # noqa: E402
from app import background, state  # noqa: E402
from conftest import tiny_llama, tiny_tokenizer  # noqa: E402

MAIN = str(ROOT / "app" / "main.py")
TIMEOUT_S = 180
key = state.widget_key


def tiny_vocabulary_prefix(name: str) -> str:
    return "q" if name.startswith("qwen") else "t"


def tiny_loaded(name: str) -> lab.models.LoadedModel:
    """A tiny random model standing in for the preset ``name``, with its family's tiny tokenizer."""
    model = tiny_llama(seed=0, layers=3)
    num_parameters = sum(p.numel() for p in model.parameters())
    return lab.models.LoadedModel(
        name=name, model=model, tokenizer=tiny_tokenizer(prefix=tiny_vocabulary_prefix(name)),
        device=torch.device("cpu"), dtype=torch.float32, num_parameters=num_parameters,
        weight_bytes=4 * num_parameters, load_s=0.0,
    )


@pytest.fixture
def tiny_models(monkeypatch, tmp_path):
    """Presets load as tiny random models; the list of preset loads is yielded.

    Calibrations (``lab.studies.calibrate``, cached per machine) go to an empty cache folder, so a page reads none
    that this machine made with the real models.
    """
    monkeypatch.setenv("LAB_CACHE_DIR", str(tmp_path / "lab_cache"))
    real_load_model, real_load_tokenizer = lab.models.load_model, lab.models.load_tokenizer
    loads = []

    def fake_load_model(name_or_path, device=None, dtype=None, progress=None, **kwargs):
        if str(name_or_path) not in lab.models.PRESETS:
            return real_load_model(name_or_path, device=device, dtype=dtype, progress=progress, **kwargs)
        if progress is not None:
            progress(0.5, f"loading {name_or_path}")
        loads.append(str(name_or_path))
        return tiny_loaded(str(name_or_path))

    def fake_load_tokenizer(name_or_path, progress=None):
        if str(name_or_path) not in lab.models.PRESETS:
            return real_load_tokenizer(name_or_path, progress=progress)
        return tiny_tokenizer(prefix=tiny_vocabulary_prefix(str(name_or_path)))

    monkeypatch.setattr(lab.models, "load_model", fake_load_model)
    monkeypatch.setattr(lab.models, "load_tokenizer", fake_load_tokenizer)
    st.cache_resource.clear()
    yield loads
    st.cache_resource.clear()  # never leave tiny models cached under preset names


@pytest.fixture
def started_jobs(monkeypatch):
    """The ``app.background`` jobs the pages start, in order; each is listed by its worker before its work begins,
    so a patched study can cancel the job it runs in (``started_jobs[-1].cancel(...)``), as the Cancel button does."""
    jobs: list[background.Job] = []
    real_start = background.start

    def recording_start(work, *args, **kwargs):
        def listed_work(job):
            jobs.append(job)
            return work(job)

        return real_start(listed_work, *args, **kwargs)

    monkeypatch.setattr(background, "start", recording_start)
    return jobs


def live_app(**widgets) -> AppTest:
    """The app on its Live page (the default) after a first run, with widget values set (not yet rerun)."""
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    assert not at.exception, at.exception
    for name, value in widgets.items():
        at.session_state[key(f"live.{name}")] = value
    return at


def app_on(page: str, **widgets) -> AppTest:
    """The app switched to one of its pages (``app_pages/<page>.py``), with widget values set and drawn."""
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT_S)
    at.run()
    at.switch_page(f"app_pages/{page}.py").run()
    assert not at.exception, at.exception
    for name, value in widgets.items():
        at.session_state[key(f"{page}.{name}")] = value
    return at.run()


def click(at: AppTest, label: str) -> AppTest:
    """Click the one button labelled ``label`` and run the script."""
    (button,) = [b for b in at.button if b.label == label]
    button.click()
    return at.run()


def html_of(at: AppTest) -> str:
    return "\n".join(h.value for h in at.html)


def selectbox_labels(at: AppTest) -> list[str]:
    return [s.label for s in at.selectbox]
