"""Inputs the pages share: the target, the draft models that fit it, the drafter's options, the prompts, and
loading a results file.

Every widget is keyed per page (``state.widget_key(f"{page}.target")``), so each
page keeps its own choices; defaults stay in each page's ``DEFAULTS``.

A draft model must share the target's tokenizer exactly (its proposals are token
ids). The pages offer only draft models that do, known without loading anything:
presets of one tokenizer family share their tokenizer (``tokenizer_family``).
Runs still call ``lab.models.check_same_tokenizer`` before loading weights, which
also covers local model folders. With a vocabulary bridge (``lab.drafters.bridge``:
"text" exact, "ids" the trap) every other model is offered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import streamlit as st

from app import render_compare, state
from lab.studies import compare
from lab.models import PRESETS
from lab.prompts import Prompt, load_prompt_sets, load_prompts, preset_names, spec_bench_categories

LOCAL_FOLDER = "local folder…"
FOLDER_PLACEHOLDER = "/path/to/a/hugging-face/model (holding config.json)"
# Each label starts with the drafter's name as results, tables and the CLI spell it ("prompt-lookup (n 1-3)").
DRAFTER_LABELS = {
    "none": "none (target alone)",
    "prompt-lookup": "prompt-lookup (n-grams)",
    "layer-skip": "layer-skip (early exit)",
    "draft-model": "draft-model (a smaller model)",
    "eagle": "eagle (trained head)",
}
DRAFT_VOCAB_CHOICES = (0, 8192, 16384, 32768)  # 0: the full vocabulary (None would show as "Choose an option")
DRAFT_VOCAB_HELP = ("Score only the target's N most frequent tokens (FR-Spec / VocabTrim): the draft's LM head shrinks, "
                    "the target still verifies over its full vocabulary, so the output stays exact. Needs the table "
                    "from `python -m lab token-freq --target NAME` (or `train-head`).")
VOCAB_BRIDGE_LABELS = {
    "none": "none (same tokenizer only)",
    "text": "text (exact: decode, re-encode)",
    "ids": "ids: THE TRAP (raw ids, no error)",
}
VOCAB_BRIDGE_HELP = ("How a draft with another tokenizer reaches the target. none: only same-tokenizer drafts. "
                     "text: the draft's tokens become text, the text becomes the target's tokens, the target verifies "
                     "them (Universal Assisted Decoding; greedy stays token for token the target's; temperature 0 "
                     "only). ids: the draft's token ids are sent as they are, as a misconfigured system would.")
IDS_TRAP_WARNING = ("**The ids trap.** The draft's token ids go to the target as they are, and ids from another "
                    "vocabulary mean other text. Nothing errors: the output stays the target's (it rejects every "
                    "wrong token), but acceptance falls near 0 and speculation runs slower than the target alone. "
                    "Pick *text* to bridge the vocabularies exactly.")
TARGET_HELP = ("SmolLM2 is quick on CPU; the Qwen pair shows a real draft model (the smaller Qwen drafts for the larger). "
               "The weights ship as quantised GGUF files (Q4_1, Q4_K_M), dequantised once to bf16: a model runs in "
               "bf16, or in the precision the sidebar sets.")
PROMPT_SOURCES = ("Preset prompt sets", "Spec-Bench category", "Paste prompts")
PASTE_PLACEHOLDER = "Summarize this text: …\n---\nTranslate into French: …"

key = state.widget_key


# ---------------------------------------------------------------- target and draft


def model_title(name: str) -> str:
    """A preset's upstream name ("SmolLM2-135M-Instruct": what runs, no GGUF quantisation); anything else as it is."""
    return PRESETS[name].title if name in PRESETS else name


def tokenizer_family(name: str) -> str | None:
    """The tokenizer family of a preset ("smollm2", "qwen2.5"); None for a local folder (unknown until loaded).

    Presets of one family share their tokenizer exactly. The preset's own
    ``tokenizer_family`` is used where ``lab.models.ModelPreset`` has one;
    otherwise the family is the first dash-separated part of the preset's name
    (``qwen2.5-coder-0.5b`` -> ``qwen2.5``), which holds for every preset today.
    """
    preset = PRESETS.get(name)
    if preset is None:
        return None
    return getattr(preset, "tokenizer_family", None) or name.split("-", 1)[0]


