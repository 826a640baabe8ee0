"""The outbox table and its store (SQLite and PostgreSQL), and the real worker sending from it."""

from __future__ import annotations

import email
import logging
import time
from dataclasses import replace
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, insert, select, update

from bridge.core.health import ComponentHealth
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link, LinkSettings
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db.engine import Database
from bridge.db.outbox import DbOutboxStore, NewOutgoing
from bridge.db.schema import mail_outbox, message_map, metadata
from bridge.mail.outbox import OutboxItem, OutboxStore, OutboxWorker
from bridge.mail.smtp import SendResult, SmtpConfig, SmtpSender
from tests.integration.test_smtp import FROM, TO, ScriptedHandler, make_message

ROOM = RoomID("!liste:localhost")
OTHER_ROOM = RoomID("!autre:localhost")
ACCEPTED = SendResult(True, False, 250, "accepted by 127.0.0.1: 250 2.0.0 queued")
TEMPFAIL = SendResult(False, False, 451, "message refused: 451 4.3.0 try later")
REFUSED = SendResult(False, True, 550, "all recipients refused: <x@y.test> 550 5.1.1 no such user")


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def make_link(db: Database, remote: str = "liste@lists.test", room: RoomID = ROOM) -> Link:
    return await link_db.save_link(
        db,
        room_id=room,
        kind="mail",
        remote=remote,
        settings=LinkSettings(allowed_senders=("lists.test",)),
        source="config",
        created_by=None,
    )


def outgoing(link: Link, event: str = "$event1", **changes: Any) -> NewOutgoing:
    item = NewOutgoing(
        link_id=link.id,
        room_id=link.room_id,
        event_id=EventID(event),
        kind="message",
        message_id=f"{event.lstrip('$')}.{link.id}@agency.test",
        raw=make_message(f"about {event}"),
        mail_from=FROM,
        recipients=(link.remote,),
        thread_root=EventID("$root"),
        subject="Budget 2025",
    )
    return replace(item, **changes)


async def enqueue(db: Database, item: NewOutgoing) -> int:
    outbox_id = await outbox_db.enqueue(db, item)
    assert outbox_id is not None
    return outbox_id


async def row(db: Database, outbox_id: int) -> dict[str, Any]:
    async with db.begin() as conn:
        found = (
            await conn.execute(select(mail_outbox).where(mail_outbox.c.id == outbox_id))
        ).one()
    return dict(found._mapping)


async def set_next_attempt(db: Database, outbox_id: int, at_ms: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(mail_outbox).where(mail_outbox.c.id == outbox_id).values(next_attempt_at=at_ms)
        )


def _typed(store: DbOutboxStore) -> OutboxStore:
    return store  # mypy checks that DbOutboxStore implements the worker's Protocol


# --- the table ----------------------------------------------------------------------------------


async def test_the_migrations_build_exactly_the_tables_of_schema_py(db: Database) -> None:
    def differences(conn: Connection) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_server_default": True})
        return list(compare_metadata(context, metadata))

    async with db.begin() as conn:
        assert await conn.run_sync(differences) == []


# --- enqueue ------------------------------------------------------------------------------------


