"""Batched settling on the mail-out path (SQLite and PostgreSQL): handled events marked done
together, outbox outcomes committed together, queued mail handed to the worker without a
read-back. Failures are made by the database itself (a trigger refusing one row's update)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import event, func, select, text

from bridge.audit_cli import verify
from bridge.config import DatabaseConfig
from bridge.core.audit import AuditEntry
from bridge.core.health import ComponentHealth
from bridge.core.ids import EventID, RoomID, TxnID, UserID
from bridge.core.tasks import TaskGroup
from bridge.db import audit as audit_db
from bridge.db import inbox
from bridge.db import outbox as outbox_db
from bridge.db.engine import Database, open_database
from bridge.db.inbox import InboxEvent, IncomingEvent
from bridge.db.outbox import DbOutboxStore
from bridge.db.schema import audit_log, inbox_event, mail_outbox
from bridge.mail.outbox import OutboxItem, OutboxWorker
from bridge.mail.smtp import SmtpConfig, SmtpSender
from bridge.matrix.dispatcher import EventDispatcher
from tests.integration.test_outbox_store import (
    ACCEPTED,
    REFUSED,
    ROOM,
    make_link,
    outgoing,
    row,
)
from tests.integration.test_smtp import TO, ScriptedHandler

OTHER = RoomID("!other:localhost")


class count_commits:
    """Its len() is the number of commits on `db` from now on: through SQLAlchemy, and
    straight through the driver (Database.write)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._through_sqlalchemy: list[int] = []
        self._direct_before = db.direct.commits
        event.listen(
            db.engine.sync_engine, "commit", lambda _conn: self._through_sqlalchemy.append(1)
        )

    def __len__(self) -> int:
        return len(self._through_sqlalchemy) + self._db.direct.commits - self._direct_before


async def refuse_updates(db: Database, table: str, condition: str) -> None:
    """A trigger making the database refuse UPDATEs of `table` rows matching `condition`
    (on NEW), as a database that fails one write."""
    async with db.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.execute(
                text(
                    f"CREATE TRIGGER refuse BEFORE UPDATE ON {table} WHEN {condition} "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )
            )
        else:
            await conn.execute(
                text(
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
                )
            )
            await conn.execute(
                text(
                    f"CREATE TRIGGER refuse BEFORE UPDATE ON {table} FOR EACH ROW "
                    f"WHEN ({condition}) EXECUTE FUNCTION refuse()"
                )
            )


async def allow_updates(db: Database, table: str) -> None:
    async with db.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.execute(text("DROP TRIGGER refuse"))
        else:
            await conn.execute(text(f"DROP TRIGGER refuse ON {table}"))
            await conn.execute(text("DROP FUNCTION refuse()"))


async def audit_rows(db: Database) -> list[tuple[str, str]]:
    """(event_id, outcome) of every audit row, in chain order."""
    async with db.begin() as conn:
        rows = (
            await conn.execute(select(audit_log.c.ids, audit_log.c.outcome).order_by("seq"))
        ).all()
    return [(json.loads(r.ids)["event_id"], r.outcome) for r in rows]


async def wait_until(condition: Callable[[], Awaitable[bool]], budget: float = 15.0) -> None:
    deadline = time.monotonic() + budget
    while not await condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- outcomes: group commit ----------------------------------------------------------------------


async def test_outcomes_arriving_together_share_a_commit_each_with_its_audit_row(
    db: Database,
) -> None:
    link = await make_link(db)
    ids = [await outbox_db.enqueue(db, outgoing(link, event=f"$e{n}")) for n in range(6)]
    assert all(i is not None for i in ids)
    store = DbOutboxStore(db)
    commits = count_commits(db)

    await asyncio.gather(
        *(store.mark_sent(i, ACCEPTED) for i in ids[:5] if i is not None),
        store.mark_failed(ids[5] or 0, REFUSED),
    )

    # The first outcome waits a moment for others: the six share one commit.
    assert len(commits) == 1
    states = [(await row(db, i or 0))["state"] for i in ids]
    assert states == ["sent"] * 5 + ["failed"]
    # One audit row each, in the order the outcomes came, and the chain holds.
    assert await audit_rows(db) == [(f"$e{n}", "sent") for n in range(5)] + [("$e5", "failed")]
    verifier, broken = await verify(db)
    assert broken is None
    assert verifier.last_seq == 6


async def test_an_outcome_the_database_refuses_fails_alone_and_is_recorded_later(
    db: Database,
) -> None:
    link = await make_link(db)
    ids = [await outbox_db.enqueue(db, outgoing(link, event=f"$e{n}")) or 0 for n in range(4)]
    store = DbOutboxStore(db)
    await refuse_updates(db, "mail_outbox", f"NEW.id = {ids[2]}")

    results = await asyncio.gather(
        *(store.mark_sent(i, ACCEPTED) for i in ids), return_exceptions=True
    )

    assert [r is None for r in results] == [True, True, False, True]
    assert "refused by the test" in str(results[2])
    assert [(await row(db, i))["state"] for i in ids] == ["sent", "sent", "pending", "sent"]
    assert await audit_rows(db) == [("$e0", "sent"), ("$e1", "sent"), ("$e3", "sent")]

    # The worker records a failed outcome again: once the database takes it, it is stored
    # once, audited once, and the others are not touched again.
    await allow_updates(db, "mail_outbox")
    await store.mark_sent(ids[2], ACCEPTED)
    await asyncio.gather(*(store.mark_sent(i, ACCEPTED) for i in ids))  # all finished: no-ops
    assert [(await row(db, i))["state"] for i in ids] == ["sent"] * 4
    assert sorted(await audit_rows(db)) == [(f"$e{n}", "sent") for n in range(4)]
    assert (await verify(db))[1] is None