def compatible_drafts(target: str) -> list[str]:
    """The presets that can draft for ``target``: its tokenizer family, the target itself and MoE presets left out.

    A target that is not a preset (a local folder) gets every dense preset: its
    tokenizer is known only once loaded, and the run checks it. A MoE preset
    (``ModelPreset.moe``) is a target: a twin of a dense preset, never its draft.
    """
    family = tokenizer_family(target)
    dense = [name for name in PRESETS if PRESETS[name].moe is None]
    if family is None:
        return dense
    return [name for name in dense if name != target and tokenizer_family(name) == family]


def no_draft_message(target: str) -> str:
    """What to do when no preset can draft for ``target``."""
    # targets with a *smaller* model of their family to draft for them (a larger one is no draft)
    with_drafts = [model_title(name) for name in PRESETS
                   if any(PRESETS[d].size_bytes < PRESETS[name].size_bytes for d in compatible_drafts(name))]
    targets = f" ({' or '.join(with_drafts)})" if with_drafts else ""
    return (f"No draft model shares the tokenizer of {model_title(target)}: a draft model's proposals are token ids, "
            "so it must come from the target's own tokenizer family, and no other preset does. Pick another drafter "
            f"(prompt lookup or layer skip, which need no second model), or a target that has a draft model{targets}.")


def draft_options(target: str, vocab_bridge: str = "none") -> list[str]:
    """The presets offered as ``target``'s draft: its tokenizer family, or with a bridge every other preset."""
    if vocab_bridge != "none":
        return [name for name in PRESETS if name != target]
    return compatible_drafts(target)


def checked_draft(target: str, draft: str | None, vocab_bridge: str = "none") -> str:
    """``draft`` if it can draft for ``target``; raises ValueError saying what to pick instead.

    ``draft`` is what the page's draft select returned: a preset, a folder, or
    None when nothing fits. A stale preset in session state (the select was not
    drawn because nothing fits) is refused here as well.
    """
    options = draft_options(target, vocab_bridge)
    if draft is None or (draft in PRESETS and draft not in options):
        # the draft select already shows no_draft_message in full; the error only points to it
        raise ValueError(f"No draft model shares the tokenizer of {model_title(target)} (see the note above): pick "
                         "prompt lookup or layer skip, or another target." if not options else
                         f"{model_title(draft or '')} cannot draft for {model_title(target)}: their tokenizers differ. "
                         f"Pick one of {', '.join(map(model_title, options))}, or the vocabulary bridge *text*.")
    return draft


def _folder_input(label: str, page: str, name: str) -> str:
    return st.text_input(f"{label} folder", key=key(f"{page}.{name}_folder"), placeholder=FOLDER_PLACEHOLDER).strip()


def target_select(page: str, *, local_folder: bool = False, help: str | None = TARGET_HELP) -> str:
    """The target select; with ``local_folder``, a "local folder…" choice and its path box.

    Returns the preset's name or the typed path ("" when none is typed).
    """
    options = list(PRESETS) + ([LOCAL_FOLDER] if local_folder else [])
    choice = st.selectbox("Target", options, key=key(f"{page}.target"), format_func=model_title, help=help)
    return _folder_input("Target", page, "target") if choice == LOCAL_FOLDER else choice


def vocab_bridge_select(page: str, where=st) -> str:
    """The vocabulary bridge select ("none", "text", "ids"); the ids trap comes with a warning saying what it shows."""
    bridge = where.selectbox("Vocabulary bridge", tuple(VOCAB_BRIDGE_LABELS), key=key(f"{page}.vocab_bridge"),
                             format_func=VOCAB_BRIDGE_LABELS.get, help=VOCAB_BRIDGE_HELP)
    if bridge == "ids":
        where.warning(IDS_TRAP_WARNING, icon=":material/warning:")
    return bridge


def vocab_bridge(page: str) -> str:
    """The page's vocabulary bridge as its select left it ("none" before it was drawn)."""
    return st.session_state.get(key(f"{page}.vocab_bridge"), "none")


