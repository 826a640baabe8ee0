"""Delivery reports matched to the bridge's mail and told once in its room (SQLite and
PostgreSQL), with a recording Matrix client."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from bridge.config import parse_config
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db.engine import Database
from bridge.mail.verp import item_of_address
from bridge.relay.bounces import BounceMailboxStore, Bounces, envelope_sender
from tests.integration.test_outbox_store import OTHER_ROOM, make_link, outgoing
from tests.unit.test_config import minimal
from tests.unit.test_dsn import PER_MESSAGE, block, report

CONFIG = parse_config(minimal(), env={})
FROM = "passerelle@agency.test"


class RecordingClient:
    """Records what the bot sends; anything else it is asked fails the test."""

    def __init__(self) -> None:
        self.sent: list[tuple[RoomID, dict[str, Any], str]] = []

    async def send_event(
        self, room_id: RoomID, event_type: str, content: dict[str, Any], txn_id: str
    ) -> EventID:
        assert event_type == "m.room.message"
        self.sent.append((room_id, content, txn_id))
        return EventID(f"$notice{len(self.sent)}")


def bounces(db: Database) -> tuple[Bounces, RecordingClient]:
    client = RecordingClient()
    return Bounces(CONFIG, db, client), client  # type: ignore[arg-type]


async def queued(db: Database, link: Link, event: str, **changes: Any) -> tuple[int, str]:
    """An outbox mail with its VERP envelope sender: (outbox id, envelope sender)."""
    item = outgoing(link, event, **changes)
    item_id = await outbox_db.enqueue(
        db, item, envelope=lambda i: envelope_sender(CONFIG, FROM, i)
    )
    assert item_id is not None
    sent = await outbox_db.sent_mail(db, item_id)
    assert sent is not None
    due = await outbox_db.DbOutboxStore(db).due(1e12, 10, set())
    (mail_from,) = [d.mail_from for d in due if d.id == item_id]
    return item_id, mail_from


def dsn(to: str, *statuses: str, returned_id: str | None = None, head: str = "") -> bytes:
    returned = ""
    if returned_id is not None:
        returned = (
            "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
            f"From: x@agency.test\r\nMessage-ID: <{returned_id}>\r\n\r\n"
        )
    blocks = "\r\n".join(statuses) or block("gone@lists.test", "failed", "5.1.1", "550 unknown")
    head = head or f"Return-Path: <>\r\nDelivered-To: {to}\r\n"
    return report(PER_MESSAGE + "\r\n" + blocks, returned=returned, head=head)


async def test_the_envelope_sender_names_the_item(db: Database) -> None:
    link = await make_link(db)
    item_id, mail_from = await queued(db, link, "$e1")
    assert mail_from.startswith("passerelle+b")
    assert mail_from.endswith("@agency.test")
    assert item_of_address(mail_from, CONFIG.bounce_secret) == item_id


async def test_a_report_is_told_once_as_a_reply_to_its_message(db: Database) -> None:
    link = await make_link(db)
    _, mail_from = await queued(db, link, "$e1", thread_root=EventID("$e1"))
    taker, client = bounces(db)
    raw = dsn(mail_from)
    assert await taker.take(link, raw)
    ((room, content, _),) = client.sent
    assert room == link.room_id
    assert content["msgtype"] == "m.notice"
    assert content["body"] == "Not delivered to gone@lists.test: 5.1.1 unknown"
    assert content["m.relates_to"] == {"m.in_reply_to": {"event_id": "$e1"}}
    # Read again (a crash before the mail was marked done): nothing new is said.
    assert await taker.take(link, raw)
    assert len(client.sent) == 1


async def test_in_a_thread_the_notice_stays_in_the_thread(db: Database) -> None:
    link = await make_link(db)
    _, mail_from = await queued(db, link, "$reply", thread_root=EventID("$root"))
    taker, client = bounces(db)
    assert await taker.take(link, dsn(mail_from))
    relation = client.sent[0][1]["m.relates_to"]
    assert relation["rel_type"] == "m.thread"
    assert relation["event_id"] == "$root"
    assert relation["m.in_reply_to"] == {"event_id": "$reply"}


async def test_ordinary_mail_is_not_taken(db: Database) -> None:
    link = await make_link(db)
    taker, client = bounces(db)
    assert not await taker.take(link, b"From: a@lists.test\r\nSubject: hi\r\n\r\nhello\r\n")
    assert client.sent == []


async def test_forged_tokens_and_unknown_mail_tell_nothing(db: Database) -> None:
    link = await make_link(db)
    _item_id, mail_from = await queued(db, link, "$e1")
    taker, client = bounces(db)
    forged = mail_from.replace(mail_from.split("-")[-1].split("@")[0], "aaaaaaaaaa")
    assert await taker.take(link, dsn(forged))
    assert await taker.take(link, dsn("passerelle+b999-abcdefghij@agency.test"))
    assert await taker.take(link, dsn(FROM, returned_id="unknown@agency.test"))
    # Not a report's empty return path: someone else's mail dressed as one.
    head = f"Return-Path: <x@lists.test>\r\nTo: {mail_from}\r\n"
    assert await taker.take(link, dsn(mail_from, head=head))
    assert client.sent == []


async def test_a_token_of_another_link_is_told_only_from_the_bounce_mailbox(db: Database) -> None:
    mine = await make_link(db)
    theirs = await make_link(db, "autre@lists.test", OTHER_ROOM)
    _, mail_from = await queued(db, theirs, "$e2")
    taker, client = bounces(db)
    assert await taker.take(mine, dsn(mail_from))
    assert client.sent == []
    store = BounceMailboxStore(db, taker)
    assert await store.needs_baseline("rebonds@agency.test")
    await store.set_baseline("rebonds@agency.test", 7, 3)
    assert await store.resume_point("rebonds@agency.test", 7) == 3
    assert await store.resume_point("rebonds@agency.test", 8) == 0
    await store.store_raw("rebonds@agency.test", 7, 4, dsn(mail_from))
    await store.store_raw("rebonds@agency.test", 7, 5, b"Subject: spam\r\n\r\nbuy\r\n")
    assert await store.resume_point("rebonds@agency.test", 7) == 5
    ((room, content, _),) = client.sent
    assert room == OTHER_ROOM
    assert content["m.relates_to"]["m.in_reply_to"] == {"event_id": "$e2"}


async def test_without_a_token_the_returned_message_id_finds_the_mail(db: Database) -> None:
    link = await make_link(db)
    item = outgoing(link, "$e3")
    assert await outbox_db.enqueue(db, item) is not None
    assert await mail_db.lookup(db, link.id, item.message_id) is not None
    taker, client = bounces(db)
    assert await taker.take(link, dsn(FROM, returned_id=item.message_id))
    assert client.sent[0][1]["m.relates_to"]["m.in_reply_to"] == {"event_id": "$e3"}


async def test_delayed_is_said_once_then_each_failure_once(db: Database) -> None:
    link = await make_link(db)
    _, mail_from = await queued(db, link, "$e4")
    taker, client = bounces(db)
    late = block("a@lists.test", "delayed", "4.4.1", "421 busy")
    assert await taker.take(link, dsn(mail_from, late))
    assert await taker.take(link, dsn(mail_from, late.replace("4.4.1", "4.4.2")))
    gone_a = block("a@lists.test", "failed", "5.1.1", "550 unknown")
    gone_b = block("b@lists.test", "failed", "5.2.2", "552 full")
    ok = block("c@lists.test", "delivered", "2.0.0")
    assert await taker.take(link, dsn(mail_from, gone_a, ok))
    assert await taker.take(link, dsn(mail_from, gone_a, gone_b))
    bodies = [content["body"] for _, content, _ in client.sent]
    assert bodies == [
        "Delivery delayed to a@lists.test: 4.4.1 busy (the mail servers keep trying)",
        "Not delivered to a@lists.test: 5.1.1 unknown",
        "Not delivered to b@lists.test: 5.2.2 full",
    ]
    assert len({txn for _, _, txn in client.sent}) == 3


async def test_a_paused_link_hears_nothing(db: Database) -> None:
    link = await make_link(db)
    _, mail_from = await queued(db, link, "$e5")
    taker, client = bounces(db)
    assert await taker.take(replace(link, paused=True), dsn(mail_from))
    assert client.sent == []