async def test_a_cancelled_commit_leaves_no_outcome_half_recorded(db: Database) -> None:
    """The caller writing the batch is cancelled (the bridge stopping): the others' outcomes
    are reported unrecorded to their callers, which record them again; none is lost, none is
    recorded twice."""
    link = await make_link(db)
    ids = [await outbox_db.enqueue(db, outgoing(link, event=f"$e{n}")) or 0 for n in range(3)]
    store = DbOutboxStore(db)
    leader = asyncio.create_task(store.mark_sent(ids[0], ACCEPTED))
    await asyncio.sleep(0)  # the leader is writing
    followers = [asyncio.create_task(store.mark_sent(i, ACCEPTED)) for i in ids[1:]]
    await asyncio.sleep(0)
    leader.cancel()
    outcomes = await asyncio.gather(leader, *followers, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    for item_id, outcome in zip(ids[1:], outcomes[1:], strict=True):
        if outcome is not None:  # not recorded: the worker's _record tries again
            assert "interrupted" in str(outcome)
            await store.mark_sent(item_id, ACCEPTED)
    await store.mark_sent(ids[0], ACCEPTED)  # the worker would retry the leader's too
    assert [(await row(db, i))["state"] for i in ids] == ["sent"] * 3
    assert sorted(await audit_rows(db)) == [(f"$e{n}", "sent") for n in range(3)]
    assert (await verify(db))[1] is None


# --- the worker: offered mail ------------------------------------------------------------------


class CountingStore(DbOutboxStore):
    """The real store, counting its due() queries."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.due_calls = 0

    async def due(self, now: float, limit: int, exclude: set[int]) -> list[OutboxItem]:
        self.due_calls += 1
        return await super().due(now, limit, exclude)


async def test_offered_mail_is_sent_once_without_reading_the_store(
    db: Database, sink: int, handler: ScriptedHandler
) -> None:
    link = await make_link(db)
    store = CountingStore(db)
    sender = SmtpSender(SmtpConfig("127.0.0.1", sink, "none", timeout=5.0), ComponentHealth("s"))
    worker = OutboxWorker(store, sender, give_up_after=3600.0)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _true(store.due_calls >= 1))  # the start-up look
        await asyncio.sleep(0.1)
        before = store.due_calls
        for n in range(10):
            queued = await outbox_db.enqueue_item(
                db, outgoing(link, event=f"$e{n}", recipients=(TO,))
            )
            assert queued is not None
            worker.offer(queued)
        await wait_until(lambda: _sent_count(db, 10))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert store.due_calls == before
    assert len(handler.messages) == 10
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 10, "failed": 0}


async def test_an_offer_for_mail_already_taken_from_the_store_is_dropped(
    db: Database, sink: int, handler: ScriptedHandler
) -> None:
    """The store can return a mail before its offer arrives (PostgreSQL: another connection
    reads it as soon as it commits): it is sent once, whichever comes first."""
    link = await make_link(db)
    store = DbOutboxStore(db)
    sender = SmtpSender(SmtpConfig("127.0.0.1", sink, "none", timeout=5.0), ComponentHealth("s"))
    worker = OutboxWorker(store, sender, give_up_after=3600.0)
    taken = await outbox_db.enqueue_item(db, outgoing(link, event="$first", recipients=(TO,)))
    waiting = await outbox_db.enqueue_item(db, outgoing(link, event="$second", recipients=(TO,)))
    assert taken is not None
    assert waiting is not None

    worker.offer(waiting)  # offered first: the store's read leaves it to the offer
    assert await worker.drain_once() == 2  # $first from the store, $second from the offer
    worker.offer(taken)  # too late: already sent
    worker.offer(waiting)
    assert await worker.drain_once() == 0
    assert len(handler.messages) == 2
    assert await outbox_db.counts(db) == {"pending": 0, "sent": 2, "failed": 0}


def _true(value: bool) -> Awaitable[bool]:
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    done.set_result(value)
    return done


async def _sent_count(db: Database, expected: int) -> bool:
    return (await outbox_db.counts(db))["sent"] >= expected


# --- the dispatcher: handled events settled in batches ------------------------------------------


async def store_events(db: Database, count: int, rooms: tuple[RoomID, ...]) -> None:
    events = [
        IncomingEvent(
            event_id=EventID(f"$e{n}"),
            room_id=rooms[n % len(rooms)],
            event_type="m.room.message",
            sender=UserID("@alice:localhost"),
            origin_ts=1_750_000_000_000 + n,
            event_json=json.dumps({"event_id": f"$e{n}", "content": {"body": str(n)}}),
        )
        for n in range(count)
    ]
    await inbox.store_transaction(db, TxnID("t1"), "digest", events, [])


async def inbox_states(db: Database) -> dict[str, str]:
    async with db.begin() as conn:
        rows = (await conn.execute(select(inbox_event.c.event_id, inbox_event.c.state))).all()
    return {r.event_id: r.state for r in rows}


async def pending_count(db: Database) -> int:
    async with db.begin() as conn:
        return int(
            (
                await conn.execute(select(func.count()).where(inbox_event.c.state == "pending"))
            ).scalar_one()
        )


async def test_handled_events_are_settled_in_batches_and_a_failing_one_alone(
    db: Database,
) -> None:
    handled: list[str] = []

    async def handler(item: InboxEvent) -> None:
        handled.append(item.event_id)
        await asyncio.sleep(0)
        if item.event_id == "$e7":
            raise ValueError("this one cannot be handled")

    await store_events(db, 40, (ROOM, OTHER))
    commits = count_commits(db)
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handler, tasks, max_attempts=1)
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await wait_until(lambda: _true(len(handled) >= 40))
        await asyncio.wait_for(dispatcher.wait_idle(), 15)
        await wait_until(lambda: _no_pending(db))
    finally:
        await tasks.close()

    assert sorted(handled) == sorted(f"$e{n}" for n in range(40))  # each once
    for room_parity in (0, 1):  # in order per room
        room = [int(e[2:]) for e in handled if int(e[2:]) % 2 == room_parity]
        assert room == sorted(room)
    states = await inbox_states(db)
    assert states.pop("$e7") == "dead"
    assert set(states.values()) == {"done"}
    # 39 events settled in far fewer commits than events (one read, the dead one's two
    # writes, and the batches).
    assert len(commits) < 39


async def test_settling_refused_keeps_events_in_flight_and_a_restart_handles_them_again(
    db: Database,
) -> None:
    """The database refuses to mark events done (or the bridge dies before it does): they
    are never dispatched twice by this process, stay pending in the database, and a new
    dispatcher (a restarted bridge) handles them again, idempotently here: the outbox keeps
    one mail per event."""
    link = await make_link(db)
    handled: list[str] = []

    async def handler(item: InboxEvent) -> None:
        handled.append(item.event_id)
        await outbox_db.enqueue(db, outgoing(link, event=item.event_id))

    await store_events(db, 10, (ROOM,))
    await refuse_updates(db, "inbox_event", "NEW.state = 'done'")
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handler, tasks, max_attempts=3)
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await wait_until(lambda: _true(len(handled) >= 10))
        dispatcher.notify()  # a sweep now must not dispatch the unsettled events again
        await asyncio.sleep(1.5)  # and the writer has retried once
    finally:
        await tasks.close()  # the bridge stops (or dies) before they are settled
    assert handled == [f"$e{n}" for n in range(10)]
    assert await pending_count(db) == 10

    await allow_updates(db, "inbox_event")
    tasks = TaskGroup()
    dispatcher = EventDispatcher(db, handler, tasks, max_attempts=3)
    tasks.spawn(dispatcher.run(), name="dispatcher")
    try:
        await wait_until(lambda: _no_pending(db))
    finally:
        await tasks.close()
    assert handled == [f"$e{n}" for n in range(10)] * 2
    assert set((await inbox_states(db)).values()) == {"done"}
    async with db.begin() as conn:
        mails = (await conn.execute(select(func.count()).select_from(mail_outbox))).scalar()
    assert mails == 10


async def _no_pending(db: Database) -> bool:
    return await pending_count(db) == 0


async def test_batched_audit_rows_chain_after_another_instance_appended(
    db: Database, db_url: str
) -> None:
    """append_all_steps moves the head once for several rows; when another instance appended
    since (the head this process remembers is stale) it reads the head and chains after it."""
    other = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:

        def entry(n: int) -> AuditEntry:
            return AuditEntry(
                direction="mail_out",
                link="liste@lists.test",
                room_id=ROOM,
                sender="@alice:localhost",
                outcome="sent",
                ids={"event_id": f"$e{n}"},
            )

        audited: list[AuditEntry] = []
        db.audit_observers.append(audited.append)

        async def append_all(entries: list[AuditEntry]) -> None:
            engine = db.engine.sync_engine
            await db.write_audited(
                lambda d, told: audit_db.append_all_steps(d, engine, entries, told)
            )

        await append_all([entry(0), entry(1)])
        await audit_db.append(other, entry(2))  # this process's remembered head is stale now
        await append_all([entry(3), entry(4), entry(5)])
        await append_all([entry(6), entry(7)])  # remembered head again
    finally:
        await other.close()
    assert await audit_rows(db) == [(f"$e{n}", "sent") for n in range(8)]
    assert [e.ids["event_id"] for e in audited] == [f"$e{n}" for n in (0, 1, 3, 4, 5, 6, 7)]
    verifier, broken = await verify(db)
    assert broken is None
    assert verifier.last_seq == 8
