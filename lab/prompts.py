"""Prompt sets for benchmarks and demos: Spec-Bench, our own presets, or any JSONL file.

A source is one of:

- ``spec_bench`` (all 480), ``spec_bench:CATEGORY`` or ``spec_bench:mix``, each
  optionally followed by ``:N`` to keep the first N (``spec_bench:summarization:10``).
  Spec-Bench (Xia et al. 2024) is read from ``../shared/data/spec_bench/question.jsonl``
  relative to the repository root (``$LAB_SPEC_BENCH`` overrides it); only the
  first turn of each question is used. ``mix`` is a stratified spread: records
  evenly spaced through the file, so each Spec-Bench task appears in proportion
  to its share of the set (MT-bench, translation, summarization, QA, math
  reasoning, RAG: one sixth each).
- the name of a preset set in ``assets/prompts/`` (``summarization``,
  ``code_editing``, ...; see :func:`preset_names`), optionally with ``:N``;
- a path to a JSONL file, one object a line: either Spec-Bench's shape
  (``question_id``, ``category``, ``turns``) or ours (``id``, ``category``,
  ``prompt`` and an optional ``note``).

Several sources load together with :func:`load_prompt_sets`; a prompt already
chosen by an earlier source is skipped by a later one, which then takes the
next record, so ``["spec_bench:summarization:10", "spec_bench:mix:10"]`` gives
twenty distinct prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "assets" / "prompts"
SPEC_BENCH_NAME = "spec_bench"
MIX = "mix"


def spec_bench_path() -> Path:
    """Where Spec-Bench's question.jsonl is read from: ``$LAB_SPEC_BENCH`` or ``../shared/data/spec_bench/question.jsonl``."""
    configured = os.environ.get("LAB_SPEC_BENCH")
    if configured:
        return Path(configured).expanduser()
    return REPO_ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set.

    id: unique within its source (``spec_bench/160``, ``summarization/3``).
    category: the task (``summarization``, ``translation``, ...).
    text: the user message (first turn).
    note: why the prompt is in the set (our presets), else "".
    """

    id: str
    category: str
    text: str
    note: str = ""


def preset_names() -> list[str]:
    """Names of the prompt sets shipped in ``assets/prompts/`` (file names without ``.jsonl``)."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.jsonl"))


def load_prompts(source: str | os.PathLike, exclude: Iterable[str] = ()) -> list[Prompt]:
    """The prompts of one source (see the module docstring), skipping ids in ``exclude``.

    Raises:
        ValueError: an unknown source, an unknown Spec-Bench category, a bad
            count, or a malformed file; the message says what was expected.
        FileNotFoundError: the Spec-Bench file or a JSONL path is absent; the
            message says where it was looked for.
    """
    excluded = set(exclude)
    text = str(source)
    name, count = _split_count(text)
    if name == SPEC_BENCH_NAME or name.startswith(SPEC_BENCH_NAME + ":"):
        category = name[len(SPEC_BENCH_NAME) + 1 :] or None
        return _spec_bench(category, count, excluded)
    if name in preset_names():
        return _take(_read_jsonl(PRESET_DIR / f"{name}.jsonl", prefix=name), count, excluded)
    path = Path(name).expanduser()
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {str(path)!r} does not exist: give the path of a JSONL file")
        return _take(_read_jsonl(path, prefix=path.stem), count, excluded)
    raise ValueError(
        f"prompt set requires 'spec_bench[:CATEGORY|:mix][:N]', a preset ({', '.join(preset_names())}) "
        f"or a .jsonl path; got {text!r}"
    )


def load_prompt_sets(sources: Sequence[str | os.PathLike]) -> list[Prompt]:
    """Prompts of several sources in order, each prompt once (later sources skip earlier choices)."""
    chosen: list[Prompt] = []
    for source in sources:
        chosen += load_prompts(source, exclude=[prompt.id for prompt in chosen])
    return chosen


def spec_bench_categories() -> list[str]:
    """Spec-Bench's categories in file order (raises FileNotFoundError if the file is absent)."""
    return list(dict.fromkeys(prompt.category for prompt in _read_spec_bench()))


# ---------------------------------------------------------------- helpers


def _split_count(text: str) -> tuple[str, int | None]:
    """``"name:10"`` -> ("name", 10); no count -> (text, None)."""
    head, _, tail = text.rpartition(":")
    if head and tail.isdigit():
        count = int(tail)
        if count < 1:
            raise ValueError(f"a prompt count requires an integer >= 1; got {tail!r} in {text!r}")
        return head, count
    return text, None


def _spec_bench(category: str | None, count: int | None, excluded: set[str]) -> list[Prompt]:
    records = _read_spec_bench()
    if category is None:
        return _take(records, count, excluded)
    if category == MIX:
        available = [prompt for prompt in records if prompt.id not in excluded]
        return _spread(available, count or len(available))
    selected = [prompt for prompt in records if prompt.category == category]
    if not selected:
        categories = ", ".join(dict.fromkeys(prompt.category for prompt in records))
        raise ValueError(f"Spec-Bench category requires one of {categories}, or mix; got {category!r}")
    return _take(selected, count, excluded)


def _spread(records: list[Prompt], count: int) -> list[Prompt]:
    """``count`` records evenly spaced through ``records`` (centred in each stride): a stratified sample."""
    count = min(count, len(records))
    stride = len(records) / count
    return [records[int((i + 0.5) * stride)] for i in range(count)]


def _take(records: list[Prompt], count: int | None, excluded: set[str]) -> list[Prompt]:
    kept = [prompt for prompt in records if prompt.id not in excluded]
    return kept if count is None else kept[:count]


def _read_spec_bench() -> list[Prompt]:
    path = spec_bench_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"The Spec-Bench prompts are absent: expected {path} (Spec-Bench's data/spec_bench/question.jsonl). "
            "Place the file there, set LAB_SPEC_BENCH to its path, or use a preset prompt set "
            f"({', '.join(preset_names())})."
        )
    return _read_jsonl(path, prefix=SPEC_BENCH_NAME)


def _read_jsonl(path: Path, prefix: str) -> list[Prompt]:
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(_prompt_of(record, prefix, number))
            except (ValueError, KeyError, TypeError, IndexError) as error:
                raise ValueError(
                    f"{path}:{number}: a prompt line requires a JSON object with 'prompt' (or Spec-Bench's 'turns'); "
                    f"got {line.strip()[:80]!r} ({error})"
                ) from error
    return prompts


def _prompt_of(record: dict, prefix: str, number: int) -> Prompt:
    if "turns" in record:
        text = record["turns"][0]
        identifier = record.get("question_id", number)
    else:
        text = record["prompt"]
        identifier = record.get("id", number)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty prompt")
    return Prompt(f"{prefix}/{identifier}", str(record.get("category", prefix)), text, str(record.get("note", "")))