def draft_select(page: str, target: str, *, local_folder: bool = False, vocab_bridge: str = "none") -> str | None:
    """The draft-model select, offering only the presets that share ``target``'s tokenizer (with a bridge: all).

    A stale choice (the target changed) moves to the first that fits. When none
    fits, an info says what to do instead of a select with nothing to pick;
    with ``local_folder`` a path box remains for a model folder. Returns the
    preset, the typed path ("" when "local folder…" is chosen and none typed),
    or None when nothing is chosen.
    """
    options = draft_options(target, vocab_bridge)
    if not options:
        folder_hint = " Or type the folder of a local model that shares its tokenizer:" if local_folder else ""
        st.info(no_draft_message(target) + folder_hint, icon=":material/info:")
        return (_folder_input("Draft model", page, "draft") or None) if local_folder else None
    options += [LOCAL_FOLDER] if local_folder else []
    draft_key = key(f"{page}.draft")
    if st.session_state.get(draft_key) not in options:
        st.session_state[draft_key] = options[0]
    family = tokenizer_family(target)
    shares = f"the {family} family's tokenizer" if family else "the target's tokenizer"
    help = (f"Only models that share {shares} are offered: a draft proposes token ids, and ids from another "
            "vocabulary mean other text (a vocabulary bridge offers every model)." if vocab_bridge == "none" else
            f"Every model is offered: the {vocab_bridge} bridge carries a draft of another tokenizer to the target.")
    choice = st.selectbox("Draft model", options, key=draft_key, format_func=model_title, help=help)
    return _folder_input("Draft model", page, "draft") if choice == LOCAL_FOLDER else choice


def bridged_draft_inputs(page: str, target: str) -> None:
    """Compare's racer of another tokenizer: a bridge (none: no racer) and a draft model the bridge carries."""
    bridge = vocab_bridge_select(page)
    if bridge == "none":
        return
    family = tokenizer_family(target)
    options = [name for name in PRESETS if name != target and (family is None or tokenizer_family(name) != family)]
    options = options or [name for name in PRESETS if name != target]
    draft_key = key(f"{page}.bridged_draft")
    if st.session_state.get(draft_key) not in options:
        st.session_state[draft_key] = options[0]
    st.selectbox(f"Also race, through the {bridge} bridge", options, key=draft_key, format_func=model_title,
                 help="A draft model of another tokenizer, run beside the draft model above on the same prompts.")


# One click sets a comparison that teaches something on its own (run it with Run comparison).
COMPARE_PRESETS = {
    "The K trade-off": (
        "Qwen 1.5B target, the Qwen 0.5B draft at K 1, 2, 4 and 8: a draft that costs a third of the target makes a "
        "larger K pay less and less, then cost more than it saves.",
        {"target": "qwen2.5-coder-1.5b", "drafters": ["draft-model"], "draft": "qwen2.5-coder-0.5b",
         "vocab_bridge": "none", "ks": [1, 2, 4, 8]},
    ),
    "Race a draft of another tokenizer": (
        "Qwen 1.5B target: prompt lookup, the Qwen 0.5B draft, and SmolLM2 (another tokenizer) through the text "
        "bridge, at K 2 and 4.",
        {"target": "qwen2.5-coder-1.5b", "drafters": ["prompt-lookup", "draft-model"], "draft": "qwen2.5-coder-0.5b",
         "vocab_bridge": "text", "bridged_draft": "smollm2-135m", "ks": [2, 4]},
    ),
}


def compare_presets(page: str) -> None:
    """One button per ``COMPARE_PRESETS`` entry: sets the page's choices (nothing runs until Run comparison)."""

    def apply(values: dict) -> None:
        for name, value in values.items():
            st.session_state[key(f"{page}.{name}")] = value

    with st.container(horizontal=True, gap="small"):
        st.caption("Presets:")
        for label, (why, values) in COMPARE_PRESETS.items():
            st.button(label, key=f"{page}:preset:{label}", help=why, on_click=apply, args=(values,),
                      icon=":material/tune:")


def drafter_select(page: str, drafters: tuple[str, ...], help: str | None = None) -> str:
    return st.selectbox("Drafter", drafters, key=key(f"{page}.drafter"), format_func=DRAFTER_LABELS.get, help=help)


