"""API key format: ``sk-st-`` + 32 base62 random chars + 6 base62 chars of CRC-32 of the body.

The checksum is not a secret: it only lets the node refuse typos and garbage before any store
lookup. Keys are stored as their SHA-256 only; the public key id (``key_`` + 8 hex) is random
and stored next to the hash, so showing it reveals nothing about the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

KEY_PREFIX = "sk-st-"
BODY_LEN = 32  # 32 * log2(62) ~ 190 bits of randomness
CHECK_LEN = 6  # 62**6 > 2**32, so a whole CRC-32 fits
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_ID_PREFIX = "key_"

_BASE62 = re.compile(r"[0-9A-Za-z]+")
_KEY_ID = re.compile(r"key_[0-9a-f]{8}")


@dataclass(frozen=True, slots=True)
class KeyParts:
    body: str
    checksum: str


def _checksum(body: str) -> str:
    n = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(CHECK_LEN):
        n, r = divmod(n, 62)
        out.append(ALPHABET[r])
    return "".join(reversed(out))


def parse_key(secret: str) -> KeyParts | None:
    """The parts of a well-formed key, or None. Pure: never touches a store."""
    if not isinstance(secret, str) or len(secret) != len(KEY_PREFIX) + BODY_LEN + CHECK_LEN:
        return None
    if not secret.startswith(KEY_PREFIX):
        return None
    rest = secret[len(KEY_PREFIX) :]
    if not rest.isascii() or not _BASE62.fullmatch(rest):
        return None
    body, check = rest[:BODY_LEN], rest[BODY_LEN:]
    if not hmac.compare_digest(check, _checksum(body)):
        return None
    return KeyParts(body, check)


def hash_key(secret: str) -> str:
    """What the store keeps instead of the secret: hex SHA-256 (the secret has ~190 random bits,
    so a slow KDF would add nothing)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(4)


def is_key_id(value: str) -> bool:
    return bool(_KEY_ID.fullmatch(value))


def is_key_ref(value: str) -> bool:
    """A well-formed secret or key id: the only strings worth a store lookup."""
    return isinstance(value, str) and (is_key_id(value) or parse_key(value) is not None)


def generate_key() -> tuple[str, str, str]:
    """A fresh ``(secret, key_hash, key_id)``. The secret is shown once and never stored."""
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_LEN))
    secret = KEY_PREFIX + body + _checksum(body)
    return secret, hash_key(secret), new_key_id()


def hashes_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("ascii"), b.encode("ascii"))
