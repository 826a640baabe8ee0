"""The audit log table: appending in the chain's order, reading it back in batches."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Row, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.audit import AuditEntry, AuditRow, seal
from bridge.db.engine import Database
from bridge.db.schema import audit_head, audit_log
from bridge.db.util import now_ms

log = logging.getLogger("passerelle.db.audit")

# pg_advisory_xact_lock key: "passerelle audit" — every instance sharing the database agrees.
_PG_LOCK = 0x7061737361756474
BATCH = 5000


async def append_in(conn: AsyncConnection, entry: AuditEntry) -> AuditRow | None:
    """Append in the caller's transaction (the one that stores the item's final state), so
    the row exists exactly when that state does. None if `entry.item_key` is already logged.

    Appends are serialised across instances for the rest of the transaction: an advisory
    lock on PostgreSQL, the write lock on SQLite (taken by the first write, here the head's)."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK})
    else:
        await conn.execute(update(audit_head).where(audit_head.c.id == 1).values(id=1))
    key = entry.cleaned().item_key
    if key is not None:
        known = await conn.execute(select(audit_log.c.seq).where(audit_log.c.item_key == key))
        if known.first() is not None:
            log.debug("audit: %s already logged", key)
            return None
    head = (
        await conn.execute(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1))
    ).one()
    row = seal(entry, seq=int(head.seq) + 1, time_ms=now_ms(), prev_hash=str(head.hash))
    stored = row.entry
    await conn.execute(
        audit_log.insert().values(
            seq=row.seq,
            time=row.time_ms,
            direction=stored.direction,
            item_key=stored.item_key,
            link=stored.link,
            room_id=stored.room_id,
            sender=stored.sender,
            recipients=json.dumps(list(stored.recipients), ensure_ascii=False),
            ids=json.dumps(dict(stored.ids), ensure_ascii=False, sort_keys=True),
            verdict=stored.verdict,
            outcome=stored.outcome,
            reason=stored.reason,
            body_sha256=stored.body_sha256,
            prev_hash=row.prev_hash,
            hash=row.hash,
        )
    )
    await conn.execute(
        update(audit_head).where(audit_head.c.id == 1).values(seq=row.seq, hash=row.hash)
    )
    log.debug("audit row %d: %s %s %s", row.seq, stored.direction, stored.outcome, stored.link)
    return row


async def append(db: Database, entry: AuditEntry) -> AuditRow | None:
    """Append in a transaction of its own."""
    async with db.begin() as conn:
        return await append_in(conn, entry)


def _row(r: Row[Any]) -> AuditRow:
    entry = AuditEntry(
        direction=r.direction,
        link=r.link,
        room_id=r.room_id,
        sender=r.sender,
        outcome=r.outcome,
        recipients=tuple(json.loads(r.recipients)),
        ids=json.loads(r.ids),
        reason=r.reason,
        verdict=r.verdict,
        body_sha256=r.body_sha256,
        item_key=r.item_key,
    )
    return AuditRow(int(r.seq), int(r.time), entry, r.prev_hash, r.hash)


async def rows(
    db: Database,
    *,
    since_ms: int | None = None,
    link: str | None = None,
    after: int = 0,
    batch: int = BATCH,
) -> AsyncIterator[AuditRow]:
    """Every row after seq `after`, in seq order, read `batch` at a time (keyset pages, one
    short transaction each: the log can be far larger than memory, and appends go on)."""
    while True:
        query = select(audit_log).where(audit_log.c.seq > after)
        if since_ms is not None:
            query = query.where(audit_log.c.time >= since_ms)
        if link is not None:
            query = query.where(audit_log.c.link == link)
        query = query.order_by(audit_log.c.seq).limit(batch)
        async with db.begin() as conn:
            page = (await conn.execute(query)).all()
        for r in page:
            yield _row(r)
        if len(page) < batch:
            return
        after = int(page[-1].seq)


async def head(db: Database) -> tuple[int, str]:
    """(seq, hash) of the last row appended, as the head table keeps it."""
    async with db.begin() as conn:
        found = (
            await conn.execute(
                select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
            )
        ).one()
    return int(found.seq), str(found.hash)