def draft_vocab_select(page: str, where=st, label: str = "Draft vocabulary") -> None:
    """The trimmed draft vocabulary N (0: the full vocabulary), for the draft model and the EAGLE head."""
    where.selectbox(label, DRAFT_VOCAB_CHOICES, key=key(f"{page}.draft_vocab"), help=DRAFT_VOCAB_HELP,
                    format_func=lambda n: "full" if not n else f"top {n // 1024}k tokens")


def eagle_note(target_name: str, where=st) -> None:
    """A caption on the head the eagle drafter will load for this target: what it reads, how long it trained,
    and the held-out acceptance it measured (from its head.json; the weights are not read)."""
    from lab.drafters.eagle import CONFIG_FILE, find_head

    if not target_name:
        return
    path = find_head(str(target_name)) / CONFIG_FILE
    if not path.exists():
        where.caption(f"No head trained for this target yet: `python -m lab train-head --target {target_name}`.")
        return
    record = json.loads(path.read_text())
    meta, layers = record.get("meta", {}), record["config"].get("feature_layers") or []
    reads = f"layers {', '.join(map(str, layers))} fused (EAGLE-3)" if layers else "the final norm (EAGLE-1)"
    text = f"Head: reads {reads}"
    if "train_s" in meta:
        text += f"; trained {meta['train_s'] / 60:.0f} min on {meta.get('tokens', 0):,} positions"
    rates = (meta.get("heldout") or {}).get("per_position")
    if rates:
        text += (f"; held-out acceptance at drafted positions 1-{len(rates)}: "
                 + " / ".join(f"{r:.0%}" for r in rates) + ". A CPU-trained head is weak: see README, Measured.")
    where.caption(text)


def ngram_inputs(page: str, low=st, high=st) -> None:
    """Prompt lookup's n-gram range, in the containers ``low`` and ``high``."""
    low.number_input("Min n-gram", min_value=1, max_value=8, step=1, key=key(f"{page}.min_n"))
    high.number_input("Max n-gram", min_value=1, max_value=8, step=1, key=key(f"{page}.max_n"))


TREE_HELP = ("Token trees: draft up to N tokens per verify pass as a tree (several guesses at each position; "
             "K is its depth), verified exactly in one target pass. 0 = a chain of K tokens. Batch size 1, eager "
             "engine, any drafter but a vocabulary bridge; the cost model's choice is on the Theory page.")


def tree_budget_input(page: str, where=st, disabled: bool = False) -> None:
    """The token-tree budget (nodes per verify pass, 0..64; 0 = a chain), in the container ``where``."""
    from lab.tree import TREE_BUDGET_MAX

    where.number_input("Tree budget (nodes; 0 = chain)", min_value=0, max_value=TREE_BUDGET_MAX, step=4,
                       key=key(f"{page}.tree_budget"), disabled=disabled, help=TREE_HELP)


def exit_layer_input(page: str, where=st) -> None:
    """Layer skip's exit layer (empty: a quarter of the target's layers), in the container ``where``."""
    where.number_input("Exit layer", min_value=1, max_value=64, step=1, key=key(f"{page}.exit_layer"),
                       placeholder="auto",  # longer ("auto: a quarter") was cut in a narrow column
                       help="Draft with the target's first N layers, then its final norm and LM head. Empty: a "
                            "quarter of the target's layers.")


# ---------------------------------------------------------------- prompts


def prompt_defaults(page: str, presets: list[str], spec_count: int) -> dict[str, Any]:
    """Defaults of the page's prompt widgets (for ``state.set_defaults``): the prompt sets ``presets``, one prompt
    each; ``spec_count`` prompts of a Spec-Bench category."""
    return {f"{page}.source": PROMPT_SOURCES[0], f"{page}.presets": list(presets), f"{page}.per_set": 1,
            f"{page}.spec_category": None, f"{page}.spec_count": spec_count, f"{page}.pasted": ""}


def chosen_prompts(page: str) -> list[str]:
    """The prompts the page's prompt widgets select. Raises ValueError / FileNotFoundError with a message."""
    return [p.text for p in chosen_prompt_items(page)]


