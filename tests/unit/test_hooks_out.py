"""Room → legacy system decisions: the JSON of each kind of event, webhook-ids, HTTP answers."""

from __future__ import annotations

import email.utils
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.core.hooks_out import (
    CREATED,
    EDITED,
    MAX_RETRY_AFTER,
    REDACTED,
    delivery_id,
    hook_payload,
    is_retryable,
    retry_after,
)
from bridge.core.matrix_event import NotSent
from bridge.core.remote_out import OutgoingPlan
from tests.unit.test_remote_out import ALICE, HOSTILE_HTML, TARGET, event, message, plan

ROOM = "!room:agence.example.org"


def payload(found: OutgoingPlan | NotSent, name: str | None = "Alice Martin") -> tuple[str, Any]:
    assert isinstance(found, OutgoingPlan), found
    result = hook_payload(found, hook="tickets", room_id=ROOM, sender_name=name, origin_ts=0)
    assert not isinstance(result, NotSent), result
    kind, body = result
    # Always plain JSON (what is stored and signed).
    assert json.loads(json.dumps(body)) == body
    return kind, body


def test_message_created() -> None:
    kind, body = payload(message({"msgtype": "m.text", "body": "Ticket 42 is urgent"}))
    assert kind == CREATED
    assert body == {
        "type": "message.created",
        "timestamp": "1970-01-01T00:00:00.000Z",
        "data": {
            "hook": "tickets",
            "room_id": ROOM,
            "event_id": "$ev1:agence.example.org",
            "sender": ALICE,
            "sender_name": "Alice Martin",
            "msgtype": "m.text",
            "text": "Ticket 42 is urgent",
        },
    }


def test_thread_reply_and_sanitised_html() -> None:
    content = {
        "msgtype": "m.text",
        "body": "> <@bob:x> quoted\n\nanswer",
        "format": "org.matrix.custom.html",
        "formatted_body": "<mx-reply>quoted</mx-reply><b>answer</b>" + HOSTILE_HTML,
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": TARGET,
            "is_falling_back": False,
            "m.in_reply_to": {"event_id": "$other:agence.example.org"},
        },
    }
    _kind, body = payload(message(content))
    data = body["data"]
    assert data["thread"] == TARGET
    assert data["reply_to"] == "$other:agence.example.org"
    assert data["text"] == "answer"
    assert data["html"].startswith("<b>answer</b>")
    for bad in ("<script", "onerror", "javascript:", "<mx-reply"):
        assert bad not in data["html"].lower()


def test_edit_names_the_edited_event() -> None:
    content = {
        "msgtype": "m.text",
        "body": "* fixed",
        "m.new_content": {"msgtype": "m.text", "body": "fixed"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": TARGET},
    }
    kind, body = payload(message(content))
    assert kind == EDITED
    assert body["type"] == "message.edited"
    assert body["data"]["edits"] == TARGET
    assert body["data"]["text"] == "fixed"


def test_redaction() -> None:
    found = plan(event({}, type_="m.room.redaction", redacts=TARGET))
    kind, body = payload(found, name=None)
    assert kind == REDACTED
    assert body["data"]["redacts"] == TARGET
    assert "sender_name" not in body["data"]
    assert "text" not in body["data"]


def test_reaction_is_not_sent() -> None:
    found = plan(
        event(
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": TARGET, "key": "👍"}},
            type_="m.reaction",
        )
    )
    assert isinstance(found, OutgoingPlan)
    result = hook_payload(found, hook="t", room_id=ROOM, sender_name=None, origin_ts=None)
    assert isinstance(result, NotSent)


def test_file_described_not_linked() -> None:
    content = {
        "msgtype": "m.file",
        "body": "report.pdf",
        "url": "mxc://agence.example.org/abc",
        "info": {"mimetype": "application/pdf", "size": 1234},
    }
    _kind, body = payload(message(content))
    assert body["data"]["file"] == {
        "name": "report.pdf",
        "content_type": "application/pdf",
        "size": 1234,
    }
    assert "mxc://" not in json.dumps(body)


@pytest.mark.parametrize("name", ["Alice\u202e evil", "A\nB", "\x00", "x" * 1000, "\u200b\u200b"])
def test_hostile_display_names_cleaned(name: str) -> None:
    _kind, body = payload(message({"msgtype": "m.text", "body": "hi"}), name=name)
    shown = body["data"].get("sender_name", "")
    assert shown.isprintable()
    assert len(shown) <= 255


def test_delivery_ids_stable_and_distinct() -> None:
    a = delivery_id("tickets", "$e1:x")
    assert a == delivery_id("tickets", "$e1:x")
    assert a.startswith("msg_")
    assert len(a) == 44
    assert a != delivery_id("alerts", "$e1:x")
    assert a != delivery_id("tickets", "$e2:x")
    # The separator keeps names and events apart.
    assert delivery_id("a", "b\nc") != delivery_id("a\nb", "c")


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (200, False),
        (301, False),
        (400, False),
        (401, False),
        (404, False),
        (410, False),
        (408, True),
        (425, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
    ],
)
def test_retryable_statuses(status: int, retry: bool) -> None:
    assert is_retryable(status) is retry


def test_retry_after() -> None:
    now = 1_700_000_000.0
    assert retry_after(None, now) is None
    assert retry_after("", now) is None
    assert retry_after("120", now) == 120.0
    assert retry_after("99999999", now) == MAX_RETRY_AFTER
    assert retry_after("-5", now) is None
    assert retry_after("soon", now) is None
    # Regression: "²".isdigit() is true, and float("²") raised (a hostile receiver's header
    # stopped the delivery worker).
    for odd in ("²", "١٢", "𝟗", "1²"):
        assert retry_after(odd, now) is None
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after(date, now) == pytest.approx(30, abs=1)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert retry_after(past, now) == 0.0


@given(st.text(max_size=60))
def test_retry_after_never_raises(value: str) -> None:
    found = retry_after(value, 1_700_000_000.0)
    assert found is None or 0.0 <= found <= MAX_RETRY_AFTER
