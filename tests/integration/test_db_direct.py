"""Write transactions described as steps, run straight through the driver: the same rows as
through SQLAlchemy, all or nothing, fenced by the running task's lease, and a cancelled one
leaving the connection clean for the next."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import bindparam, insert, select

from bridge.config import DatabaseConfig
from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID, UserID
from bridge.core.leases import LeaseHolder, LeaseLost
from bridge.core.links import LinkSettings
from bridge.db import audit as audit_db
from bridge.db import inbox as inbox_db
from bridge.db import kv
from bridge.db import leases as lease_db
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db.engine import FENCE, Database, open_database
from bridge.db.schema import kv as kv_table
from bridge.db.schema import mail_outbox, mail_raw, message_map
from bridge.db.steps import Step, Steps

ROOM = RoomID("!room:agency.example")


async def _link(db: Database) -> int:
    link = await link_db.save_link(
        db,
        room_id=ROOM,
        kind="mail",
        remote="list@agency.example",
        settings=LinkSettings(),
        source="bot",
        created_by=None,
    )
    return link.id


def _item(link_id: int, n: int) -> outbox_db.NewOutgoing:
    return outbox_db.NewOutgoing(
        link_id=link_id,
        room_id=ROOM,
        event_id=EventID(f"$event{n}"),
        kind="message",
        message_id=f"m{n}@agency.example",
        raw=b"From: a\r\n\r\nbody\r\n",
        mail_from="passerelle@agency.example",
        recipients=("list@agency.example",),
        thread_root=EventID(f"$event{n}"),
        subject=f"subject {n}",
        sender="@alice:agency.example",
        body_sha256="00" * 32,
    )


async def _rows(db: Database) -> list[tuple[Any, ...]]:
    async with db.engine.connect() as conn:
        outbox = (
            await conn.execute(
                select(
                    mail_outbox.c.event_id,
                    mail_outbox.c.id,
                    mail_outbox.c.mail_from,
                    mail_outbox.c.raw,
                    mail_outbox.c.recipients,
                    mail_outbox.c.state,
                ).order_by(mail_outbox.c.id)
            )
        ).all()
        mapped = (
            await conn.execute(
                select(message_map.c.message_id, message_map.c.event_id, message_map.c.subject)
            )
        ).all()
    # The IDs differ between two databases (PostgreSQL spends one on a conflicting INSERT):
    # the envelope is checked against its row's, then both are left out.
    for row in outbox:
        assert row.mail_from in ("passerelle@agency.example", f"bounce+{row.id}@agency.example")
    return [(r[0], *r[3:]) for r in outbox] + [tuple(r) for r in mapped]


async def test_the_driver_path_is_taken_and_stores_what_sqlalchemy_stores(
    db: Database, db_url: str
) -> None:
    assert db.direct.usable  # an aiosqlite or asyncpg that cannot be driven shows here
    link_id = await _link(db)
    envelope = functools.partial("bounce+{}@agency.example".format)
    queued = await outbox_db.enqueue_item(db, _item(link_id, 1), envelope=envelope)
    assert queued is not None
    assert queued.mail_from == f"bounce+{queued.id}@agency.example"
    assert await outbox_db.enqueue_item(db, _item(link_id, 1), envelope=envelope) is None
    direct_rows = await _rows(db)

    other = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        other.direct._kind = None  # the ordinary path, through SQLAlchemy
        assert not other.direct.usable
        async with other.begin() as conn:
            await conn.execute(mail_outbox.delete())
            await conn.execute(message_map.delete())
        again = await outbox_db.enqueue_item(other, _item(link_id, 1), envelope=envelope)
        assert again is not None
        assert again.mail_from == f"bounce+{again.id}@agency.example"
        assert await outbox_db.enqueue_item(other, _item(link_id, 1), envelope=envelope) is None
        assert await _rows(other) == direct_rows
    finally:
        await other.close()
    assert len(direct_rows) == 2
    assert direct_rows[0] == (
        "$event1",
        b"From: a\r\n\r\nbody\r\n",
        '["list@agency.example"]',
        "pending",
    )


def _kv_insert() -> Any:
    return insert(kv_table).values(key=bindparam("key"), value=bindparam("value"))


def _two_then_fail(dialect: str) -> Steps[None]:
    yield Step("test.kv_insert", _kv_insert, {"key": "first", "value": "1"})
    yield Step("test.kv_insert", _kv_insert, {"key": "second", "value": "2"})
    raise ValueError("the description gave up")


def _duplicate(dialect: str) -> Steps[None]:
    yield Step("test.kv_insert", _kv_insert, {"key": "third", "value": "3"})
    yield Step("test.kv_insert", _kv_insert, {"key": "third", "value": "again"})


async def test_a_transaction_that_fails_halfway_leaves_nothing(db: Database) -> None:
    with pytest.raises(ValueError, match="gave up"):
        await db.write(_two_then_fail)
    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        await db.write(_duplicate)
    for key in ("first", "second", "third"):
        assert await kv.get_value(db, key) is None
    await kv.set_value(db, "after", "ok")  # the connection is usable again
    assert await kv.get_value(db, "after") == "ok"


async def test_a_fenced_write_of_a_lost_lease_never_commits_on_the_driver_path(
    db: Database,
) -> None:
    link_id = await _link(db)
    epoch = await lease_db.acquire(db, "unit", "a", 60_000)
    assert epoch is not None
    token = FENCE.set(LeaseHolder("unit", "a", epoch))
    try:
        assert await outbox_db.enqueue_item(db, _item(link_id, 1)) is not None
    finally:
        FENCE.reset(token)
    await lease_db.release(db, "a", ["unit"])
    assert await lease_db.acquire(db, "unit", "b", 60_000) == epoch + 1
    token = FENCE.set(LeaseHolder("unit", "a", epoch))  # the old holder writes again
    try:
        with pytest.raises(LeaseLost, match="taken over"):
            await outbox_db.enqueue_item(db, _item(link_id, 2))
    finally:
        FENCE.reset(token)
    assert [row[0] for row in await _rows(db)] == ["$event1", "m1@agency.example"]


async def test_a_cancelled_write_leaves_the_connection_clean(db: Database) -> None:
    link_id = await _link(db)
    for n in range(20):
        task = asyncio.create_task(outbox_db.enqueue_item(db, _item(link_id, n)))
        await asyncio.sleep(0.0005 * n)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Each was committed whole or not at all, and writes go on as before.
    rows = await _rows(db)
    queued = [row[0] for row in rows if str(row[0]).startswith("$")]
    mapped = [row[1] for row in rows if not str(row[0]).startswith("$")]
    assert sorted(queued) == sorted(mapped)
    assert await outbox_db.enqueue_item(db, _item(link_id, 99)) is not None
    await kv.set_value(db, "after", "ok")
    assert await kv.get_value(db, "after") == "ok"


async def test_a_connection_given_back_inside_a_transaction_is_rolled_back(db: Database) -> None:
    """On SQLite the pool rolls back on return only when a transaction is open
    (`direct.skip_idle_reset`): one left open under SQLAlchemy's feet is still rolled back."""

    def insert_behind_sqlalchemy(connection: Any) -> None:
        cursor = connection.connection.dbapi_connection.cursor()
        cursor.execute("INSERT INTO kv (key, value) VALUES ('left', 'open')")
        cursor.close()

    async with db.engine.connect() as conn:
        await conn.run_sync(insert_behind_sqlalchemy)
    assert await kv.get_value(db, "left") is None
    await kv.set_value(db, "after", "ok")  # and the connection goes on being used
    assert await kv.get_value(db, "after") == "ok"
    await outbox_db.enqueue_item(db, _item(await _link(db), 1))
    assert len(await _rows(db)) == 2


