"""Constrained output (JSON schema, regex, any JSON) that stays exact under speculation.

xgrammar (Dong et al. 2024, "XGrammar: Flexible and Efficient Structured
Generation Engine for Large Language Models") owns the grammar: compilation, the
allowed-token bitmask, advancing and rolling back the matcher. The lab owns how
speculation uses it, the three places public engines got wrong:

1. drafting under the grammar: a draft model takes its argmax or sample under
   the mask; a deterministic proposal (prompt lookup) is cut at its first token
   the grammar forbids;
2. verifying under the grammar: the target's logits are masked at every
   verified position, the correction and bonus positions included, each mask
   taken from the matcher advanced over the drafted tokens before it (for a
   token tree, over the node's own root path: ``tree_bitmask``);
3. rolling back: the matcher returns to the committed prefix before the accepted
   tokens and the target's own token are accepted for good.

So the output is token for token what the target alone produces under the
constraint (greedy), and in distribution (sampling).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch

ConstraintKind = Literal["json_schema", "regex", "any_json"]
CONSTRAINT_KINDS: tuple[str, ...] = get_args(ConstraintKind)


class GrammarError(ValueError):
    """A schema or regex that does not compile, in plain words."""


class UnsatisfiableConstraint(GrammarError):
    """A constraint that no output can satisfy (with this tokenizer); the message starts "No output can satisfy"."""

    def __init__(self, why: str) -> None:
        super().__init__(f"No output can satisfy this constraint: {why}. Change the constraint and run again.")


@dataclass(frozen=True)
class ConstraintSpec:
    """What the output must match.

    kind: "json_schema" (source is the schema's JSON text), "regex" (source is
    the pattern, matched against the whole output), or "any_json" (source unused).
    Raises ValueError for an unknown kind or an empty source.
    """

    kind: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ValueError(f"constraint requires one of {', '.join(CONSTRAINT_KINDS)}; got {self.kind!r}")
        if self.kind != "any_json" and not self.source.strip():
            what = "a JSON schema" if self.kind == "json_schema" else "a regular expression"
            raise ValueError(f"The constraint is empty: paste {what} first.")


class Constraint:
    """A compiled constraint for one tokenizer; makes a fresh ``GrammarState`` per decode.

    tokenizer: a transformers tokenizer; vocab_size: the model's logit width
    (``config.vocab_size``); stop_token_ids: the ids that end a generation (the
    grammar allows them once the output is complete).

    Raises GrammarError when the schema or regex does not compile.
    """

    def __init__(self, spec: ConstraintSpec, tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        import xgrammar as xgr

        self.spec = spec
        self.vocab_size = vocab_size
        compiler = _compiler(tokenizer, vocab_size, tuple(stop_token_ids))
        try:
            if spec.kind == "json_schema":
                json.loads(spec.source)  # Python's message for bad JSON is the clearer one
                self.compiled = compiler.compile_json_schema(spec.source, any_whitespace=False)
            elif spec.kind == "regex":
                self.compiled = compiler.compile_regex(spec.source)
            else:
                self.compiled = compiler.compile_builtin_json_grammar()
        except json.JSONDecodeError as error:
            raise GrammarError(f"The JSON schema is not valid JSON: {str(error).rstrip('.')}. "
                               "Fix the schema and run again.") from error
        except RuntimeError as error:
            what = "JSON schema" if spec.kind == "json_schema" else "regular expression"
            # xgrammar's message ends in "." (e.g. "... is not closed."): no "..", then our sentence
            raise GrammarError(f"The {what} does not compile: {_plain(str(error)).rstrip('.')}. "
                               "Fix it and run again.") from error
        self._check_satisfiable(tuple(stop_token_ids))

    def _check_satisfiable(self, stop_token_ids: tuple[int, ...]) -> None:
        """Refuse, before any decode, a constraint no output can satisfy (raises UnsatisfiableConstraint).

        A schema whose types contradict each other (``schema_contradiction``),
        or a grammar whose matcher at the start allows no token but the stop
        tokens: nothing, or only the empty output, could ever be produced.
        """
        if self.spec.kind == "json_schema":
            why = schema_contradiction(json.loads(self.spec.source))
            if why:
                raise UnsatisfiableConstraint(why)
        allowed = self.new_state().allowed()  # [V] bool
        if not allowed.any():
            raise UnsatisfiableConstraint("no first token of this model's vocabulary can start an output that matches it")
        stops = [t for t in stop_token_ids if 0 <= t < allowed.numel()]
        if stops and not allowed.index_fill(0, torch.tensor(stops), False).any():
            raise UnsatisfiableConstraint("it allows only the empty output (end-of-text at once)")

    @classmethod
    def for_model(cls, spec: ConstraintSpec, target) -> "Constraint":
        """The constraint compiled for a loaded model: its tokenizer, logit width and stop tokens.

        target: ``lab.models.LoadedModel`` (``.tokenizer``, ``.model``, ``.eos_token_ids``).
        Raises GrammarError when the schema or regex does not compile.
        """
        vocab_size = target.model.config.get_text_config().vocab_size  # the logits' width
        return cls(spec, target.tokenizer, vocab_size, target.eos_token_ids)

    def new_state(self) -> "GrammarState":
        return GrammarState(self)

    def is_valid(self, text: str) -> bool:
        """Does a finished output satisfy the constraint? (checked independently of xgrammar)"""
        if self.spec.kind == "regex":
            return re.fullmatch(self.spec.source, text, flags=re.DOTALL) is not None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        if self.spec.kind == "any_json":
            return True
        import jsonschema

        try:
            jsonschema.validate(value, json.loads(self.spec.source))
        except jsonschema.ValidationError:
            return False
        return True


class GrammarState:
    """One decode's matcher: masks, advance, roll back (wraps ``xgrammar.GrammarMatcher``)."""

    def __init__(self, constraint: Constraint) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = constraint.vocab_size
        self.matcher = xgr.GrammarMatcher(constraint.compiled)

    def accept(self, token: int) -> bool:
        """Advance over one token; False (state unchanged) if the grammar forbids it."""
        return bool(self.matcher.accept_token(int(token)))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.matcher.rollback(num_tokens)

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens the grammar allows next."""
        bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        logits = torch.zeros(1, self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(logits, bitmask)
        return logits[0] > float("-inf")

    def mask_next(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] any float; returns float32 logits with forbidden tokens at -inf."""
        bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        masked = _fit(logits.float()[None], self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device))
        return masked[0, : logits.shape[-1]]

    def mask_draft_positions(self, logits: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Mask the target's K'+1 verify positions; the matcher ends where it began.

        logits: [K'+1, V]; draft_tokens: [K']. Position i is masked with the state
        after draft_tokens[:i]. If a drafted token is forbidden (only possible for
        a drafter that ignored the grammar), later positions keep that mask; the
        forbidden token gets probability 0 and is rejected there.
        Returns float32 [K'+1, V].
        """
        num_positions = logits.shape[0]
        bitmask = self._xgr.allocate_token_bitmask(num_positions, self.vocab_size)
        advanced = 0
        for i in range(num_positions):
            self.matcher.fill_next_token_bitmask(bitmask, i)
            if i < draft_tokens.shape[0]:
                if not self.accept(int(draft_tokens[i])):
                    bitmask[i + 1 :] = bitmask[i]
                    break
                advanced += 1
                if self.is_terminated:
                    # A drafted stop token completed the output: nothing after it is ever emitted.
                    bitmask[i + 1 :] = bitmask[i]
                    break
        self.rollback(advanced)
        masked = _fit(logits.float(), self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device))
        return masked[:, : logits.shape[-1]]


    def tree_bitmask(self, tokens: list[int], parents: list[int]) -> tuple[torch.Tensor, list[bool]]:
        """The grammar's masks over a token tree's N + 1 verify positions; the matcher ends where it began.

        tokens, parents: the tree's nodes as ``lab.tree.DraftTree`` holds them (parents[i] < i, -1: the root).
        Row 0 is the mask at the committed prefix (after the root), row i + 1 the mask after the root path
        to node i: the tree is walked depth-first, accepting a node's token, filling its row, recursing and
        rolling back one token. A node the grammar refuses, and every node below it or below a node that
        completed the output, is invalid and keeps its parent's row (its token has probability 0 there, so
        it is never accepted). Returns (xgrammar bitmask [N + 1, ceil(V / 32)] int32, valid [N] bool).
        """
        n = len(tokens)
        bitmask = self._xgr.allocate_token_bitmask(n + 1, self.vocab_size)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        kids: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            kids.setdefault(p, []).append(i)
        valid = [False] * n

        def visit(node: int, live: bool) -> None:  # live: the matcher stands after node, output not complete
            for child in kids.get(node, []):
                if live and self.accept(tokens[child]):
                    valid[child] = True
                    done = self.is_terminated
                    if done:
                        bitmask[child + 1] = bitmask[node + 1]
                    else:
                        self.matcher.fill_next_token_bitmask(bitmask, child + 1)
                    visit(child, not done)
                    self.rollback(1)
                else:
                    bitmask[child + 1] = bitmask[node + 1]
                    visit(child, False)

        visit(-1, not self.is_terminated)
        return bitmask, valid

    def mask_tree_positions(self, logits: torch.Tensor, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Mask the target's logits over a token tree's verify positions (see ``tree_bitmask``).

        logits: [N + 1, V] any float, row 0 after the root, row i + 1 after node i. Returns float32
        [N + 1, V], each row masked by the grammar state after the root path to its node.
        """
        bitmask, _ = self.tree_bitmask(tokens, parents)
        masked = _fit(logits.float(), self.vocab_size)
        self._xgr.apply_token_bitmask_inplace(masked, bitmask.to(masked.device))
        return masked[:, : logits.shape[-1]]

    def mask_after(self, path: list[int], logits: torch.Tensor) -> torch.Tensor:
        """logits: [V] any float, the distribution after ``path`` (tokens past the committed prefix).

        Returns float32 [V] masked by the grammar state after path; all -inf when the grammar refuses a
        token of path or path completes the output (nothing may follow). The matcher ends where it began.
        """
        advanced = 0
        for token in path:
            if not self.accept(token):
                break
            advanced += 1
        open_ = advanced == len(path) and not self.is_terminated
        masked = self.mask_next(logits) if open_ else torch.full_like(logits, float("-inf"), dtype=torch.float32)
        self.rollback(advanced)
        return masked


JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_MAX_DEPTH = 32  # deeper schemas are not checked statically (the matcher check still runs)


def schema_contradiction(schema, where: str = "the schema", depth: int = 0) -> str | None:
    """Why no JSON value can match ``schema``, from a cheap look at it; None when no contradiction is seen.

    Seen: ``false``; ``not: {}``; an empty ``enum``; ``type`` and ``allOf``
    branches' types with nothing in common (``allOf`` of string and integer);
    ``const`` / ``enum`` values of none of the allowed types; min above max
    (minimum/maximum, minLength/maxLength, minItems/maxItems,
    minProperties/maxProperties); ``anyOf`` / ``oneOf`` whose every branch is
    contradictory; and the same, recursively, in a required property's
    schema, in ``allOf`` branches, and in the items of a list that must have
    some. Anything else (``$ref``, patterns, formats) is left to the grammar.
    """
    if depth > _MAX_DEPTH:
        return None
    if schema is False:
        return f"{where} is `false`, which no value matches"
    if not isinstance(schema, dict):
        return None
    if schema.get("not") in ({}, True):
        return f"{where} has `not: {{}}`, which no value matches"
    if isinstance(schema.get("enum"), list) and not schema["enum"]:
        return f"{where} has an empty `enum`"
    all_of = schema["allOf"] if isinstance(schema.get("allOf"), list) else []
    branches = [schema, *all_of]
    types: set[str] | None = None
    declared = []
    for branch in branches:
        if branch is False:
            return f"an `allOf` branch of {where} is `false`"
        named = _declared_types(branch)
        if named is None:
            continue
        declared.append(named)
        types = named if types is None else types & named
    if types is not None and not types:
        asked = " and ".join("/".join(sorted(d)) for d in declared)
        return f"{where} must be {asked} at once (its `type` and `allOf` ask for types no value has together)"
    for value_key in ("const", "enum"):
        if value_key in schema and types is not None:
            values = [schema["const"]] if value_key == "const" else schema["enum"]
            if isinstance(values, list) and values and not any(_json_type(v) & types for v in values):
                return f"{where} has a `{value_key}` of none of its allowed types ({'/'.join(sorted(types))})"
    for low, high in (("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
                      ("minProperties", "maxProperties")):
        a, b = schema.get(low), schema.get(high)
        if _is_number(a) and _is_number(b) and a > b:
            return f"{where} has {low} {a} above {high} {b}"
    for branch in all_of:
        why = schema_contradiction(branch, f"an `allOf` branch of {where}", depth + 1)
        if why:
            return why
    for choice in ("anyOf", "oneOf"):
        options = schema.get(choice)
        if isinstance(options, list) and options:
            reasons = [schema_contradiction(option, f"a `{choice}` branch of {where}", depth + 1) for option in options]
            if all(reasons):
                return f"every `{choice}` branch of {where} is impossible ({reasons[0]})"
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    if types is None or "object" in types:
        for name in required:
            if isinstance(name, str) and name in properties:
                why = schema_contradiction(properties[name], f"the required property {name!r}", depth + 1)
                if why:
                    return why
    min_items = schema.get("minItems")
    if (types is None or "array" in types) and _is_number(min_items) and min_items >= 1 and "items" in schema:
        why = schema_contradiction(schema["items"], f"the items of {where}", depth + 1)
        if why:
            return why
    return None


def _declared_types(schema) -> set[str] | None:
    declared = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list) or not all(isinstance(t, str) for t in declared):
        return None
    named = {t for t in declared if t in JSON_TYPES}
    return named | ({"integer"} if "number" in named else set())  # every integer is a number


def _json_type(value) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    if isinstance(value, str):
        return {"string"}
    return {"array"} if isinstance(value, list) else {"object"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_invalid_token(constraint: Constraint, token_ids: list[int]) -> int | None:
    """Index of the first token a fresh matcher refuses, or None if all are allowed."""
    state = constraint.new_state()
    for i, token in enumerate(token_ids):
        if not state.accept(token):
            return i
    return None


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int, stop_token_ids: tuple[int, ...]):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
    return xgr.GrammarCompiler(info)


def _fit(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad [N, W] logits to the grammar's vocab width (never narrower), as a new tensor."""
    if logits.shape[-1] >= vocab_size:
        return logits.clone()
    return torch.nn.functional.pad(logits, (0, vocab_size - logits.shape[-1]), value=float("-inf"))


def _plain(message: str) -> str:
    """Strip xgrammar's C++ location prefix from an error message."""
    message = message.strip().splitlines()[0] if message.strip() else message
    message = re.sub(r"^\[[\d:]+\]\s*\S+:\d+:\s*", "", message)
    return message.replace("Check failed: (error.empty()) is false: ", "")
