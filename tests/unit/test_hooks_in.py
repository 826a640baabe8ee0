"""A webhook's JSON body: its shape, and the Matrix message made from it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.core.hooks_in import (
    BadHookBody,
    HookMessage,
    hook_display_name,
    hook_message_content,
    parse_hook_body,
)
from bridge.core.ids import EventID


def body(**data: Any) -> bytes:
    return json.dumps(data).encode()


def test_full_body() -> None:
    got = parse_hook_body(body(text="t", html="<b>t</b>", sender="CI", thread="build-1"))
    assert got == HookMessage(text="t", html="<b>t</b>", sender="CI", thread="build-1")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "JSON object"),
        (body(), "'text'"),
        (body(text=""), "empty"),
        (body(text="  "), "empty"),
        (body(text=3), "string"),
        (body(text="x", html=["a"]), "'html'"),
        (body(text="x", sender=1), "'sender'"),
        (body(text="x", sender="s" * 65), "longer"),
        (body(text="x", thread="a\nb"), "printable"),
        (body(text="x", colour="red"), "unknown key"),
        (body(text="x" * 32_001), "longer"),
    ],
)
def test_bad_bodies(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadHookBody, match=fragment):
        parse_hook_body(raw)


def test_display_names() -> None:
    assert hook_display_name("ci", None) == "ci (webhook)"
    assert hook_display_name("ci", "Jenkins") == "Jenkins (via webhook ci)"
    assert hook_display_name("ci", "\u202e\u200b") == "ci (webhook)"


def test_content_sanitised_no_pills_no_mentions() -> None:
    message = HookMessage(
        text="@room build failed",
        html='<b>failed</b><script>alert(1)</script> <a href="https://matrix.to/#/@a:b">Al</a>'
        ' <a href="https://ci.example.org/1">log</a>',
    )
    content = hook_message_content(message, None)
    assert content["m.mentions"] == {}
    assert content["body"] == "@room build failed"
    assert content["formatted_body"] == (
        '<b>failed</b> Al <a href="https://ci.example.org/1">log</a>'
    )
    assert "m.relates_to" not in content


def test_content_in_thread() -> None:
    content = hook_message_content(HookMessage(text="x", html="<script></script>"), EventID("$r"))
    assert "formatted_body" not in content
    assert content["m.relates_to"]["rel_type"] == "m.thread"
    assert content["m.relates_to"]["event_id"] == "$r"