async def test_posted_mails_are_recorded_whole_in_order_with_their_audit_rows(
    db: Database,
) -> None:
    link_id = await _link(db)
    for uid in (1, 2, 3):
        assert await mail_db.store_raw(
            db,
            link_id=link_id,
            mailbox="INBOX",
            uidvalidity=7,
            uid=uid,
            message_id=f"in{uid}@example.org",
            raw=b"Subject: x\r\n\r\nbody\r\n",
            size=20,
        )
    pending = await mail_db.pending_mail(db, 10, set())
    told: list[AuditEntry] = []
    db.audit_observers.append(told.append)

    def posted(raw_id: int, n: int, audit: bool) -> mail_db.PostedMail:
        entry = AuditEntry(
            direction="mail_in",
            link="list@agency.example",
            room_id=ROOM,
            sender=f"sender{n}@example.org",
            outcome="posted",
            ids={"message_id": f"in{n}@example.org", "event_id": f"$in{n}"},
        )
        return mail_db.PostedMail(
            raw_id,
            link_id,
            f"in{n}@example.org",
            ROOM,
            EventID(f"$in{n}"),
            EventID(f"$in{n}"),
            f"subject {n}",
            entry if audit else None,
        )

    commits = db.direct.commits
    batch = [posted(raw.id, n, n != 2) for n, raw in enumerate(pending[:2], 1)]
    await mail_db.record_posted_many(db, batch)
    assert db.direct.commits == commits + 1  # one transaction, on the driver path
    assert [entry.ids["event_id"] for entry in told] == ["$in1"]
    # A batch whose last audit row cannot be stored records none of its mails.
    broken = posted(pending[2].id, 3, True)
    assert broken.audit is not None
    broken = replace(broken, audit=replace(broken.audit, item_key="not in a batch"))
    with pytest.raises(ValueError, match="item keys"):
        await mail_db.record_posted_many(db, [posted(pending[2].id, 3, False), broken])
    async with db.engine.connect() as conn:
        states = dict((await conn.execute(select(mail_raw.c.id, mail_raw.c.state))).all())
    assert states == {pending[0].id: "done", pending[1].id: "done", pending[2].id: "pending"}
    for n in (1, 2):
        found = await mail_db.lookup(db, link_id, f"in{n}@example.org")
        assert found is not None
        assert found.event_id == f"$in{n}"
    assert await mail_db.lookup(db, link_id, "in3@example.org") is None
    rows = [row async for row in audit_db.rows(db)]
    assert [row.entry.ids.get("event_id") for row in rows] == ["$in1"]


