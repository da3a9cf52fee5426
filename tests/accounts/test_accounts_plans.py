from __future__ import annotations

import dataclasses

import pytest

from node.accounts.plans import PAYG_FREE_TOKENS, PLANS, Plan, Window, custom_plan, get_plan


def test_plans_match_price_list() -> None:
    table = {p.slug: (p.name, p.limit_tokens, p.window) for p in PLANS.values()}
    assert table == {
        "early-adopter": ("Early Adopter", 100_000, Window.DAY),
        "hobby-mini": ("Hobby Mini", 50_000, Window.DAY),
        "hobby": ("Hobby", 250_000, Window.DAY),
        "agent-mini": ("Agent Mini", 100_000, Window.HOUR),
        "agent": ("Agent", 500_000, Window.HOUR),
        "agent-pro": ("Agent Pro", 1_000_000, Window.HOUR),
        "payg": ("Pay-as-you-go", 100_000, Window.BALANCE),
    }
    assert PAYG_FREE_TOKENS == 100_000
    assert [w.value for w in Window] == ["day", "hour", "balance"]


def test_plan_is_frozen_and_lookup() -> None:
    plan = get_plan("agent")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.limit_tokens = 1  # type: ignore[misc]
    with pytest.raises(KeyError, match="known: early-adopter"):
        get_plan("agent-scale")


def test_custom_plan() -> None:
    assert custom_plan(5_000_000, "hour") == Plan("custom", "Custom", 5_000_000, Window.HOUR)
    assert custom_plan(10, Window.BALANCE).window is Window.BALANCE
    with pytest.raises(ValueError):
        custom_plan(-1, Window.DAY)
    with pytest.raises(ValueError):
        custom_plan(1, "week")
