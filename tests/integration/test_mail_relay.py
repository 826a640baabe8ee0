"""MailRelay on the real database (SQLite and PostgreSQL) and the real parser; the Matrix side is
a recording RoomPoster, so what would be posted, where, in which thread and order is exact."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from sqlalchemy import func, select

from bridge.config import DatabaseConfig, MailConfig
from bridge.config.mail import TrustSettings
from bridge.core.errors import TransientError
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link, LinkSettings
from bridge.core.message import IncomingMessage
from bridge.core.tasks import TaskGroup
from bridge.core.threading import ThreadTarget
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import Database, open_database
from bridge.db.schema import mail_raw, message_map
from bridge.mail.authcheck import SenderAuthenticator
from bridge.mail.compose import has_loop_marker, is_own_message_id, loop_marker, own_message_id
from bridge.mail.ingest import make_parser
from bridge.mail.store import DbMailboxStore
from bridge.relay.mail_in import MailRelay, RoomPoster, synthetic_message_id

MAX_ATTEMPTS = 3
ROOM_A = RoomID("!a:localhost")
ROOM_B = RoomID("!b:localhost")
LIST_A = "list-a@agency.example.org"
LIST_B = "list-b@agency.example.org"
ALLOWED = ("gouv.fr", "*.gouv.fr")
# The agency MTA of these tests: its Authentication-Results are the ones the relay believes.
MTA = "mx.agency.example.org"


# --- the Matrix side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Posted:
    room: RoomID
    message: IncomingMessage
    target: ThreadTarget
    key: str
    threads: bool
    ts: int | None
    event_id: EventID


@dataclass(frozen=True)
class Notice:
    room: RoomID
    text: str
    key: str
    thread_root: EventID | None


@dataclass
class RecordingPoster:
    """A RoomPoster that records instead of sending. Event IDs are `$evt<n>` in posting order.

    `fail_subjects`: post raises RuntimeError for a mail with one of these subjects.
    `transient_calls`: the first K calls to post raise TransientError.
    `transient_notices`: the first K calls to notice raise TransientError.
    """

    fail_subjects: set[str] = field(default_factory=set)
    transient_calls: int = 0
    transient_notices: int = 0
    notice_calls: int = 0
    posts: list[Posted] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    calls: int = 0
    failures: int = 0

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
        self.calls += 1
        if self.calls <= self.transient_calls:
            self.failures += 1
            raise TransientError(f"homeserver unreachable (call {self.calls})")
        if message.subject in self.fail_subjects:
            self.failures += 1
            raise RuntimeError(f"cannot post {message.subject!r}")
        event_id = EventID(f"$evt{len(self.posts) + 1}")
        self.posts.append(Posted(room_id, message, target, key, threads, ts, event_id))
        return event_id

    async def notice(
        self, room_id: RoomID, text: str, *, key: str, thread_root: EventID | None = None
    ) -> None:
        self.notice_calls += 1
        if self.notice_calls <= self.transient_notices:
            raise TransientError(f"homeserver unreachable (notice {self.notice_calls})")
        self.notices.append(Notice(room_id, text, key, thread_root))

    def by_subject(self, subject: str) -> Posted:
        found = [p for p in self.posts if p.message.subject == subject]
        assert len(found) == 1, f"{subject!r} posted {len(found)} times"
        return found[0]


# --- mails --------------------------------------------------------------------------------------

_numbers = itertools.count(1)


def make_mail(
    subject: str,
    *,
    sender: str = "Agent Dupont <agent@gouv.fr>",
    message_id: str | None = "auto",
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    date: datetime | str | None = "now",
    extra: str = "",
    body: str = "Bonjour,\nvoici le message.",
    auth: str | None = "dkim=pass header.d={domain}; dmarc=pass header.from={domain}",
) -> bytes:
    """A mail; `auth`: the results the agency MTA wrote ({domain}: the sender's; None: none)."""
    lines = []
    if auth is not None:
        domain = sender.rpartition("@")[2].rstrip(">").strip()
        lines.append(f"Authentication-Results: {MTA}; " + auth.format(domain=domain))
    lines += [f"From: {sender}", f"To: {LIST_A}", f"Subject: {subject}"]
    if message_id == "auto":
        message_id = f"relay-{next(_numbers)}-{time.monotonic_ns()}@gouv.fr"
    if message_id is not None:
        lines.append(f"Message-ID: <{message_id}>")
    if in_reply_to is not None:
        lines.append(f"In-Reply-To: <{in_reply_to}>")
    if references:
        lines.append("References: " + " ".join(f"<{r}>" for r in references))
    if date == "now":
        date = datetime.now(UTC) - timedelta(minutes=5)
    if isinstance(date, datetime):
        lines.append(f"Date: {format_datetime(date)}")
    elif isinstance(date, str):
        lines.append(f"Date: {date}")
    lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n" + body.replace("\n", "\r\n") + "\r\n").encode()


# --- the relay on a real database ---------------------------------------------------------------


@dataclass
class Relay:
    db: Database
    relay: MailRelay
    poster: RecordingPoster
    runner: asyncio.Task[None]

    async def link(
        self,
        remote: str = LIST_A,
        room: RoomID = ROOM_A,
        *,
        allowed: tuple[str, ...] = ALLOWED,
        thread_mode: str = "threads",
        required: tuple[str, ...] | None = None,
    ) -> Link:
        return await link_db.save_link(
            self.db,
            room_id=room,
            kind="mail",
            remote=remote,
            settings=LinkSettings(
                allowed_senders=allowed, thread_mode=thread_mode, require_authenticated=required
            ),
            source="config",
            created_by=None,
        )

    def store(self, link: Link) -> DbMailboxStore:
        return DbMailboxStore(self.db, link.id, self.relay.notify)

    async def deliver(self, link: Link, uid: int, raw: bytes, uidvalidity: int = 1) -> None:
        store = self.store(link)
        await store.store_raw(link.remote, uidvalidity, uid, raw)
        store.notify()

    async def settle(self, timeout: float = 30) -> None:
        """Until no stored mail is pending and every room queue is idle."""
        deadline = time.monotonic() + timeout
        while True:
            async with self.db.begin() as conn:
                pending = (
                    await conn.execute(
                        select(func.count())
                        .select_from(mail_raw)
                        .where(mail_raw.c.state == "pending")
                    )
                ).scalar_one()
            if pending == 0:
                await asyncio.wait_for(self.relay.wait_idle(), timeout)
                return
            assert time.monotonic() < deadline, f"{pending} mail(s) still pending"
            self.relay.notify()
            await asyncio.sleep(0.02)

    async def states(self, link: Link, uidvalidity: int = 1) -> dict[int, str]:
        async with self.db.begin() as conn:
            rows = (
                await conn.execute(
                    select(mail_raw.c.uid, mail_raw.c.state).where(
                        mail_raw.c.link_id == link.id, mail_raw.c.uidvalidity == uidvalidity
                    )
                )
            ).all()
        return {int(r.uid): str(r.state) for r in rows}

    async def row(self, link: Link, uid: int, uidvalidity: int = 1) -> dict[str, object]:
        async with self.db.begin() as conn:
            found = (
                await conn.execute(
                    select(mail_raw).where(
                        mail_raw.c.link_id == link.id,
                        mail_raw.c.uidvalidity == uidvalidity,
                        mail_raw.c.uid == uid,
                    )
                )
            ).one()
        return dict(found._mapping)

    async def mapped(self, link: Link) -> dict[str, tuple[str, str]]:
        async with self.db.begin() as conn:
            rows = (
                await conn.execute(select(message_map).where(message_map.c.link_id == link.id))
            ).all()
        return {str(r.message_id): (str(r.event_id), str(r.thread_root)) for r in rows}


OWN_DOMAIN = "agency.example.org"
OWN_SECRET = b"relay-test-secret-32-bytes-long!"
OWN_MARKER = loop_marker(OWN_DOMAIN, OWN_SECRET)


def mail_config() -> MailConfig:
    return MailConfig(
        mailboxes={},
        poll_interval=60,
        max_message_size=25 * 1024 * 1024,
        max_depth=20,
        max_parts=100,
        max_attempts=MAX_ATTEMPTS,
    )


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=5))
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def relay(database: Database) -> AsyncIterator[Relay]:
    tasks = TaskGroup()
    poster = RecordingPoster()
    checked: RoomPoster = poster  # the recording poster is a RoomPoster
    mail_relay = MailRelay(
        database,
        make_parser(mail_config()),
        checked,
        tasks,
        authenticate=SenderAuthenticator(TrustSettings(authserv_ids=(MTA,))).check,
        max_attempts=MAX_ATTEMPTS,
        is_own_message=lambda mid: is_own_message_id(mid, OWN_DOMAIN, OWN_SECRET),
        has_own_marker=lambda raw: has_loop_marker(raw, [OWN_MARKER]),
    )
    mail_relay.retry_initial = 0.01
    runner = asyncio.create_task(mail_relay.run(), name="mail-relay")
    try:
        yield Relay(database, mail_relay, poster, runner)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await tasks.close()


