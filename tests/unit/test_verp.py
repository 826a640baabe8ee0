"""VERP tokens: short, a-z0-9-, naming one outbox item, unforgeable without the secret."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.mail.verp import item_of_address, item_of_token, verp_address, verp_token

SECRET = b"s" * 32
OTHER = b"o" * 32


@given(st.integers(min_value=1, max_value=2**62))
def test_a_token_names_its_item_and_only_uses_safe_characters(item_id: int) -> None:
    token = verp_token(item_id, SECRET)
    assert re.fullmatch(r"[a-z0-9-]+", token)
    assert len(token) <= 25
    assert item_of_token(token, SECRET) == item_id
    assert item_of_token(token.upper(), SECRET) == item_id  # a server may change the case
    assert item_of_token(token, OTHER) is None


@given(st.integers(min_value=1, max_value=10**9), st.text(max_size=40))
def test_an_address_round_trips_and_anything_else_names_nothing(item_id: int, junk: str) -> None:
    address = verp_address("liste@achats.gouv.fr", item_id, SECRET)
    assert address.startswith("liste+")
    assert address.endswith("@achats.gouv.fr")
    assert item_of_address(address, SECRET) == item_id
    assert item_of_address(f"<{address}>", SECRET) == item_id
    assert item_of_address(f"liste+{junk}@achats.gouv.fr", SECRET) in (None,)


def test_forged_tokens_are_refused() -> None:
    token = verp_token(42, SECRET)
    prefix, mac = token.split("-")
    assert item_of_token(f"b{43:x}-{mac}", SECRET) is None  # another item, same tag
    assert item_of_token(f"{prefix}-{'a' * 10}", SECRET) is None
    assert item_of_token(f"b0{prefix[1:]}-{mac}", SECRET) is None  # leading zero: not ours
    assert item_of_token(token + "x", SECRET) is None
    assert item_of_token("", SECRET) is None
    assert item_of_address("liste@achats.gouv.fr", SECRET) is None
    assert item_of_address(f"liste+{token}", SECRET) is None  # no domain


def test_the_base_may_carry_its_own_plus_and_a_long_one_goes_without_a_token() -> None:
    tagged = verp_address("a+b@d.test", 7, SECRET)
    assert item_of_address(tagged, SECRET) == 7
    long_base = "x" * 60 + "@d.test"
    assert verp_address(long_base, 7, SECRET) == long_base


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        verp_token(1, b"short")
    with pytest.raises(ValueError, match="positive"):
        verp_token(0, SECRET)
    with pytest.raises(ValueError, match="local@domain"):
        verp_address("nodomain", 1, SECRET)
