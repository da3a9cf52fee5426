"""Cutting a gathered embeddings batch into forward passes (pure logic)."""

from __future__ import annotations

import itertools
import random

import pytest

from node.engines.embed_passes import PassCost, split_into_passes


def _cost(lengths: list[int], runs: list[tuple[int, int]], overhead: float) -> float:
    return sum(overhead + (end - start) * lengths[start] for start, end in runs)


def _all_cuts(n: int, most: int) -> list[list[tuple[int, int]]]:
    """Every way to cut n texts into runs of at most ``most``."""
    ways = []
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        runs = list(itertools.pairwise(bounds))
        if all(end - start <= most for start, end in runs):
            ways.append(runs)
    return ways


@pytest.mark.parametrize("seed", range(40))
def test_the_cut_is_the_cheapest_of_all_cuts(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    lengths = sorted((rng.randint(3, 120) for _ in range(n)), reverse=True)
    overhead = rng.choice([0.0, 5.0, 32.0, 200.0])
    most = rng.randint(1, 10)
    runs = split_into_passes(lengths, overhead, most)
    # The runs cover the texts in order, each at most ``most`` long.
    assert [i for start, end in runs for i in range(start, end)] == list(range(n))
    assert all(0 < end - start <= most for start, end in runs)
    cheapest = min(_cost(lengths, way, overhead) for way in _all_cuts(n, most))
    assert _cost(lengths, runs, overhead) == pytest.approx(cheapest)


def test_alike_texts_fill_passes_and_a_long_one_goes_alone() -> None:
    assert len(split_into_passes([20] * 10, 32.0, 4)) == 3  # as few passes as ``most`` allows
    # 80 tokens of padding for each short text beside the long one: it gets its own pass.
    assert split_into_passes([100, 20, 20, 20], 32.0, 8) == [(0, 1), (1, 4)]
    # With passes that cost nothing beyond their tokens, no text is padded at all.
    lengths = [50, 40, 40, 30, 12, 12, 12]
    runs = split_into_passes(lengths, 0.0, 64)
    assert all(len(set(lengths[start:end])) == 1 for start, end in runs)
    assert split_into_passes([], 32.0, 8) == []


def test_pass_cost_is_the_line_through_two_timed_passes() -> None:
    cost = PassCost.from_two_passes((16, 0.0055), (516, 0.0555))
    assert cost.per_token_s == pytest.approx(0.0001)
    assert cost.fixed_s == pytest.approx(0.0039)
    assert cost.overhead_tokens == pytest.approx(39.0)
    # A larger pass timed no slower (a GPU far from busy): padding is free, passes get big.
    flat = PassCost.from_two_passes((16, 0.008), (512, 0.007))
    assert flat.per_token_s == 0.0 and flat.overhead_tokens >= 1e6
    assert split_into_passes([90, 50, 10], flat.overhead_tokens, 8) == [(0, 3)]
