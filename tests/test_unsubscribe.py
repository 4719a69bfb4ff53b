"""Unsubscribe tokens: a malformed or forged token names no patient, and never raises."""

from __future__ import annotations

import random

import pytest

from drip.patients import new_public_id
from drip.unsubscribe import make_token, read_token

KEY = "unsubscribe-test-key-0123456789abcdef"
PUBLIC_ID = "q8Xo3mZ0bR1uV2wT4yA5cQ"  # a public id as drip.patients.new_public_id makes them
OLD_KEY = "an-older-key-still-verifying-0123456789"
ODD = "0123456789.-_=+/ \t\n\x00abcXYZé١٢٣²³½ⅷ𝟗٫。．\u200b\ufeff\ud800"


def malformed_tokens() -> list[str]:
    """Hand-picked shapes, then seeded random strings and mutations of a good token."""
    good = make_token(KEY, PUBLIC_ID)
    sig = good.split(".")[1]
    picked = [
        "",
        ".",
        "..",
        "١٢.abc",
        "²",
        "1.\u00e9",
        "1." + "é" * 22,
        "42",
        "42.",
        ".sig",
        "9" * 13 + ".x",
        "9" * 5000,
        "-1." + sig,
        "42." + sig,
        PUBLIC_ID,
        PUBLIC_ID + ".",
        " " + good,
        good + " ",
        good + "=",
        good + ".",
        good + "\n",
        good[:-1],
        good[1:],
        good.upper(),
        good.lower(),
        PUBLIC_ID + "." + "\ud800" * 22,
        "x" * 100_000,
        f"{PUBLIC_ID}={sig}",
        f"{sig}.{PUBLIC_ID}",
        f"{PUBLIC_ID}.{sig}.{sig}",
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


def test_a_good_token_reads_back_its_public_id() -> None:
    assert read_token(KEY, make_token(KEY, PUBLIC_ID)) == PUBLIC_ID
    assert read_token(OLD_KEY, make_token(KEY, PUBLIC_ID)) is None
    assert read_token((OLD_KEY,), make_token(KEY, PUBLIC_ID)) is None


@pytest.mark.parametrize("signer", [KEY, OLD_KEY])
def test_any_of_several_keys_verifies(signer: str) -> None:
    assert read_token((KEY, OLD_KEY), make_token(signer, PUBLIC_ID)) == PUBLIC_ID
    assert read_token((), make_token(signer, PUBLIC_ID)) is None


def test_a_token_signed_for_one_public_id_does_not_name_another() -> None:
    other = new_public_id()
    forged = f"{other}.{make_token(KEY, PUBLIC_ID).split('.')[1]}"
    assert read_token(KEY, forged) is None


def test_public_ids_are_22_url_safe_characters_and_all_different() -> None:
    ids = {new_public_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 22 and read_token(KEY, make_token(KEY, i)) == i for i in ids)
