"""MailRelay's pipeline on the real database: a room's next mails prepared while one is sent,
posted mails recorded off the send path, and what that must never change (exactly once,
order, threads, a crash between a send and its record)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from bridge.audit_cli import verify
from bridge.config.mail import TrustSettings
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link
from bridge.core.message import IncomingMessage
from bridge.core.tasks import TaskGroup
from bridge.core.threading import ThreadTarget
from bridge.db import audit as audit_db
from bridge.db import mail as mail_db
from bridge.db.engine import Database
from bridge.mail.authcheck import SenderAuthenticator
from bridge.mail.ingest import make_parser
from bridge.relay.mail_in import MailRelay
from tests.integration import test_mail_relay as base
from tests.integration.test_mail_relay import (
    LIST_B,
    MAX_ATTEMPTS,
    MTA,
    ROOM_A,
    ROOM_B,
    RecordingPoster,
    Relay,
    mail_config,
    make_mail,
)

# The relay on a real database, and that database, as test_mail_relay makes them.
database = base.database
relay = base.relay


class HeldRecords:
    """mail_db.record_posted_many held until released, and counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail_first: int = 0) -> None:
        self.real = mail_db.record_posted_many
        self.gate = asyncio.Event()
        self.calls = 0
        self.fail_first = fail_first
        monkeypatch.setattr(mail_db, "record_posted_many", self.record)

    async def record(self, db: Database, posted: list[mail_db.PostedMail]) -> None:
        self.calls += 1
        await self.gate.wait()
        if self.calls <= self.fail_first:
            raise RuntimeError("database gone for a moment")
        await self.real(db, posted)


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_posting_does_not_wait_for_the_records(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldRecords(monkeypatch)
    link = await relay.link()
    other = await relay.link(LIST_B, ROOM_B)
    for uid in (1, 2, 3):
        await relay.deliver(link, uid, make_mail(f"A{uid}"))
        await relay.deliver(other, uid, make_mail(f"B{uid}"))
    # Every mail of both rooms is posted while no record can commit.
    await until(lambda: len(relay.poster.posts) == 6)
    assert set((await relay.states(link)).values()) == {"pending"}
    assert [p.message.subject for p in relay.poster.posts if p.room == ROOM_A] == [
        "A1",
        "A2",
        "A3",
    ]
    held.gate.set()
    await relay.settle()
    assert await relay.states(link) == {1: "done", 2: "done", 3: "done"}
    assert await relay.states(other) == {1: "done", 2: "done", 3: "done"}
    assert len(await relay.mapped(link)) == 3
    # Records gathered while the first commit was held went in fewer commits than mails.
    assert held.calls < 6
    assert len(relay.poster.posts) == 6
    # One audit row per posted mail, in the order of the posts, and the chain holds.
    posted = [
        row.entry.ids["event_id"]
        async for row in audit_db.rows(relay.db)
        if row.entry.direction == "mail_in"
    ]
    assert posted == [p.event_id for p in relay.poster.posts]
    _, broken = await verify(relay.db)
    assert broken is None


async def test_a_reply_finds_its_root_before_the_root_is_recorded(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldRecords(monkeypatch)
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Budget", message_id="root@gouv.fr"))
    await relay.deliver(
        link, 2, make_mail("Re: Budget", message_id="re@gouv.fr", in_reply_to="root@gouv.fr")
    )
    await relay.deliver(
        link,
        3,
        make_mail(
            "Re: Re: Budget",
            message_id="re2@gouv.fr",
            references=["root@gouv.fr", "re@gouv.fr"],
        ),
    )
    await until(lambda: len(relay.poster.posts) == 3)
    root, reply, second = relay.poster.posts
    assert reply.target.thread_root == root.event_id
    assert reply.target.parent == root.event_id
    assert second.target.thread_root == root.event_id
    assert second.target.parent == reply.event_id
    held.gate.set()
    await relay.settle()
    assert await relay.mapped(link) == {
        "root@gouv.fr": (root.event_id, root.event_id),
        "re@gouv.fr": (reply.event_id, root.event_id),
        "re2@gouv.fr": (second.event_id, root.event_id),
    }


async def test_a_copy_posted_but_not_yet_recorded_is_not_posted_again(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two byte-identical mails without a Message-ID (the store cannot tell them apart): the
    second finds the first's synthetic ID among the posted mails before it is recorded."""
    held = HeldRecords(monkeypatch)
    link = await relay.link()
    raw = make_mail("Same bytes", message_id=None, date="Mon, 1 Dec 2025 10:00:00 +0100")
    await relay.deliver(link, 1, raw)
    await relay.deliver(link, 2, raw)
    await until(lambda: len(relay.poster.posts) == 1)
    held.gate.set()
    await relay.settle()
    assert len(relay.poster.posts) == 1
    assert await relay.states(link) == {1: "done", 2: "done"}
    assert (await relay.row(link, 2))["event_id"] == relay.poster.posts[0].event_id


class GatedPoster(RecordingPoster):
    """Holds the first post until released."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def post(
        self,
        room_id: RoomID,
        message: IncomingMessage,
        target: ThreadTarget,
        *,
        key: str,
        threads: bool,
        ts: int | None,
    ) -> EventID:
        if not self.posts:
            await self.gate.wait()
        return await super().post(room_id, message, target, key=key, threads=threads, ts=ts)


async def test_a_copy_looked_up_before_the_first_was_recorded_is_not_posted_again(
    relay: Relay,
) -> None:
    """The second copy is looked up ahead of its turn, while the first is being sent; the
    first's record commits before the second's turn: the memory of posted mails covers the
    lookup that read the database too early."""
    poster = GatedPoster()
    relay.relay.poster = relay.poster = poster
    relay.relay.bounces = RecordsFirst(relay.relay)
    link = await relay.link()
    raw = make_mail("Same bytes", message_id=None, date="Mon, 1 Dec 2025 10:00:00 +0100")
    await relay.deliver(link, 1, raw)
    await relay.deliver(link, 2, raw)
    second = await relay.row(link, 2)
    # The second mail's lookup has read the database (nothing there yet).
    readers = relay.relay._readers
    await until(lambda: second["id"] in readers)
    poster.gate.set()
    await relay.settle()
    assert len(poster.posts) == 1
    assert await relay.states(link) == {1: "done", 2: "done"}


class RecordsFirst:
    """A BounceTaker (asked first in every mail's turn) that lets the second mail's turn go
    on only once the first mail's record has committed."""

    def __init__(self, relay: MailRelay) -> None:
        self.relay = relay
        self.calls = 0

    async def take(self, link: Link, raw: bytes) -> bool:
        self.calls += 1
        if self.calls == 2:
            await self.relay._recorder.wait_idle()
        return False


async def test_a_failed_record_sends_again_with_the_same_key_and_settles(
    relay: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record fails after the send: the mail stays pending and is sent again with the
    same key (so the same transaction IDs: the homeserver answers with the event it already
    made), and the retry is recorded."""
    held = HeldRecords(monkeypatch, fail_first=1)
    held.gate.set()
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Once", message_id="once@gouv.fr"))
    await relay.settle()
    keys = [p.key for p in relay.poster.posts]
    assert len(keys) == 2
    assert keys[0] == keys[1]
    assert await relay.states(link) == {1: "done"}
    assert await relay.mapped(link) == {
        "once@gouv.fr": (relay.poster.posts[1].event_id, relay.poster.posts[1].event_id)
    }


async def test_a_crash_between_sends_and_records_resends_in_order_with_the_same_keys(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bridge dies with posted mails not yet recorded: the next run sends them again, in
    the same order and with the same keys, and records them."""
    held = HeldRecords(monkeypatch)

    def start(poster: RecordingPoster) -> tuple[Relay, TaskGroup]:
        tasks = TaskGroup()
        mail_relay = MailRelay(
            database,
            make_parser(mail_config()),
            poster,
            tasks,
            authenticate=SenderAuthenticator(TrustSettings(authserv_ids=(MTA,))).check,
            max_attempts=MAX_ATTEMPTS,
        )
        mail_relay.retry_initial = 0.01
        runner = tasks.spawn(mail_relay.run(), name="relay")
        return Relay(database, mail_relay, poster, runner), tasks

    first, tasks = start(RecordingPoster())
    link = await first.link()
    for uid in range(1, 6):
        await first.deliver(link, uid, make_mail(f"M{uid}"))
    await until(lambda: len(first.poster.posts) == 5)
    await tasks.close()  # the crash: nothing was recorded
    assert set((await first.states(link)).values()) == {"pending"}

    held.gate.set()
    second, tasks = start(RecordingPoster())
    await second.settle()
    assert [p.key for p in second.poster.posts] == [p.key for p in first.poster.posts]
    assert [p.message.subject for p in second.poster.posts] == [f"M{u}" for u in range(1, 6)]
    assert set((await second.states(link)).values()) == {"done"}
    await tasks.close()


async def test_only_a_few_mails_are_prepared_ahead(relay: Relay) -> None:
    """While a room's mail is sent, only the next few are parsed and checked: a long queue
    does not hold the interpreter with parsing."""
    poster = GatedPoster()
    relay.relay.poster = relay.poster = poster
    link = await relay.link()
    for uid in range(1, 31):
        await relay.deliver(link, uid, make_mail(f"Q{uid}"))
    ahead = relay.relay._ahead
    await until(lambda: len(ahead) > 0)
    await asyncio.sleep(0.2)
    assert 1 <= len(ahead) <= 5
    poster.gate.set()
    await relay.settle()
    assert [p.message.subject for p in poster.posts] == [f"Q{u}" for u in range(1, 31)]
