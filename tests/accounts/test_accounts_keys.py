from __future__ import annotations

import hashlib
import re

from node.accounts.keys import (
    ALPHABET,
    generate_key,
    hash_key,
    hashes_equal,
    is_key_id,
    parse_key,
)


def test_generated_key_shape() -> None:
    secret, key_hash, key_id = generate_key()
    assert re.fullmatch(r"sk-st-[0-9A-Za-z]{38}", secret)
    assert key_hash == hashlib.sha256(secret.encode()).hexdigest() == hash_key(secret)
    assert is_key_id(key_id) and re.fullmatch(r"key_[0-9a-f]{8}", key_id)
    assert secret not in key_hash and key_id[4:] not in secret
    parts = parse_key(secret)
    assert parts is not None and secret == "sk-st-" + parts.body + parts.checksum
    assert len({generate_key()[0] for _ in range(50)}) == 50


def test_every_single_char_typo_is_refused() -> None:
    secret = generate_key()[0]
    for i in range(len("sk-st-"), len(secret)):
        for c in "0aZ":
            if secret[i] != c:
                assert parse_key(secret[:i] + c + secret[i + 1 :]) is None


def test_malformed_keys() -> None:
    secret = generate_key()[0]
    for bad in [
        "",
        "sk-st-",
        secret[:-1],
        secret + "0",
        "sk-xx-" + secret[6:],
        secret.upper(),
        secret[:10] + "-" + secret[11:],
        secret[:10] + "é" + secret[11:],
        " " + secret[1:],
        "Bearer " + secret,
    ]:
        assert parse_key(bad) is None, bad
    assert parse_key(None) is None  # type: ignore[arg-type]
    assert len(ALPHABET) == 62


def test_hash_compare() -> None:
    a, b = hash_key("x"), hash_key("y")
    assert hashes_equal(a, a) and not hashes_equal(a, b)