async def test_enqueue_queues_once_per_event_and_maps_the_message_id(db: Database) -> None:
    link = await make_link(db)
    item = outgoing(link, recipients=("liste@lists.test", "copie@lists.test"))
    before = int(time.time() * 1000)
    outbox_id = await enqueue(db, item)
    after = int(time.time() * 1000)

    stored = await row(db, outbox_id)
    assert stored["state"] == "pending"
    assert (stored["attempts"], stored["first_tried_at"], stored["finished_at"]) == (0, None, None)
    assert stored["reported"] is False
    assert bytes(stored["raw"]) == item.raw
    assert stored["recipients"] == '["liste@lists.test", "copie@lists.test"]'
    assert (stored["kind"], stored["message_id"], stored["mail_from"]) == (
        "message",
        item.message_id,
        FROM,
    )
    assert before <= stored["next_attempt_at"] == stored["created_at"] <= after

    mapped = await mail_db.lookup(db, link.id, item.message_id)
    assert mapped is not None
    assert (mapped.event_id, mapped.thread_root, mapped.subject) == (
        "$event1",
        "$root",
        "Budget 2025",
    )

    # The handler run again after a crash, having built another mail: nothing changes.
    again = outgoing(link, message_id="other@agency.test", raw=b"Subject: other\r\n\r\nx\r\n")
    assert await outbox_db.enqueue(db, again) is None
    assert bytes((await row(db, outbox_id))["raw"]) == item.raw
    assert await mail_db.lookup(db, link.id, "other@agency.test") is None
    assert await outbox_db.counts(db) == {"pending": 1, "sent": 0, "failed": 0}

    # The same event bridged to a second link is a second mail.
    second = await make_link(db, "autre@lists.test", OTHER_ROOM)
    assert await enqueue(db, outgoing(second)) != outbox_id
    assert [r[1] for r in await outbox_db.mails_for_event(db, "$event1")] == [link.id, second.id]


async def test_enqueue_leaves_an_existing_mapping_of_the_message_id_alone(db: Database) -> None:
    link = await make_link(db)
    item = outgoing(link)
    async with db.begin() as conn:
        await conn.execute(
            insert(message_map).values(
                link_id=link.id,
                message_id=item.message_id,
                room_id=ROOM,
                event_id="$earlier",
                thread_root="$earlier",
                subject=None,
                created_at=1,
            )
        )
    await enqueue(db, item)
    mapped = await mail_db.lookup(db, link.id, item.message_id)
    assert mapped is not None
    assert (mapped.event_id, mapped.thread_root) == ("$earlier", "$earlier")


def test_a_new_outgoing_mail_is_checked() -> None:
    link = Link(1, "mail:l@x.test", ROOM, "mail", "l@x.test", LinkSettings(), False, "config")
    with pytest.raises(ValueError, match="kind"):
        outgoing(link, kind="reaction")
    with pytest.raises(ValueError, match="bare"):
        outgoing(link, message_id="<abc@agency.test>")
    with pytest.raises(ValueError, match="recipient"):
        outgoing(link, recipients=())
    assert outgoing(link, kind="correction").kind == "correction"


async def test_lookup_event_finds_the_oldest_message_id_of_that_link(db: Database) -> None:
    link = await make_link(db)
    other = await make_link(db, "autre@lists.test", OTHER_ROOM)
    item = outgoing(link, event="$sent")
    await enqueue(db, item)

    found = await mail_db.lookup_event(db, link.id, "$sent")
    assert found == mail_db.MappedEvent(item.message_id, EventID("$root"), "Budget 2025")
    assert await mail_db.lookup_event(db, other.id, "$sent") is None
    assert await mail_db.lookup_event(db, link.id, "$unknown") is None

    # Two mails mapped to one event (a list's copies): the oldest wins, whatever the id order.
    async with db.begin() as conn:
        for message_id, created_at in (("a-late@x.test", 2000), ("z-early@x.test", 1000)):
            await conn.execute(
                insert(message_map).values(
                    link_id=other.id,
                    message_id=message_id,
                    room_id=OTHER_ROOM,
                    event_id="$twice",
                    thread_root="$thread",
                    subject=None,
                    created_at=created_at,
                )
            )
    twice = await mail_db.lookup_event(db, other.id, "$twice")
    assert twice == mail_db.MappedEvent("z-early@x.test", EventID("$thread"), None)


# --- the worker's store -------------------------------------------------------------------------


