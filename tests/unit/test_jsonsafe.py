"""JSON from another server: strict, and never too deep to read."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.remote.jsonsafe import MAX_DEPTH, flatten, loads


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def depth_of(value: object) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (list, dict)):
            depth = max(depth, level)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return depth


def test_ordinary_json_is_read_as_is() -> None:
    text = '{"a": [1, {"b": "c[{"}], "d": "\\"]"}'
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 2000, 100_000])
def test_too_deep_values_become_null(depth: int) -> None:
    value = loads('{"keep": 1, "deep": ' + nested(depth) + ', "after": "x"}')
    assert value["keep"] == 1
    assert value["after"] == "x"
    assert depth_of(value) <= MAX_DEPTH
    json.dumps(value)  # and it can be written back


def test_exactly_the_limit_is_kept() -> None:
    value = loads(nested(MAX_DEPTH))
    assert depth_of(value) == MAX_DEPTH


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"s": "[" * 5000, "t": "\\]" * 10})
    assert loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["[NaN]", "[Infinity]", "[-Infinity]", "[" * 500, "{", "x"])
def test_not_json_is_refused(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the parser's own messages vary
        loads(text)


def test_invalid_utf8_is_refused() -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        loads(b'{"a": "\xff"}')


def test_flatten_leaves_unbalanced_text_to_the_parser() -> None:
    assert flatten("[[[", 1) == "[[["


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_shallow_documents_round_trip(value: object) -> None:
    assert loads(json.dumps(value)) == value
