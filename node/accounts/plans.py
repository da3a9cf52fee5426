"""The plans of the public price list, as one table in code."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Window(StrEnum):
    """How a key's token limit is measured."""

    DAY = "day"
    """Calendar day in the store's timezone; resets at local midnight."""
    HOUR = "hour"
    """Rolling 60 minutes; each charge frees 3600 s after it was reserved."""
    BALANCE = "balance"
    """Pay-as-you-go: purchased tokens (plus the free grant), never reset, grown by top-ups."""


@dataclass(frozen=True, slots=True)
class Plan:
    slug: str
    name: str
    limit_tokens: int
    """Tokens per window; for ``Window.BALANCE`` the balance a new key starts with."""
    window: Window


PAYG_FREE_TOKENS = 100_000
CUSTOM_SLUG = "custom"

PLANS: dict[str, Plan] = {
    p.slug: p
    for p in (
        Plan("early-adopter", "Early Adopter", 100_000, Window.DAY),
        Plan("hobby-mini", "Hobby Mini", 50_000, Window.DAY),
        Plan("hobby", "Hobby", 250_000, Window.DAY),
        Plan("agent-mini", "Agent Mini", 100_000, Window.HOUR),
        Plan("agent", "Agent", 500_000, Window.HOUR),
        Plan("agent-pro", "Agent Pro", 1_000_000, Window.HOUR),
        Plan("payg", "Pay-as-you-go", PAYG_FREE_TOKENS, Window.BALANCE),
    )
}


def get_plan(slug: str) -> Plan:
    """The plan named ``slug``; raises KeyError listing the known slugs."""
    try:
        return PLANS[slug]
    except KeyError:
        raise KeyError(f"unknown plan {slug!r}; known: {', '.join(PLANS)}") from None


def custom_plan(limit_tokens: int, window: Window | str) -> Plan:
    """A plan outside the price list (e.g. Agent Scale deals, internal keys)."""
    if limit_tokens < 0:
        raise ValueError("limit_tokens must be >= 0")
    return Plan(CUSTOM_SLUG, "Custom", int(limit_tokens), Window(window))
