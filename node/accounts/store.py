"""The Store protocol every accounting backend implements, and its data types and errors.

Flow of one request: ``authenticate`` the bearer secret, ``reserve`` the worst case (prompt +
max_tokens) before running the model, ``settle`` the real count afterwards. See
``node.accounts.windows`` for how charges are dated and counted.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .plans import Plan, Window


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str | None
    plan_slug: str
    limit_tokens: int
    """Per window; for balance keys the total ever granted (free tokens + top-ups)."""
    window: Window
    revoked: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class Usage:
    limit: int
    used: int
    remaining: int

    @classmethod
    def of(cls, limit: int, used: int) -> Usage:
        return cls(limit, used, max(0, limit - used))


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    key_id: str
    tokens: int


class StoreUnavailable(Exception):
    """The database / redis cannot be reached or answered with an error. Maps to a 503."""


class KeyNotFound(LookupError):
    """No such key (or, for ``reserve``, the key is revoked)."""


class ReservationNotFound(LookupError):
    pass


class QuotaExceeded(Exception):
    """The reservation does not fit. ``retry_after_s``: seconds until it would fit if nothing
    else happened meanwhile (holds counted as lasting until they expire); None when waiting
    cannot help (over the whole limit, or a balance that needs a top-up). ``held``: the part
    of ``usage.used`` that is holds of the key's requests still in flight (``holds`` of them),
    which settle to what those requests use, at most what they hold."""

    def __init__(
        self,
        usage: Usage,
        requested: int,
        retry_after_s: float | None,
        held: int = 0,
        holds: int = 0,
    ) -> None:
        wait = "never without a top-up" if retry_after_s is None else f"{retry_after_s:.0f} s"
        super().__init__(
            f"token limit exceeded: requested {requested}, remaining {usage.remaining} "
            f"of {usage.limit}; retry after {wait}"
        )
        self.usage = usage
        self.requested = requested
        self.retry_after_s = retry_after_s
        self.held = held
        self.holds = holds

    def fits_if_freed(self, tokens: int) -> bool:
        """Whether the request fits once ``tokens`` of the key's holds are given back."""
        freed = min(tokens, self.held)
        return freed > 0 and self.usage.used - freed + self.requested <= self.usage.limit

    @property
    def retry_after(self) -> float:
        """``retry_after_s`` with "never" as ``math.inf``."""
        return math.inf if self.retry_after_s is None else self.retry_after_s


def new_reservation_id() -> str:
    return "res_" + secrets.token_hex(12)


def check_tokens(tokens: int, what: str = "tokens", *, positive: bool = False) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, int):
        raise TypeError(f"{what} must be an int")
    if tokens < 0 or (positive and tokens == 0):
        raise ValueError(f"{what} must be {'> 0' if positive else '>= 0'}")
    return tokens


@runtime_checkable
class Store(Protocol):
    """Accounting backend. All methods raise ``StoreUnavailable`` when the backend is down.

    ``key_or_id`` is either a public key id (``key_xxxxxxxx``) or the full secret. ``now`` is
    epoch seconds, passed in so callers (and tests) own the clock.
    """

    async def create_key(
        self, plan: Plan, name: str | None = None, tokens: int | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key on ``plan``; ``tokens`` overrides the plan's limit (or starting balance).
        Returns the secret (shown once, never stored) and the record."""
        ...

    async def authenticate(self, secret: str) -> KeyRecord | None:
        """The live key for a bearer secret; None if malformed (no lookup), unknown or revoked."""
        ...

    async def authenticate_usage(self, secret: str, now: float) -> tuple[KeyRecord, Usage] | None:
        """``authenticate`` and ``usage`` together (one round trip where the backend allows):
        what every request needs before anything else."""
        ...

    async def list_keys(self) -> list[KeyRecord]:
        """All keys, oldest first."""
        ...

    async def get_key(self, key_or_id: str) -> KeyRecord | None: ...

    async def revoke(self, key_or_id: str) -> bool:
        """Revoke; True if the key exists (revoking twice is fine)."""
        ...

    async def topup(self, key_or_id: str, tokens: int) -> KeyRecord:
        """Add purchased tokens to a balance key. KeyNotFound / ValueError (not a balance key)."""
        ...

    async def usage(self, key_id: str, now: float) -> Usage: ...

    async def reserve(self, key_id: str, tokens: int, now: float) -> tuple[Reservation, Usage]:
        """Hold ``tokens`` against the key, atomically with the check. The returned Usage
        includes this reservation. Raises QuotaExceeded, KeyNotFound (unknown or revoked)."""
        ...

    async def settle(self, reservation_id: str, actual_tokens: int, now: float) -> Usage:
        """Replace the hold by the real charge (less or more than reserved). Idempotent: a
        second settle of the same reservation changes nothing. Raises ReservationNotFound."""
        ...

    async def ping(self) -> None:
        """Returns when the backend answers; raises StoreUnavailable otherwise."""
        ...

    async def close(self) -> None: ...