async def test_due_is_earliest_first_without_the_excluded_at_most_limit(db: Database) -> None:
    link = await make_link(db)
    store = DbOutboxStore(db)
    ids = [await enqueue(db, outgoing(link, event=f"$e{n}")) for n in range(4)]
    # Due times out of id order; the last one is in the future.
    for outbox_id, at in zip(ids, (3_000, 1_000, 2_000, 9_000), strict=True):
        await set_next_attempt(db, outbox_id, at)

    assert [i.id for i in await store.due(5.0, 10, set())] == [ids[1], ids[2], ids[0]]
    assert [i.id for i in await store.due(5.0, 2, set())] == [ids[1], ids[2]]
    assert [i.id for i in await store.due(5.0, 10, {ids[1]})] == [ids[2], ids[0]]
    assert [i.id for i in await store.due(2.0, 10, set())] == [ids[1], ids[2]]  # inclusive
    assert [i.id for i in await store.due(9.0, 10, {ids[1], ids[2]})] == [ids[0], ids[3]]

    [first] = await store.due(1.0, 1, set())
    assert replace(first, raw=b"") == OutboxItem(
        id=ids[1],
        raw=b"",
        mail_from=FROM,
        recipients=(link.remote,),
        attempts=0,
        first_tried_at=None,
        next_attempt_at=1.0,
    )
    assert b"Subject: about $e1" in first.raw

    # Finished mails are never due again.
    await store.mark_sent(ids[1], ACCEPTED)
    await store.mark_failed(ids[2], REFUSED)
    assert [i.id for i in await store.due(10.0, 10, set())] == [ids[0], ids[3]]


async def test_mark_sent_finishes_the_mail(db: Database) -> None:
    link = await make_link(db)
    clock = FakeClock(1_750_000_000.25)
    store = DbOutboxStore(db, clock)
    plain = await enqueue(db, outgoing(link, event="$plain"))
    partly = await enqueue(db, outgoing(link, event="$partly"))

    await store.mark_sent(plain, ACCEPTED)
    stored = await row(db, plain)
    assert (stored["state"], stored["smtp_code"], stored["last_error"]) == ("sent", 250, None)
    assert stored["finished_at"] == 1_750_000_000_250
    assert stored["attempts"] == 0

    some_refused = SendResult(
        True, False, 250, "accepted; refused: <gone@lists.test> 550 no such user", ("gone@x",)
    )
    await store.mark_sent(partly, some_refused)
    stored = await row(db, partly)
    assert (stored["state"], stored["last_error"]) == ("sent", some_refused.message)
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 2, "failed": 0}


async def test_mark_retry_counts_the_attempt_and_reschedules(db: Database) -> None:
    link = await make_link(db)
    clock = FakeClock(time.time())
    store = DbOutboxStore(db, clock)
    outbox_id = await enqueue(db, outgoing(link))
    first_try = clock.now

    await store.mark_retry(outbox_id, TEMPFAIL, first_try + 30)
    stored = await row(db, outbox_id)
    assert stored["state"] == "pending"
    assert (stored["attempts"], stored["smtp_code"], stored["last_error"]) == (
        1,
        451,
        TEMPFAIL.message,
    )
    assert stored["first_tried_at"] == round(first_try * 1000)
    assert stored["next_attempt_at"] == round((first_try + 30) * 1000)
    assert stored["finished_at"] is None
    assert await store.due(first_try + 29.9, 10, set()) == []

    # What due() hands back converts to the same milliseconds (the worker may store it again).
    [item] = await store.due(first_try + 30, 10, set())
    assert (item.attempts, item.first_tried_at) == (1, pytest.approx(first_try, abs=1e-3))
    assert item.next_attempt_at == pytest.approx(first_try + 30, abs=1e-3)
    assert [i.id for i in await store.due(item.next_attempt_at, 10, set())] == [outbox_id]

    clock.now += 60
    network = SendResult(False, False, None, "cannot connect to 127.0.0.1:25: refused")
    await store.mark_retry(outbox_id, network, clock.now + 60)
    stored = await row(db, outbox_id)
    assert stored["first_tried_at"] == round(first_try * 1000)  # kept
    assert (stored["attempts"], stored["smtp_code"], stored["last_error"]) == (
        2,
        None,
        network.message,
    )


