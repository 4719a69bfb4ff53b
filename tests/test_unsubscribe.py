"""Unsubscribe tokens: a malformed or forged token names no patient, and never raises."""

from __future__ import annotations

import random

import pytest

from drip.unsubscribe import make_token, read_token

KEY = "unsubscribe-test-key-0123456789abcdef"
OLD_KEY = "an-older-key-still-verifying-0123456789"
ODD = "0123456789.-_=+/ \t\n\x00abcXYZé١٢٣²³½ⅷ𝟗٫。．\u200b\ufeff\ud800"


def malformed_tokens() -> list[str]:
    """Hand-picked shapes, then seeded random strings and mutations of a good token."""
    good = make_token(KEY, 42)
    picked = [
        "", ".", "..", "١٢.abc", "²", "1.\u00e9", "1." + "é" * 22, "42", "42.", ".sig",
        "9" * 13 + ".x", "9" * 5000, "-1." + good.split(".")[1], "+42." + good.split(".")[1],
        " 42." + good.split(".")[1], "٤٢." + good.split(".")[1], good + "=", good + ".",
        good[:-1], good.upper(), "42." + "\ud800" * 22, "x" * 100_000,
    ]
    rng = random.Random(8)
    for _ in range(2000):
        picked.append("".join(rng.choice(ODD) for _ in range(rng.randint(0, 40))))
        chars = list(good)
        chars[rng.randrange(len(chars))] = rng.choice(ODD)
        picked.append("".join(chars))
    return [token for token in picked if token != good]


def test_every_malformed_token_reads_as_no_patient() -> None:
    for token in malformed_tokens():
        assert read_token(KEY, token) is None, repr(token)


def test_a_good_token_reads_back_its_patient() -> None:
    assert read_token(KEY, make_token(KEY, 42)) == 42
    assert read_token(OLD_KEY, make_token(KEY, 42)) is None
    assert read_token((OLD_KEY,), make_token(KEY, 42)) is None


@pytest.mark.parametrize("signer", [KEY, OLD_KEY])
def test_any_of_several_keys_verifies(signer: str) -> None:
    assert read_token((KEY, OLD_KEY), make_token(signer, 7)) == 7
    assert read_token((), make_token(signer, 7)) is None
