"""n-gram matching, table-style: tiny hand-made sequences."""

from __future__ import annotations

import pytest
import torch

from lab.drafters import DraftContext, PromptLookupDrafter
from lab.drafters.prompt_lookup import find_ngram_continuation
from lab.sampling import SamplingParams


@pytest.mark.parametrize(
    "ids, min_n, max_n, k, expected",
    [
        ([1, 2, 3, 4, 1, 2], 1, 3, 2, [3, 4]),  # suffix [1,2] seen before: propose what followed
        ([1, 2, 3, 4, 1, 2], 1, 3, 5, [3, 4, 1, 2]),  # continuation runs up to the end
        ([1, 2, 9, 5, 2, 9, 7, 8, 2, 9], 1, 3, 2, [7, 8]),  # most recent occurrence wins
        ([5, 1, 2, 7, 3, 1, 2], 3, 3, 2, []),  # only trigrams: [3,1,2] never seen before
        ([5, 1, 2, 7, 3, 1, 2], 1, 3, 2, [7, 3]),  # bigram [1,2] is
        ([1, 2, 3], 1, 3, 4, []),  # nothing repeats
        ([7], 1, 3, 4, []),  # too short to match
        ([4, 4, 4], 1, 2, 3, [4]),  # [4,4] occurs at 0 (ending before the last token)
    ],
)
def test_find_ngram_continuation(ids, min_n, max_n, k, expected):
    got = find_ngram_continuation(torch.tensor(ids), min_n, max_n, k)
    assert got.tolist() == expected


def test_drafter_respects_k_and_bad_sizes():
    ctx = DraftContext(torch.tensor([1, 2, 3, 4, 5, 1, 2]), 7, 2, SamplingParams())
    assert PromptLookupDrafter(1, 3).propose(ctx).tokens.tolist() == [3, 4]
    assert PromptLookupDrafter(1, 3).propose(ctx).probs is None
    with pytest.raises(ValueError, match="requires 1 <= min_n <= max_n; got min_n=3, max_n=2"):
        PromptLookupDrafter(3, 2)
