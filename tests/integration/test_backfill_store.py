"""Backfill jobs in the database (SQLite and PostgreSQL): one holder at a time, fenced writes,
fetched mails kept out of the live queue, duplicates by Message-ID."""

from __future__ import annotations

import os

from sqlalchemy import update

from bridge.core.backfill import STALE_AFTER_MS
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.db import backfill as backfill_db
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db.engine import Database
from bridge.db.schema import mail_backfill
from bridge.db.util import now_ms

ROOM = RoomID("!histoire:localhost")
BOX = "liste@lists.test"


async def new_job(db: Database) -> tuple[int, backfill_db.Job]:
    link = await link_db.save_link(
        db,
        room_id=ROOM,
        kind="mail",
        remote=BOX,
        settings=LinkSettings(),
        source="bot",
        created_by="@alice:localhost",
    )
    job = await backfill_db.create_job(
        db,
        link_id=link.id,
        mailbox=BOX,
        room_id=ROOM,
        since=None,
        last=None,
        requested_by="@alice:localhost",
    )
    return link.id, job


async def test_one_holder_and_fenced_writes(db: Database) -> None:
    _, job = await new_job(db)
    me = f"host:{os.getpid()}:bridge"
    assert await backfill_db.claim(db, job, me)
    # A second claim from the same stale view (owner None) loses: compare-and-set.
    assert not await backfill_db.claim(db, job, "other:1:cli")
    assert not await backfill_db.heartbeat(db, job.id, "other:1:cli", handled=5)
    assert not await backfill_db.finish_job(db, job.id, "other:1:cli", "done")
    assert await backfill_db.heartbeat(db, job.id, me, total=10, handled=3, posted=2)

    # The holder went silent: another takes over from what it read, and the first is fenced.
    async with db.begin() as conn:
        await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job.id)
            .values(heartbeat_at=now_ms() - STALE_AFTER_MS - 1)
        )
    seen = await backfill_db.get_job(db, job.id)
    assert seen is not None
    assert seen.owner == me
    assert await backfill_db.claim(db, seen, "other:1:cli")
    assert not await backfill_db.heartbeat(db, job.id, me, handled=4)
    assert not await backfill_db.set_scope(db, job.id, me, 7, 100)
    assert await backfill_db.finish_job(db, job.id, "other:1:cli", "done")
    final = await backfill_db.get_job(db, job.id)
    assert final is not None
    assert (final.state, final.owner, final.handled, final.posted) == ("done", None, 3, 2)
    assert await backfill_db.unfinished_jobs(db) == []


async def test_fetched_mail_waits_apart_and_duplicates_are_kept_back(db: Database) -> None:
    link_id, _ = await new_job(db)
    # Live mail already has <b@x>; the folder holds it twice more and <a@x> twice.
    assert await mail_db.store_raw(
        db,
        link_id=link_id,
        mailbox=BOX,
        uidvalidity=7,
        uid=50,
        message_id="b@x",
        raw=b"live",
        size=4,
    )
    await backfill_db.store_fetched(
        db,
        link_id=link_id,
        mailbox=BOX,
        uidvalidity=7,
        mails=[
            (1, "a@x", b"one", 3, None),
            (2, "b@x", b"two", 3, None),
            (3, "a@x", b"three", 5, None),
            (4, None, None, 99_999_999, "too large to fetch"),
            (5, None, b"no id", 5, None),
        ],
    )
    # Stored again (a resumed run): nothing changes.
    await backfill_db.store_fetched(
        db, link_id=link_id, mailbox=BOX, uidvalidity=7, mails=[(1, "a@x", b"1", 1, None)]
    )
    known = await backfill_db.known_uids(db, BOX, 7, [1, 2, 3, 4, 5, 6, 50])
    assert {uid: state for uid, (_, state) in known.items()} == {
        1: "backfill",
        2: "duplicate",
        3: "duplicate",
        4: "backfill",
        5: "backfill",
        50: "pending",
    }
    waiting = await backfill_db.waiting_mail(db, BOX, 7, [1, 2, 3, 4, 5])
    assert [(m.uid, m.raw) for m in waiting] == [(1, b"one"), (4, None), (5, b"no id")]
    # The live queue sees only live mail.
    assert [m.uid for m in await mail_db.pending_mail(db, 100, set())] == [50]
    assert await backfill_db.waiting_count(db) == 3
    # Unlinking removes the job and its mails.
    await link_db.delete_link(db, link_id)
    assert await backfill_db.waiting_count(db) == 0
    assert await backfill_db.unfinished_jobs(db) == []
