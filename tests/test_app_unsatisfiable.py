"""The Live page refuses a constraint no output can satisfy before decoding: no "Valid: no", no green "Identical".

The trial: ``allOf`` of string and integer gave an invalid object with only "Valid: no", and a regex that
matches nothing gave 16 end-of-text tokens under "Identical". The tiny models read SmolLM2's tokenizer (xgrammar
needs real token strings), as in test_app_constrained.
"""

from __future__ import annotations

import json

import pytest

from app_util import click, key, live_app
from test_app_constrained import CUT_PROMPT, smol_tokenizer, streams, texts, tiny_models  # noqa: F401 (fixtures)

BOOLEAN = json.dumps({"type": "boolean"})


@pytest.mark.parametrize(
    "widgets, words",
    [
        (dict(constraint="json_schema", schema=json.dumps({"allOf": [{"type": "string"}, {"type": "integer"}]})),
         "No output can satisfy this constraint: the schema must be string and integer at once"),
        (dict(constraint="json_schema", schema=json.dumps({"type": "integer", "const": "a"})),
         "No output can satisfy this constraint: the schema has a `const` of none of its allowed types (integer)"),
        (dict(constraint="regex", regex=r"[^\s\S]"),  # matches nothing: was end-of-text tokens under "Identical"
         "No output can satisfy this constraint: no first token of this model's vocabulary can start an output"),
        (dict(constraint="regex", regex="a{0}"), "No output can satisfy this constraint: it allows only the empty output"),
    ],
)
def test_an_unsatisfiable_constraint_is_refused_and_the_last_result_stays(tiny_models, widgets, words):
    at = click(live_app(prompt=CUT_PROMPT, raw=True, max_new_tokens=4, constraint="json_schema", schema=BOOLEAN), "Run")
    assert not at.exception and not at.error
    before = at.session_state["live:result"]
    for name, value in widgets.items():
        at.session_state[key(f"live.{name}")] = value
    at = click(at, "Run")
    assert not at.exception
    assert any(words in e for e in texts(at.error)), texts(at.error)
    assert at.session_state["live:result"] is before  # the previous run is kept, drawn, and said to be the previous
    assert streams(at) and any("The run you just started did not happen" in c.value for c in at.caption)
    for name, value in widgets.items():  # the inputs stay, to be fixed
        assert at.session_state[key(f"live.{name}")] == value
