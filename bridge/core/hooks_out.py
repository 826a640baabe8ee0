"""Room → legacy system, the decisions: the JSON a room event becomes for an outbound hook, its
webhook-id, and what the receiver's HTTP answer means (no I/O: the relay queues, posts and
records)."""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import re
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.matrix_event import NotSent
from bridge.core.remote_out import OutgoingPlan

__all__ = [
    "CREATED",
    "EDITED",
    "REDACTED",
    "delivery_id",
    "hook_payload",
    "is_retryable",
    "retry_after",
]

CREATED = "message.created"
EDITED = "message.edited"
REDACTED = "message.redacted"
# Answers worth trying again: the receiver is busy, restarting or rate limiting.
_RETRY_STATUSES = frozenset({408, 425, 429})
MAX_RETRY_AFTER = 3600.0  # seconds: a longer Retry-After is capped, not obeyed
_DELTA_SECONDS = re.compile(r"[0-9]{1,10}")  # ASCII digits only ("²".isdigit() is true)


def delivery_id(hook: str, event_id: str) -> str:
    """The webhook-id of an event's delivery to a hook: the same on every attempt (the
    receiver drops a repeat), different for every hook."""
    digest = hashlib.sha256(json.dumps([hook, event_id]).encode()).hexdigest()
    return f"msg_{digest[:40]}"


def _iso(ms: int | None) -> str:
    when = dt.datetime.now(dt.UTC) if ms is None else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def hook_payload(
    plan: OutgoingPlan,
    *,
    hook: str,
    room_id: str,
    sender_name: str | None,
    origin_ts: int | None,
) -> tuple[str, dict[str, Any]] | NotSent:
    """(type, JSON body) an outbound hook receives for a planned room event, or why nothing.

    Body: {"type", "timestamp", "data"} as Standard Webhooks recommends; data names the hook,
    room, event and sender, and carries the text (HTML only as sanitised by the plan), the
    thread root and the replied-to event; an edit names the edited event, a redaction the
    redacted one."""
    data: dict[str, Any] = {
        "hook": hook,
        "room_id": room_id,
        "event_id": plan.event_id,
        "sender": plan.sender,
    }
    name = clean_display_name(sender_name or "", 255)
    if name:
        data["sender_name"] = name
    if plan.kind == "redaction":
        data["redacts"] = plan.target
        return REDACTED, _body(REDACTED, origin_ts, data)
    if plan.kind != "message":
        return NotSent(f"a {plan.kind} is not passed to webhooks")
    content = plan.content
    data["msgtype"] = content.get("msgtype", "m.text")
    data["text"] = content.get("body", "")
    formatted = content.get("formatted_body")
    if isinstance(formatted, str) and formatted.strip():
        data["html"] = formatted
    if plan.media is not None:
        data["file"] = {
            "name": plan.media.get("filename", "file"),
            "content_type": plan.media.get("content_type", "application/octet-stream"),
            "size": plan.media.get("size"),
        }
    if plan.thread_root is not None:
        data["thread"] = plan.thread_root
    if plan.reply_to is not None:
        data["reply_to"] = plan.reply_to
    kind = CREATED
    if plan.replaces is not None:
        kind = EDITED
        data["edits"] = plan.replaces
    return kind, _body(kind, origin_ts, data)


def _body(kind: str, origin_ts: int | None, data: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "timestamp": _iso(origin_ts), "data": data}


def is_retryable(status: int) -> bool:
    """A non-2xx answer that may pass (busy, overloaded, restarting): tried again later. Any
    other (a 3xx, which is never followed, or a 4xx) is the receiver's refusal."""
    return status >= 500 or status in _RETRY_STATUSES


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped at
    MAX_RETRY_AFTER; None when absent or not readable."""
    if not value:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, min(when.timestamp() - now, MAX_RETRY_AFTER))