async def test_mark_failed_finishes_the_mail_with_its_reason(db: Database) -> None:
    link = await make_link(db)
    clock = FakeClock(1_750_000_000.0)
    store = DbOutboxStore(db, clock)
    outbox_id = await enqueue(db, outgoing(link))
    await store.mark_retry(outbox_id, TEMPFAIL, clock.now + 30)
    clock.now += 30

    await store.mark_failed(outbox_id, REFUSED)
    stored = await row(db, outbox_id)
    assert (stored["state"], stored["attempts"]) == ("failed", 2)
    assert (stored["smtp_code"], stored["last_error"]) == (550, REFUSED.message)
    assert stored["finished_at"] == 1_750_000_030_000
    assert stored["first_tried_at"] == 1_750_000_000_000
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 0, "failed": 1}


async def test_a_finished_mail_is_never_brought_back(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    link = await make_link(db)
    store = DbOutboxStore(db)
    sent = await enqueue(db, outgoing(link, event="$sent"))
    failed = await enqueue(db, outgoing(link, event="$failed"))
    await store.mark_sent(sent, ACCEPTED)
    await store.mark_failed(failed, REFUSED)
    before = {outbox_id: await row(db, outbox_id) for outbox_id in (sent, failed)}

    caplog.set_level(logging.WARNING, logger="passerelle.db.outbox")
    for outbox_id in (sent, failed):
        await store.mark_retry(outbox_id, TEMPFAIL, 0.0)
        await store.mark_failed(outbox_id, TEMPFAIL)
        await store.mark_sent(outbox_id, replace(ACCEPTED, message="again"))

    assert {outbox_id: await row(db, outbox_id) for outbox_id in (sent, failed)} == before
    assert await store.due(time.time() + 86400, 10, set()) == []
    assert sum("not pending any more" in r.getMessage() for r in caplog.records) == 6


# --- outcomes for the room ----------------------------------------------------------------------


async def test_outcomes_to_report_and_mark_reported(db: Database) -> None:
    link = await make_link(db)
    store = DbOutboxStore(db)
    ids = {
        name: await enqueue(db, outgoing(link, event=f"${name}"))
        for name in ("failed", "sent", "pending", "failed2")
    }
    await store.mark_failed(ids["failed"], REFUSED)
    await store.mark_sent(ids["sent"], ACCEPTED)
    await store.mark_failed(ids["failed2"], replace(REFUSED, code=None, message=""))

    failures = await outbox_db.outcomes_to_report(db, 10, include_sent=False)
    assert failures == [
        outbox_db.Outcome(
            ids["failed"],
            link.id,
            ROOM,
            EventID("$failed"),
            "message",
            "failed",
            REFUSED.message,
            550,
        ),
        outbox_db.Outcome(
            ids["failed2"], link.id, ROOM, EventID("$failed2"), "message", "failed", "", None
        ),
    ]
    everything = await outbox_db.outcomes_to_report(db, 10, include_sent=True)
    assert [(o.id, o.state) for o in everything] == [
        (ids["failed"], "failed"),
        (ids["sent"], "sent"),
        (ids["failed2"], "failed"),
    ]
    assert (everything[1].message, everything[1].code) == ("", 250)
    assert len(await outbox_db.outcomes_to_report(db, 1, include_sent=True)) == 1

    await outbox_db.mark_reported(db, ids["failed"])
    assert [o.id for o in await outbox_db.outcomes_to_report(db, 10, include_sent=True)] == [
        ids["sent"],
        ids["failed2"],
    ]
    assert (await row(db, ids["failed"]))["reported"] is True


async def test_without_success_reports_sent_mail_is_reported_at_once(db: Database) -> None:
    """Regression: with success not told (on_sent: none), sent mail stayed unreported, so
    turning reactions on later reacted to every mail ever sent."""
    link = await make_link(db)
    store = DbOutboxStore(db, report_sent=False)
    ids = [await enqueue(db, outgoing(link, event=f"$e{n}")) for n in range(3)]
    await store.mark_sent(ids[0], ACCEPTED)
    await store.mark_failed(ids[1], REFUSED)

    remaining = await outbox_db.outcomes_to_report(db, 10, include_sent=True)
    assert [(o.id, o.state) for o in remaining] == [(ids[1], "failed")]
    assert (await row(db, ids[0]))["reported"] is True
    assert (await row(db, ids[2]))["reported"] is False  # pending: nothing to report yet


async def test_mails_for_event_and_counts(db: Database) -> None:
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 0, "failed": 0}
    assert await outbox_db.mails_for_event(db, "$redacted") == []
    first = await make_link(db)
    second = await make_link(db, "autre@lists.test", OTHER_ROOM)
    store = DbOutboxStore(db)
    a = await enqueue(db, outgoing(first, event="$redacted"))
    b = await enqueue(db, outgoing(second, event="$redacted"))
    c = await enqueue(db, outgoing(first, event="$kept"))
    await store.mark_sent(a, ACCEPTED)

    assert await outbox_db.mails_for_event(db, "$redacted") == [
        (a, first.id, "sent"),
        (b, second.id, "pending"),
    ]
    assert await outbox_db.mails_for_event(db, "$kept") == [(c, first.id, "pending")]
    assert await outbox_db.counts(db) == {"pending": 2, "sent": 1, "failed": 0}


