"""The validated settings of one decode; built once from a widget or a flag, read by the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from lab.kv import CompileBackend, EngineMode
from lab.sampling import SamplingParams
from lab.tree import check_tree_budget

GrammarMode = Literal["exact", "naive"]
K_MAX = 16
MAX_NEW_TOKENS_MAX = 4096


@dataclass(frozen=True)
class DecodeConfig:
    """Settings of one speculative decode.

    k: num_speculative_tokens, the most tokens drafted per step (1..16). The
        target alone (no drafter) ignores it.
    max_new_tokens: budget of generated tokens (1..4096).
    temperature, top_k, top_p: see ``SamplingParams``; temperature 0 is greedy.
    seed: seeds the run's random generator (sampling); None draws a fresh one.
    stop_strings: the decode ends once the output text contains one of them.
    record_details: keep per-position draft/target probabilities in each Step
        (step-through teaching mode; costs a little time).
    grammar_mode: with a constraint, "exact" (the default) drafts and verifies
        under the grammar with rollback; "naive" is the broken way some engines
        shipped (drafts and verification without masks, the matcher advanced over
        every drafted token and never rolled back), for teaching only.
    engine_mode: how the model passes run (``lab.kv``): "eager" (a growing
        cache), "static" (a fixed-size cache, fixed-width passes), "compiled"
        (static, each width captured once by torch.compile; CUDA graphs on a
        GPU), or "auto" (compiled on CUDA, eager elsewhere).
    compile_backend: torch.compile's backend in the compiled mode ("inductor";
        "eager" traces the graphs but runs them eagerly, for tests).
    tree_budget: draft nodes per verify pass for a token tree (``lab.tree``,
        1..64; k then bounds the tree's depth), or 0 for a chain of k tokens.

    Raises ValueError with what was expected and what came.
    """

    k: int = 4
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    stop_strings: tuple[str, ...] = ()
    record_details: bool = False
    grammar_mode: GrammarMode = "exact"
    engine_mode: EngineMode = "auto"
    compile_backend: CompileBackend = "inductor"
    tree_budget: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 1 <= self.k <= K_MAX:
            raise ValueError(f"K (num_speculative_tokens) requires an integer in 1..{K_MAX}; got {self.k!r}")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_MAX:
            raise ValueError(
                f"max_new_tokens requires an integer in 1..{MAX_NEW_TOKENS_MAX}; got {self.max_new_tokens!r}"
            )
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings requires non-empty strings; got an empty one")
        if self.grammar_mode not in get_args(GrammarMode):
            raise ValueError(f"grammar_mode requires one of {', '.join(get_args(GrammarMode))}; got {self.grammar_mode!r}")
        if self.engine_mode not in get_args(EngineMode):
            raise ValueError(f"engine_mode requires one of {', '.join(get_args(EngineMode))}; got {self.engine_mode!r}")
        if self.compile_backend not in get_args(CompileBackend):
            raise ValueError(
                f"compile_backend requires one of {', '.join(get_args(CompileBackend))}; got {self.compile_backend!r}"
            )
        check_tree_budget(self.tree_budget)
        self.sampling  # validates temperature, top_k, top_p

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)