# --- conversations ------------------------------------------------------------------------------


async def test_a_conversation_lands_in_the_roots_thread(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Budget 2025", message_id="root@gouv.fr"))
    await relay.deliver(
        link,
        2,
        make_mail("Re: Budget 2025", message_id="reply1@gouv.fr", in_reply_to="root@gouv.fr"),
    )
    # Known only through References, read right to left: the newest known one is reply1.
    await relay.deliver(
        link,
        3,
        make_mail(
            "Re: Re: Budget 2025",
            message_id="reply2@gouv.fr",
            references=["root@gouv.fr", "reply1@gouv.fr", "never-seen@gouv.fr"],
        ),
    )
    # An In-Reply-To nobody here knows does not hide a known reference.
    await relay.deliver(
        link,
        4,
        make_mail(
            "Re: Budget 2025 (bis)",
            message_id="reply3@gouv.fr",
            in_reply_to="elsewhere@gouv.fr",
            references=["root@gouv.fr", "elsewhere@gouv.fr"],
        ),
    )
    await relay.settle()

    assert await relay.states(link) == {1: "done", 2: "done", 3: "done", 4: "done"}
    root = relay.poster.by_subject("Budget 2025")
    reply1 = relay.poster.by_subject("Re: Budget 2025")
    reply2 = relay.poster.by_subject("Re: Re: Budget 2025")
    reply3 = relay.poster.by_subject("Re: Budget 2025 (bis)")
    assert [p.event_id for p in relay.poster.posts] == ["$evt1", "$evt2", "$evt3", "$evt4"]
    assert root.target == ThreadTarget(thread_root=None, parent=None)
    assert root.target.is_new
    assert reply1.target.thread_root == root.event_id
    assert reply1.target.parent == root.event_id
    assert reply2.target.thread_root == root.event_id
    assert reply2.target.parent == reply1.event_id
    assert reply3.target.thread_root == root.event_id
    assert reply3.target.parent == root.event_id
    assert all(p.threads for p in relay.poster.posts)
    assert all(p.room == ROOM_A for p in relay.poster.posts)
    assert [p.key for p in relay.poster.posts] == [f"{link.id}:1:{uid}" for uid in (1, 2, 3, 4)]

    assert await relay.mapped(link) == {
        "root@gouv.fr": ("$evt1", "$evt1"),
        "reply1@gouv.fr": ("$evt2", "$evt1"),
        "reply2@gouv.fr": ("$evt3", "$evt1"),
        "reply3@gouv.fr": ("$evt4", "$evt1"),
    }
    assert (await relay.row(link, 3))["event_id"] == "$evt3"
    assert relay.poster.notices == []


async def test_a_reference_to_another_links_mail_starts_a_new_thread(relay: Relay) -> None:
    link_a = await relay.link(LIST_A, ROOM_A)
    link_b = await relay.link(LIST_B, ROOM_B)
    await relay.deliver(link_a, 1, make_mail("Chez A", message_id="a-root@gouv.fr"))
    await relay.settle()
    await relay.deliver(
        link_b,
        1,
        make_mail(
            "Re: Chez A",
            message_id="b-reply@gouv.fr",
            in_reply_to="a-root@gouv.fr",
            references=["a-root@gouv.fr"],
        ),
    )
    await relay.settle()

    in_a = relay.poster.by_subject("Chez A")
    in_b = relay.poster.by_subject("Re: Chez A")
    assert in_a.room == ROOM_A
    assert in_b.room == ROOM_B
    assert in_b.target.is_new
    assert in_b.target.thread_root is None
    assert in_b.target.parent is None
    assert await relay.mapped(link_b) == {"b-reply@gouv.fr": (in_b.event_id, in_b.event_id)}
    assert set(await relay.mapped(link_a)) == {"a-root@gouv.fr"}


async def test_the_same_mail_in_two_links_is_posted_in_both_rooms(relay: Relay) -> None:
    link_a = await relay.link(LIST_A, ROOM_A)
    link_b = await relay.link(LIST_B, ROOM_B)
    raw = make_mail("Cross-posted", message_id="both@gouv.fr")
    await relay.deliver(link_a, 7, raw)
    await relay.deliver(link_b, 7, raw)
    await relay.settle()
    assert sorted(p.room for p in relay.poster.posts) == [ROOM_A, ROOM_B]
    assert await relay.states(link_a) == {7: "done"}
    assert await relay.states(link_b) == {7: "done"}


async def test_flat_mode_replies_answer_without_a_thread(relay: Relay) -> None:
    link = await relay.link(thread_mode="flat")
    await relay.deliver(link, 1, make_mail("Flat root", message_id="flat-root@gouv.fr"))
    await relay.deliver(
        link,
        2,
        make_mail("Re: Flat root", message_id="flat-1@gouv.fr", in_reply_to="flat-root@gouv.fr"),
    )
    await relay.deliver(
        link,
        3,
        make_mail(
            "Re: Re: Flat root",
            message_id="flat-2@gouv.fr",
            references=["flat-root@gouv.fr", "flat-1@gouv.fr"],
        ),
    )
    await relay.settle()

    root = relay.poster.by_subject("Flat root")
    reply1 = relay.poster.by_subject("Re: Flat root")
    reply2 = relay.poster.by_subject("Re: Re: Flat root")
    assert not any(p.threads for p in relay.poster.posts)
    assert root.target.is_new
    assert reply1.target.parent == root.event_id
    assert reply2.target.parent == reply1.event_id
    # Flat: no thread exists. The relay hands over the parent's own event as the "root" (a
    # poster told threads=False ignores it); it never names the conversation's first mail.
    assert reply1.target.thread_root in (None, reply1.target.parent)
    assert reply2.target.thread_root in (None, reply2.target.parent)
    mapped = await relay.mapped(link)
    assert {mid: root_id for mid, (_event, root_id) in mapped.items()} == {
        "flat-root@gouv.fr": root.event_id,
        "flat-1@gouv.fr": reply1.event_id,
        "flat-2@gouv.fr": reply2.event_id,
    }


# --- exactly once ------------------------------------------------------------------------------


async def test_the_first_writer_of_a_message_id_wins(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Premier", message_id="same@gouv.fr"))
    await relay.deliver(link, 2, make_mail("Seconde copie", message_id="same@gouv.fr"))
    await relay.settle()
    assert await relay.states(link) == {1: "done", 2: "duplicate"}
    assert [p.message.subject for p in relay.poster.posts] == ["Premier"]
    assert await relay.mapped(link) == {"same@gouv.fr": ("$evt1", "$evt1")}

    # Also when the copy arrives after the first was posted.
    await relay.deliver(link, 3, make_mail("Copie tardive", message_id="same@gouv.fr"))
    await relay.settle()
    assert (await relay.states(link))[3] == "duplicate"
    assert len(relay.poster.posts) == 1


async def test_a_uidvalidity_change_posts_nothing_again(relay: Relay) -> None:
    link = await relay.link()
    mails = [make_mail(f"Message {n}", message_id=f"uv-{n}@gouv.fr") for n in range(5)]
    for uid, raw in enumerate(mails, start=1):
        await relay.deliver(link, uid, raw, uidvalidity=100)
    await relay.settle()
    assert len(relay.poster.posts) == 5

    # The server renumbered its mailbox: every mail comes again, under new UIDs.
    for uid, raw in enumerate(mails, start=11):
        await relay.deliver(link, uid, raw, uidvalidity=200)
    await relay.settle()
    assert len(relay.poster.posts) == 5
    assert set((await relay.states(link, 200)).values()) == {"duplicate"}
    assert relay.poster.notices == []


async def test_a_mail_without_message_id_gets_a_stable_synthetic_id(relay: Relay) -> None:
    link = await relay.link()
    raw = make_mail("Sans identifiant", message_id=None)
    await relay.deliver(link, 1, raw)
    await relay.settle()
    assert await relay.states(link) == {1: "done"}
    synthetic = synthetic_message_id(raw)
    assert synthetic == synthetic_message_id(bytes(raw))
    assert await relay.mapped(link) == {synthetic: ("$evt1", "$evt1")}

    # The same mail under another UID (or after a UIDVALIDITY change) is not posted again.
    await relay.deliver(link, 2, raw)
    await relay.deliver(link, 3, raw, uidvalidity=2)
    await relay.settle()
    assert len(relay.poster.posts) == 1
    for uid, validity in ((2, 1), (3, 2)):
        row = await relay.row(link, uid, validity)
        # Kept as a duplicate, or settled as the copy of the event already posted.
        assert (row["state"], row["event_id"]) in {("duplicate", None), ("done", "$evt1")}
    assert len(await relay.mapped(link)) == 1

    # Another mail without Message-ID is another message.
    await relay.deliver(link, 4, make_mail("Autre sans identifiant", message_id=None))
    await relay.settle()
    assert len(relay.poster.posts) == 2


# --- failures -----------------------------------------------------------------------------------


async def test_a_poison_mail_is_quarantined_and_the_next_still_posted(relay: Relay) -> None:
    link = await relay.link()
    relay.poster.fail_subjects.add("Poison")
    await relay.deliver(link, 1, make_mail("Poison"))
    await relay.deliver(link, 2, make_mail("Healthy"))
    await relay.settle()

    assert await relay.states(link) == {1: "quarantined", 2: "done"}
    row = await relay.row(link, 1)
    assert row["attempts"] == MAX_ATTEMPTS
    assert "RuntimeError" in str(row["last_error"])
    assert relay.poster.failures == MAX_ATTEMPTS
    assert [p.message.subject for p in relay.poster.posts] == ["Healthy"]
    assert len(relay.poster.notices) == 1
    notice = relay.poster.notices[0]
    assert notice.room == ROOM_A
    assert "quarantine" in notice.text
    assert f"#{row['id']}" in notice.text

    # Later mail still flows.
    await relay.deliver(link, 3, make_mail("After"))
    await relay.settle()
    assert relay.poster.posts[-1].message.subject == "After"


async def test_transient_errors_are_waited_out(relay: Relay) -> None:
    link = await relay.link()
    relay.poster.transient_calls = 3
    await relay.deliver(link, 1, make_mail("Patience"))
    await relay.settle()
    assert relay.poster.calls == 4
    assert [p.message.subject for p in relay.poster.posts] == ["Patience"]
    assert await relay.states(link) == {1: "done"}
    row = await relay.row(link, 1)
    assert row["attempts"] == 0
    assert relay.poster.notices == []


async def test_an_oversized_mail_is_quarantined_with_a_notice(relay: Relay) -> None:
    link = await relay.link()
    store = relay.store(link)
    await store.store_oversized(link.remote, 1, 1, size=10**9)
    store.notify()
    await relay.deliver(link, 2, make_mail("Small"))
    await relay.settle()
    assert await relay.states(link) == {1: "quarantined", 2: "done"}
    assert [p.message.subject for p in relay.poster.posts] == ["Small"]
    assert len(relay.poster.notices) == 1
    assert str(10**9) in relay.poster.notices[0].text
    assert relay.poster.notices[0].room == ROOM_A


async def test_a_refusal_notice_survives_a_failed_first_send(relay: Relay) -> None:
    link = await relay.link()
    relay.poster.transient_notices = 1
    await relay.deliver(link, 1, make_mail("Spam", sender="x@evil.example"))
    await relay.settle()
    assert await relay.states(link) == {1: "rejected"}
    assert len(relay.poster.notices) == 1


async def test_a_quarantine_notice_survives_a_failed_first_send(relay: Relay) -> None:
    link = await relay.link()
    relay.poster.fail_subjects.add("Poison")
    relay.poster.transient_notices = 1
    await relay.deliver(link, 1, make_mail("Poison"))
    await relay.deliver(link, 2, make_mail("Next"))
    await relay.settle()
    assert await relay.states(link) == {1: "quarantined", 2: "done"}
    assert len(relay.poster.notices) == 1


async def test_a_posted_mail_is_never_posted_twice_even_if_recording_fails(relay: Relay) -> None:
    link = await relay.link()
    raw = make_mail("placeholder", message_id="surrogate@gouv.fr")
    raw = raw.replace(b"Subject: placeholder", b"Subject: =?utf-7?Q?+2AA-?=")
    await relay.deliver(link, 1, raw)
    await relay.settle()
    assert len(relay.poster.posts) <= 1
    if relay.poster.posts:
        assert await relay.states(link) == {1: "done"}
        assert "surrogate@gouv.fr" in await relay.mapped(link)


# --- policy -------------------------------------------------------------------------------------


async def test_a_sender_outside_the_allowed_domains_is_rejected_and_told_once(
    relay: Relay,
) -> None:
    link = await relay.link()
    for uid in (1, 2, 3):
        await relay.deliver(link, uid, make_mail(f"Spam {uid}", sender="x@gouv.fr.evil.com"))
    await relay.deliver(link, 4, make_mail("Other spam", sender="y@evil.example"))
    await relay.deliver(link, 5, make_mail("Legit", sender="agent@achats.gouv.fr"))
    await relay.settle()

    assert await relay.states(link) == {
        1: "rejected",
        2: "rejected",
        3: "rejected",
        4: "rejected",
        5: "done",
    }
    assert [p.message.subject for p in relay.poster.posts] == ["Legit"]
    about_x = [n for n in relay.poster.notices if "x@gouv.fr.evil.com" in n.text]
    about_y = [n for n in relay.poster.notices if "y@evil.example" in n.text]
    assert len(about_x) == 1
    assert len(about_y) == 1
    assert len(relay.poster.notices) == 2
    assert about_x[0].room == ROOM_A


async def test_an_auto_reply_is_ignored(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(
        link, 1, make_mail("Absence", extra="Auto-Submitted: auto-replied", body="Absent.")
    )
    await relay.settle()
    assert await relay.states(link) == {1: "ignored"}
    assert relay.poster.posts == []
    assert relay.poster.notices == []


async def test_the_bridges_own_mail_coming_back_is_not_posted(relay: Relay) -> None:
    """By its tagged Message-ID, or (a list that rewrote the Message-ID) by its loop header.
    Another bridge's marker, or a forged tag, does not hide a mail."""
    link = await relay.link()
    own_id = own_message_id("$event:agency.example.org", OWN_DOMAIN, OWN_SECRET)
    forged = own_id.split(".")[0] + ".0000000000000000@" + OWN_DOMAIN
    await relay.deliver(link, 1, make_mail("Re: x", message_id=own_id))
    await relay.deliver(link, 2, make_mail("Re: x", extra=f"X-Passerelle-Loop: {OWN_MARKER}"))
    other = loop_marker(OWN_DOMAIN, b"another bridge's key!!")
    await relay.deliver(link, 3, make_mail("Re: x", extra=f"X-Passerelle-Loop: {other}"))
    await relay.deliver(link, 4, make_mail("Re: x", message_id=forged))
    await relay.settle()
    assert await relay.states(link) == {1: "ignored", 2: "ignored", 3: "done", 4: "done"}
    assert len(relay.poster.posts) == 2


async def test_own_mail_is_recognised_before_its_sender_is_checked(relay: Relay) -> None:
    """Regression (seen in the demo): the bridge's own mail came back from a list whose
    address failed the strict sender check, and the room was told "not posted: invalid sender
    address" for the bridge's own message. It is recognised first, and nobody is told."""
    link = await relay.link()
    own_id = own_message_id("$event2:agency.example.org", OWN_DOMAIN, OWN_SECRET)
    await relay.deliver(link, 1, make_mail("Re: x", sender="a@b, c@d", message_id=own_id))
    await relay.deliver(
        link, 2, make_mail("Re: x", sender="a@b, c@d", extra=f"X-Passerelle-Loop: {OWN_MARKER}")
    )
    await relay.settle()
    assert await relay.states(link) == {1: "ignored", 2: "ignored"}
    assert relay.poster.notices == []


async def test_an_unreadable_mail_is_rejected_with_a_notice(relay: Relay) -> None:
    link = await relay.link()
    await relay.deliver(link, 1, make_mail("Two senders", sender="a@gouv.fr, b@evil.com"))
    await relay.settle()
    assert await relay.states(link) == {1: "rejected"}
    assert relay.poster.posts == []
    assert len(relay.poster.notices) == 1


# --- timestamps and order -----------------------------------------------------------------------


async def test_event_timestamps_are_the_mails_date_never_in_the_future(relay: Relay) -> None:
    link = await relay.link()
    past = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    await relay.deliver(link, 1, make_mail("Future", date=datetime.now(UTC) + timedelta(days=3)))
    await relay.deliver(link, 2, make_mail("Undated", date=None))
    await relay.deliver(link, 3, make_mail("Past", date=past))
    await relay.deliver(link, 4, make_mail("Nonsense date", date="not a date at all"))
    await relay.settle()
    now_ms = int(time.time() * 1000)

    future = relay.poster.by_subject("Future").ts
    assert future is not None
    assert future <= now_ms
    assert future > now_ms - 60_000
    assert relay.poster.by_subject("Undated").ts is None
    assert relay.poster.by_subject("Past").ts == int(past.timestamp() * 1000)
    assert relay.poster.by_subject("Nonsense date").ts is None


async def test_a_rooms_mails_are_posted_in_uid_order(relay: Relay) -> None:
    link = await relay.link()
    other = await relay.link(LIST_B, ROOM_B)
    for uid in range(1, 21):
        await relay.deliver(link, uid, make_mail(f"A{uid:02d}"))
        await relay.deliver(other, uid, make_mail(f"B{uid:02d}"))
    await relay.settle()
    in_a = [p.message.subject for p in relay.poster.posts if p.room == ROOM_A]
    in_b = [p.message.subject for p in relay.poster.posts if p.room == ROOM_B]
    assert in_a == [f"A{uid:02d}" for uid in range(1, 21)]
    assert in_b == [f"B{uid:02d}" for uid in range(1, 21)]
    assert set((await relay.states(link)).values()) == {"done"}


async def test_order_is_kept_when_stored_all_at_once(relay: Relay) -> None:
    link = await relay.link()
    # Stored with the relay asleep, then one wake-up: it reads them in UID order.
    relay.runner.cancel()
    await asyncio.gather(relay.runner, return_exceptions=True)
    store = relay.store(link)
    for uid in (5, 3, 1, 4, 2):
        await store.store_raw(link.remote, 1, uid, make_mail(f"U{uid}"))
    relay.runner = asyncio.create_task(relay.relay.run())
    await relay.settle()
    assert [p.message.subject for p in relay.poster.posts] == ["U1", "U2", "U3", "U4", "U5"]


async def test_pending_mail_survives_in_the_database(database: Database) -> None:
    """No relay running: stored mail waits as pending, in UID order."""
    link = await link_db.save_link(
        database,
        room_id=ROOM_A,
        kind="mail",
        remote=LIST_A,
        settings=LinkSettings(allowed_senders=ALLOWED),
        source="config",
        created_by=None,
    )
    store = DbMailboxStore(database, link.id, lambda: None)
    for uid in (2, 1):
        await store.store_raw(LIST_A, 9, uid, make_mail(f"P{uid}"))
    pending = await mail_db.pending_mail(database, 10, set())
    assert [m.uid for m in pending] == [1, 2]