def chosen_prompt_items(page: str) -> list[Prompt]:
    """The selected prompts with their ids and categories (pasted ones: category "pasted").

    Raises ValueError / FileNotFoundError with a message."""
    s = st.session_state
    source = s[key(f"{page}.source")]
    if source == PROMPT_SOURCES[0]:
        sets = [f"{name}:{int(s[key(f'{page}.per_set')])}" for name in s[key(f"{page}.presets")]]
        return load_prompt_sets(sets)
    if source == PROMPT_SOURCES[1]:
        category = s[key(f"{page}.spec_category")]
        if not category:
            return []
        return load_prompts(f"spec_bench:{category}:{int(s[key(f'{page}.spec_count')])}")
    texts = render_compare.split_prompts(s[key(f"{page}.pasted")])
    return [Prompt(f"pasted/{i}", "pasted", text) for i, text in enumerate(texts)]


def prompt_inputs(page: str, sets_help: str) -> None:
    """Prompts from the shipped sets, a Spec-Bench category, or pasted ones separated by "---"."""
    source = st.radio("Prompts", PROMPT_SOURCES, key=key(f"{page}.source"), horizontal=True)
    if source == PROMPT_SOURCES[0]:
        left, right = st.columns([3, 1])
        left.multiselect("Prompt sets", preset_names(), key=key(f"{page}.presets"), help=sets_help)
        right.number_input("Prompts per set", min_value=1, max_value=10, step=1, key=key(f"{page}.per_set"))
    elif source == PROMPT_SOURCES[1]:
        try:
            categories = spec_bench_categories()
        except FileNotFoundError as error:
            st.info(str(error))
            return
        if st.session_state[key(f"{page}.spec_category")] not in categories:
            st.session_state[key(f"{page}.spec_category")] = categories[0]
        left, right = st.columns([3, 1])
        left.selectbox("Spec-Bench category", categories, key=key(f"{page}.spec_category"))
        right.number_input("Prompts", min_value=1, max_value=80, step=1, key=key(f"{page}.spec_count"))
    else:
        st.text_area("Prompts, separated by a line holding only ---", key=key(f"{page}.pasted"), height=150,
                     placeholder=PASTE_PLACEHOLDER)


# ---------------------------------------------------------------- results files


def parse_comparison(text: str, file_name: str) -> compare.Comparison:
    """A comparison saved by the Compare page, marked as loaded from ``file_name``.

    Raises ``lab.results_files.ResultsFileError`` (a ValueError) naming the first wrong field, before anything
    on the page is replaced.
    """
    loaded = compare.Comparison.from_json(text)
    loaded.settings.setdefault("status", "complete")
    loaded.settings["loaded_from"] = file_name
    return loaded


def load_results_file(upload_key: str, error_key: str, result_key: str, parse: Callable[[str, str], Any]) -> None:
    """File uploader callback: ``parse(text, file name)`` of the upload replaces ``result_key``; a refusal goes
    to ``error_key``."""
    s = st.session_state
    uploaded = s.get(upload_key)
    s[error_key] = None
    if uploaded is None:
        return
    if not uploaded.name.lower().endswith(".json"):
        s[error_key] = (f"Could not load {uploaded.name}: this loads one JSON file, as Download JSON saves it "
                        "(a CSV has only the per-run table).")
        return
    try:
        s[result_key] = parse(uploaded.getvalue().decode("utf-8"), uploaded.name)
    except (ValueError, UnicodeDecodeError) as error:
        s[error_key] = f"Could not load {uploaded.name}: {error}"


def results_file_section(label: str, upload_key: str, error_key: str, result_key: str,
                         parse: Callable[[str, str], Any], title: str = "Load a results file") -> None:
    """A "Load a results file" expander (``title`` names it where a page has several): a JSON uploader and, after a
    refusal, why."""
    with st.expander(title):
        # one file: no type filter, which kept a refused file's chip beside the next upload, so the widget looked
        # like it held several; load_results_file refuses what is not .json, with a message
        st.file_uploader(label, key=upload_key, accept_multiple_files=False, on_change=load_results_file,
                         args=(upload_key, error_key, result_key, parse))
        if st.session_state.get(error_key):
            st.error(st.session_state[error_key], icon=":material/error:")
