"""Which events may share one commit of their queued mail with the room's events before them
(the dispatcher's groups): messages, not what reads the queue (commands, redactions)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.core.ids import EventID, RoomID, UserID
from bridge.db.inbox import InboxEvent
from bridge.relay.mail_out import groupable

BOT = "@passerelle:agency.example"
PREFIX = "!passerelle"


def event(event_type: str, content: Any, sender: str = "@alice:agency.example") -> InboxEvent:
    return InboxEvent(
        seq=1,
        event_id=EventID("$e"),
        room_id=RoomID("!room:agency.example"),
        event_type=event_type,
        sender=UserID(sender),
        event={"content": content},
        attempts=0,
    )


@pytest.mark.parametrize(
    "body",
    [
        "Bonjour à tous",
        "!passerellefoo is not the prefix as a word",
        "about !passerelle links, later",
    ],
)
def test_a_message_joins(body: str) -> None:
    assert groupable(event("m.room.message", {"msgtype": "m.text", "body": body}), BOT, PREFIX)


@pytest.mark.parametrize(
    "body",
    [
        "!passerelle links",
        "  !passerelle unlink list@agency.example",
        # The bot reads the prefix in any case: a group must not run past such a command.
        "!PASSERELLE unlink list@agency.example",
        "!Passerelle",
    ],
)
def test_a_command_does_not(body: str) -> None:
    assert not groupable(event("m.room.message", {"msgtype": "m.text", "body": body}), BOT, PREFIX)


def test_neither_does_a_redaction_the_bots_own_words_or_a_state_event() -> None:
    assert not groupable(event("m.room.redaction", {"redacts": "$x"}), BOT, PREFIX)
    assert not groupable(event("m.room.message", {"body": "hello"}, sender=BOT), BOT, PREFIX)
    assert not groupable(event("m.room.member", {"membership": "join"}), BOT, PREFIX)


def test_a_message_without_a_text_body_joins() -> None:
    assert groupable(
        event("m.room.message", {"msgtype": "m.image", "url": "mxc://a/b"}), BOT, PREFIX
    )
    assert groupable(event("m.room.message", "not an object"), BOT, PREFIX)
