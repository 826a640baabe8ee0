"""Webhook → room: the shape of a hook's JSON body, and the Matrix message made from it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.html import sanitize_html
from bridge.core.ids import EventID

MAX_TEXT = 32_000  # characters; well under Synapse's 64 KiB event limit with the HTML
MAX_HTML = 48_000
MAX_SENDER = 64
MAX_THREAD_KEY = 255
BODY_KEYS = ("text", "html", "sender", "thread")

# A link to a Matrix user, room or event becomes a "pill" in clients; a webhook does not get
# to show one (it could look like a mention). Sanitised HTML always quotes href with ".
_MATRIX_LINK = re.compile(
    r'<a href="(?:https://matrix\.to/|matrix:)[^"]*"[^>]*>(.*?)</a>', re.IGNORECASE | re.DOTALL
)


class BadHookBody(ValueError):
    """The body is not a hook message; the text says why, for the HTTP answer."""


@dataclass(frozen=True)
class HookMessage:
    text: str
    html: str | None = None
    sender: str | None = None
    thread: str | None = None


def _string(data: dict[str, Any], key: str, limit: int) -> str | None:
    value = data.get(key)
    if value is None and key != "text":
        return None
    if not isinstance(value, str):
        raise BadHookBody(f"{key!r} must be a string")
    if len(value) > limit:
        raise BadHookBody(f"{key!r} is longer than {limit} characters")
    return value


def parse_hook_body(body: bytes) -> HookMessage:
    """The message of a hook request's body, or BadHookBody."""
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise BadHookBody("the body is not JSON") from None
    if not isinstance(data, dict):
        raise BadHookBody("the body must be a JSON object")
    for key in data:
        if key not in BODY_KEYS:
            raise BadHookBody(f"unknown key {str(key)[:40]!r} (known: {', '.join(BODY_KEYS)})")
    text = _string(data, "text", MAX_TEXT)
    if not text or not text.strip():
        raise BadHookBody("'text' must not be empty")
    sender = _string(data, "sender", MAX_SENDER)
    thread = _string(data, "thread", MAX_THREAD_KEY)
    if thread is not None and (not thread or not thread.isprintable()):
        raise BadHookBody("'thread' must be non-empty printable text")
    html = _string(data, "html", MAX_HTML)
    return HookMessage(text=text, html=html, sender=sender, thread=thread)


def hook_display_name(hook: str, sender: str | None) -> str:
    """ "SENDER (via webhook NAME)", or "NAME (webhook)" without a (visible) sender."""
    shown = clean_display_name(sender, MAX_SENDER) if sender else ""
    return f"{shown} (via webhook {hook})" if shown else f"{hook} (webhook)"


def hook_message_content(message: HookMessage, thread_root: EventID | None) -> dict[str, Any]:
    """The m.room.message content: text, sanitised HTML without pills, no mentions, in the
    thread started by `thread_root` if given."""
    content: dict[str, Any] = {"msgtype": "m.text", "body": message.text, "m.mentions": {}}
    if message.html:
        cleaned = sanitize_html(message.html, image_urls={}, max_input=MAX_HTML)
        cleaned = _MATRIX_LINK.sub(r"\1", cleaned)
        if cleaned:
            content["format"] = "org.matrix.custom.html"
            content["formatted_body"] = cleaned
    if thread_root is not None:
        content["m.relates_to"] = {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": thread_root},
        }
    return content
