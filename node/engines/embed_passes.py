"""How a gathered embeddings batch is cut into forward passes.

Every text in a pass is padded to the pass's longest text, and every pass also costs a fixed
amount (kernel launches, the Python of a dozen modules, tokenizing). With the texts sorted longest
first, ``split_into_passes`` picks the cuts that minimise the total: the fixed cost per pass
(in padded tokens) plus the padded tokens themselves. Fixed-size sub-batches (what
``SentenceTransformer.encode`` does) pay either too much padding, when long and short texts
share a pass, or too many passes, when all texts are alike.

On the CPU stand-in a pass costs about 3.7 ms plus 0.11 ms per padded token (fixed cost about
32 tokens); 512 single-text requests gathered 64 at a time encode at 145 to 153 texts/s when
cut this way, against 136 to 141 in sub-batches of 8 or 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# With no measurable cost per token (a GPU far from busy), passes only get as big as allowed.
_NO_PADDING_COST = 1e9


@dataclass(frozen=True)
class PassCost:
    """A forward pass takes ``fixed_s`` plus ``per_token_s`` for each padded token."""

    fixed_s: float
    per_token_s: float

    @property
    def overhead_tokens(self) -> float:
        """The fixed cost of a pass, in padded tokens: what one more pass must save."""
        if self.per_token_s <= 0:
            return _NO_PADDING_COST
        return min(_NO_PADDING_COST, max(0.0, self.fixed_s / self.per_token_s))

    @classmethod
    def from_two_passes(cls, small: tuple[int, float], large: tuple[int, float]) -> PassCost:
        """The line through two timed passes, each given as (padded tokens, seconds)."""
        (t1, s1), (t2, s2) = small, large
        per_token = max(0.0, (s2 - s1) / (t2 - t1)) if t2 != t1 else 0.0
        return cls(fixed_s=max(0.0, s1 - per_token * t1), per_token_s=per_token)


def split_into_passes(
    lengths: Sequence[int], overhead_tokens: float, most: int
) -> list[tuple[int, int]]:
    """Cut ``lengths`` (token counts, longest first) into runs ``[start, end)`` of at most
    ``most`` texts, one forward pass each, minimising ``overhead_tokens`` per pass plus the
    padded tokens (a run's size times its first, longest, length). Dynamic programming over
    the cut points: O(len(lengths) * most)."""
    n = len(lengths)
    most = max(1, most)
    best = [0.0] + [float("inf")] * n  # best[j]: the cheapest cut of the first j texts
    cut = [0] * (n + 1)  # where the last run of that cheapest cut starts
    for end in range(1, n + 1):
        for start in range(max(0, end - most), end):
            cost = best[start] + overhead_tokens + (end - start) * lengths[start]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs: list[tuple[int, int]] = []
    end = n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]