@pytest.mark.parametrize("count", [1, 3, 700])
async def test_events_marked_done_are_exactly_those_named(db: Database, count: int) -> None:
    """The list is sent in chunks of 512, each padded to a power of two with its last
    number: none left out, none other touched."""
    events = [
        inbox_db.IncomingEvent(
            event_id=EventID(f"$e{n}"),
            room_id=ROOM,
            event_type="m.room.message",
            sender=UserID("@alice:agency.example"),
            origin_ts=n,
            event_json="{}",
        )
        for n in range(count + 5)
    ]
    assert await inbox_db.store_caught_up(db, events) == count + 5
    pending = await inbox_db.pending_events(db, 10_000, set())
    chosen = [item.seq for item in pending][1 : count + 1]
    await inbox_db.mark_events_done(db, chosen)
    left = {item.seq for item in await inbox_db.pending_events(db, 10_000, set())}
    assert left == {item.seq for item in pending} - set(chosen)
    assert len(left) == 5


@pytest.mark.postgres
async def test_pooled_connections_whose_server_session_ended_are_replaced_at_checkout(
    pg_server: Any,
) -> None:
    """Regression guard for the checkout ping that replaced `pool_pre_ping` (three round
    trips): every pooled session ended by the server (a restarted PostgreSQL), the next writes,
    on the driver path and through SQLAlchemy, still go through on new connections."""
    import asyncpg  # type: ignore[import-untyped]

    name = f"passerelle_test_{uuid.uuid4().hex[:12]}"
    libpq = pg_server.create_database(name)
    db = await open_database(
        DatabaseConfig(url=libpq.replace("postgresql://", "postgresql+asyncpg://", 1), pool_size=2)
    )
    try:
        link_id = await _link(db)
        envelope = functools.partial("bounce+{}@agency.example".format)
        # Both pooled connections in use at once, so that both are in the pool afterwards.
        await asyncio.gather(
            *(outbox_db.enqueue_item(db, _item(link_id, n), envelope=envelope) for n in (1, 2))
        )
        killer = await asyncpg.connect(libpq)
        try:
            ended = await killer.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await killer.close()
        assert ended >= 2
        queued = await outbox_db.enqueue_item(db, _item(link_id, 3), envelope=envelope)
        assert queued is not None
        async with db.begin() as conn:
            await conn.execute(kv_table.insert().values(key="after", value="restart"))
        async with db.engine.connect() as conn:
            count = (await conn.execute(select(mail_outbox.c.id))).all()
        assert len(count) == 3
    finally:
        await db.close()
        pg_server.drop_database(name)
