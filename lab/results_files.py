"""Results files the lab writes and reads back, checked against a JSON schema before anything uses them.

Three kinds load back into the app: a comparison (``lab.studies.compare.Comparison.to_json``,
the Compare page's Download JSON and ``python -m lab compare --out``; the Theory
page reads it too), a batch-size sweep (``SweepResult.to_json``, ``python -m lab
bench --out``) and a serve bench (``ServeBench.to_json``, ``python -m lab
serve-bench --out``). :func:`parse_results` turns a file's text into its dict
only when every field the lab reads has the type it reads it as, so a
hand-edited or foreign file is refused whole, in words naming the field
(``runs[0].metrics must be an object; got a string``), before it can replace
the result on screen.

The schemas type what the readers index; fields they only show may be absent
(older files) and anything extra is kept. Numbers may be NaN (Python's JSON
writes it) or null where the writer cleans NaN to None.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema

ResultsKind = Literal["comparison", "sweep", "serve_bench"]

NUMBER = {"type": "number"}
AMOUNT = {"type": "number", "minimum": 0}  # a count or a time: never negative (NaN passes: not measured)
NUMBER_OR_NULL = {"type": ["number", "null"]}
COUNT = {"type": "integer", "minimum": 0}
NUMBERS = {"type": "array", "items": NUMBER}
NUMBERS_OR_NULL = {"type": "array", "items": NUMBER_OR_NULL}
STRING_OR_NULL = {"type": ["string", "null"]}

RUN_METRICS = {
    "type": "object",
    "required": ["num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position",
                 "target_forward_passes", "num_output_tokens", "prefill_s", "draft_s", "verify_s", "wall_s",
                 "acceptance_rate", "mean_acceptance_length", "tokens_per_s"],  # runs_frame reads these too
    "properties": {
        "num_drafts": AMOUNT, "num_draft_tokens": AMOUNT, "num_accepted_tokens": AMOUNT,
        "accepted_per_position": {"type": "array", "items": AMOUNT}, "per_position_acceptance_rate": NUMBERS_OR_NULL,
        "acceptance_rate": NUMBER_OR_NULL, "mean_acceptance_length": NUMBER_OR_NULL,
        "target_forward_passes": AMOUNT, "num_output_tokens": AMOUNT, "prefill_s": AMOUNT, "draft_s": AMOUNT,
        "verify_s": AMOUNT, "wall_s": AMOUNT, "tokens_per_s": NUMBER_OR_NULL,
    },
}

COMPARISON = {
    "type": "object",
    "required": ["settings", "prompts", "runs"],
    "properties": {
        "settings": {
            "type": "object",
            "properties": {
                "target": STRING_OR_NULL, "dtype": STRING_OR_NULL, "precision": STRING_OR_NULL,
                "draft_precision": STRING_OR_NULL, "device": STRING_OR_NULL, "status": STRING_OR_NULL,
                "max_new_tokens": NUMBER_OR_NULL, "temperature": NUMBER_OR_NULL, "elapsed_s": NUMBER_OR_NULL,
                "runs_planned": {"type": ["integer", "null"], "minimum": 0},
                "target_parameters": NUMBER_OR_NULL, "target_weight_bytes": NUMBER_OR_NULL,
                "ks": {"type": "array", "items": COUNT},
                "verify_cost": {"type": "object", "additionalProperties": NUMBER},
                "drafter_costs": {"type": "object", "additionalProperties": {
                    "type": "object",
                    "properties": {"parameters": NUMBER_OR_NULL, "weight_bytes": NUMBER_OR_NULL, "note": {"type": "string"}},
                }},
            },
        },
        "prompts": {"type": "array", "items": {"type": "string"}},
        "runs": {"type": "array", "items": {
            "type": "object",
            "required": ["prompt_index", "drafter", "k", "token_ids", "text", "metrics"],
            "additionalProperties": False,  # RunRecord(**run) takes exactly its fields
            "properties": {
                "prompt_index": COUNT, "drafter": {"type": "string"}, "k": COUNT,
                "token_ids": {"type": "array", "items": COUNT}, "text": {"type": "string"}, "metrics": RUN_METRICS,
                "draft_ms": NUMBERS, "verify_ms": NUMBERS, "bridge_ms": NUMBERS, "speedup": NUMBER_OR_NULL, "decode_speedup": NUMBER_OR_NULL,
                "cost_ratio": NUMBER_OR_NULL, "identical_to_target": {"type": ["boolean", "null"]},
                "cancelled": {"type": "boolean"},
                "load": {"type": ["object", "null"]},  # lab.load.LoadReport.as_dict()
            },
        }},
    },
}

SWEEP_MODE = {
    "type": "object",
    "properties": {
        "latency_p50_s": NUMBER_OR_NULL, "latency_p95_s": NUMBER_OR_NULL, "ttft_p50_s": NUMBER_OR_NULL,
        "tokens_per_s": NUMBER_OR_NULL, "acceptance_rate": NUMBER_OR_NULL, "mean_acceptance_length": NUMBER_OR_NULL,
        "per_position_acceptance_rate": {"type": ["array", "null"], "items": NUMBER_OR_NULL},
        "outputs_valid": NUMBER_OR_NULL, "num_requests": NUMBER_OR_NULL, "k": NUMBER_OR_NULL,
    },
}

SWEEP = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "results": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "required": ["batch_size", "off", "on"],
            "properties": {
                "batch_size": {"type": "integer", "minimum": 1}, "off": SWEEP_MODE, "on": SWEEP_MODE,
                "auto": {"anyOf": [SWEEP_MODE, {"type": "null"}]},
                "latency_speedup": NUMBER_OR_NULL, "throughput_speedup": NUMBER_OR_NULL, "ttft_speedup": NUMBER_OR_NULL,
                "auto_latency_vs_best": NUMBER_OR_NULL, "auto_throughput_vs_best": NUMBER_OR_NULL,
                "auto_k": NUMBER_OR_NULL,
            },
        }},
        "settings": {
            "type": "object",
            "properties": {
                "status": STRING_OR_NULL, "precision": STRING_OR_NULL, "dtype": STRING_OR_NULL,
                "draft_precision": STRING_OR_NULL, "draft_vocab": NUMBER_OR_NULL, "num_prompts": NUMBER_OR_NULL,
                "batch_sizes_planned": {"type": "array", "items": {"type": "integer", "minimum": 1}},
                "elapsed_s": NUMBER_OR_NULL, "max_new_tokens": NUMBER_OR_NULL,
                "constraint": {"type": ["object", "null"], "properties": {"kind": {"type": "string"}}},
            },
        },
        "drafter": STRING_OR_NULL,
        "k": NUMBER_OR_NULL,
        "peer_batch_1": {"type": ["object", "null"]},
    },
}

SERVE_LEVEL = {
    "type": "object",
    "required": ["label", "max_concurrency"],
    "properties": {
        "label": {"type": "string"}, "max_concurrency": {"type": "integer", "minimum": 1},
        "completed": COUNT, "failed": COUNT, "errors": {"type": "array", "items": {"type": "string"}},
        "spec_decode_per_position_acceptance_rates": {"type": ["array", "null"], "items": NUMBER_OR_NULL},
    },
    "additionalProperties": {"type": ["number", "string", "null", "array", "object", "boolean"]},
}

SERVE_BENCH = {
    "type": "object",
    "required": ["settings", "levels"],
    "properties": {
        "settings": {
            "type": "object",
            "required": ["endpoints"],
            "properties": {
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}},
                "prompts": {"type": "array"}, "max_tokens": NUMBER_OR_NULL, "timeout_s": NUMBER_OR_NULL,
            },
        },
        "levels": {"type": "array", "items": SERVE_LEVEL},
        "engines": {"type": "object", "additionalProperties": {"type": "object"}},
        "comparison": {"type": ["array", "null"], "items": {
            "type": "object",
            "required": ["max_concurrency", "latency_speedup", "throughput_speedup"],
            "properties": {"max_concurrency": {"type": "integer", "minimum": 1},
                           "latency_speedup": NUMBER_OR_NULL, "throughput_speedup": NUMBER_OR_NULL},
        }},
        "crossover_concurrency": {"type": ["integer", "null"], "minimum": 1},
        "stopped": STRING_OR_NULL,
        "lab": {"type": ["object", "null"]},
    },
}

SCHEMAS: dict[str, dict] = {"comparison": COMPARISON, "sweep": SWEEP, "serve_bench": SERVE_BENCH}
WHAT = {
    "comparison": "a comparison results file (the Compare page's Download JSON, or `python -m lab compare --out`)",
    "sweep": "a batch-size sweep results file (the Batch page's Download JSON, or `python -m lab bench --out`)",
    "serve_bench": "a serve bench results file (the Serve page's Download JSON, or `python -m lab serve-bench --out`)",
}
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
              float: "a number", type(None): "null"}


class ResultsFileError(ValueError):
    """A results file the lab cannot use; the message names the first wrong field and what it should be."""


def parse_results(text: str | bytes, kind: ResultsKind) -> dict[str, Any]:
    """The dict of a results file of ``kind``, checked against its schema. Raises ResultsFileError, in words."""
    if kind not in SCHEMAS:
        raise ValueError(f"results kind requires one of {', '.join(SCHEMAS)}; got {kind!r}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ResultsFileError(f"This is not {WHAT[kind]}: it is not JSON ({error.msg} at line {error.lineno}, "
                               f"column {error.colno}).") from None
    except (UnicodeDecodeError, TypeError, ValueError) as error:
        raise ResultsFileError(f"This is not {WHAT[kind]}: it is not JSON text ({error}).") from None
    check_results(data, kind)
    return data


def check_results(data: Any, kind: ResultsKind) -> None:
    """Raise ResultsFileError unless ``data`` (parsed JSON) is a results file of ``kind``."""
    validator = jsonschema.Draft202012Validator(SCHEMAS[kind])
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise ResultsFileError(f"This is not {WHAT[kind]}: {describe_error(error)}.")


def describe_error(error: jsonschema.ValidationError) -> str:
    """One schema violation as a sentence naming the field: ``runs[0].metrics must be an object; got a string``."""
    where = field_path(error.absolute_path)
    if error.validator == "required":
        missing = next((name for name in error.validator_value if name not in error.instance), "?")
        return f"{where}.{missing} is missing" if where else f"the field {missing!r} is missing"
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = " or ".join({"object": "an object", "array": "a list", "string": "a string", "number": "a number",
                             "integer": "an integer", "null": "null", "boolean": "true/false"}.get(w, w) for w in wanted)
        return f"{where or 'the file'} must be {names}; got {JSON_TYPES.get(type(error.instance), 'something else')}"
    if error.validator == "additionalProperties" and error.validator_value is False:
        return f"{where or 'the file'} holds fields the lab does not write ({error.message})"
    message = error.message if len(error.message) <= 160 else error.message[:157] + "..."
    return f"{where or 'the file'} is wrong: {message}"


def field_path(path) -> str:
    """``deque(['runs', 0, 'metrics'])`` -> ``runs[0].metrics``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