# --- the real worker on the real store ----------------------------------------------------------


async def test_the_worker_sends_from_the_database(
    db: Database, sink: int, handler: ScriptedHandler
) -> None:
    link = await make_link(db)
    clock = FakeClock(time.time() + 1)
    store = DbOutboxStore(db, clock)
    health = ComponentHealth("smtp")
    sender = SmtpSender(SmtpConfig("127.0.0.1", sink, "none", timeout=5.0), health)
    worker = OutboxWorker(_typed(store), sender, give_up_after=86400.0, clock=clock)
    handler.rcpt_replies["gone@lists.test"] = "550 5.1.1 no such user"
    handler.rcpt_replies["busy@lists.test"] = "451 4.2.1 mailbox busy"
    sent = await enqueue(db, outgoing(link, event="$ok", recipients=(TO,)))
    bounced = await enqueue(db, outgoing(link, event="$bounce", recipients=("gone@lists.test",)))
    later = await enqueue(db, outgoing(link, event="$later", recipients=("busy@lists.test",)))

    assert await worker.drain_once() == 3
    states = {i: (await row(db, i))["state"] for i in (sent, bounced, later)}
    assert states == {sent: "sent", bounced: "failed", later: "pending"}
    assert [m.rcpt_tos for m in handler.messages] == [(TO,)]
    assert email.message_from_bytes(handler.messages[0].content)["Subject"] == "about $ok"
    failed = await row(db, bounced)
    assert (failed["smtp_code"], failed["attempts"]) == (550, 1)
    assert "no such user" in failed["last_error"]
    retry = await row(db, later)
    assert (retry["attempts"], retry["smtp_code"]) == (1, 451)
    assert retry["first_tried_at"] == round(clock.now * 1000)
    assert 27_000 <= retry["next_attempt_at"] - retry["first_tried_at"] <= 33_000

    assert await worker.drain_once() == 0  # not due yet
    del handler.rcpt_replies["busy@lists.test"]
    clock.now = retry["next_attempt_at"] / 1000
    assert await worker.drain_once() == 1
    done = await row(db, later)
    assert (done["state"], done["attempts"], done["smtp_code"]) == ("sent", 1, 250)
    assert [m.rcpt_tos for m in handler.messages] == [(TO,), ("busy@lists.test",)]

    clock.now += 86400
    assert await worker.drain_once() == 0
    assert len(handler.messages) == 2
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 2, "failed": 1}
    reports = await outbox_db.outcomes_to_report(db, 10, include_sent=False)
    assert [(o.id, o.code) for o in reports] == [(bounced, 550)]
