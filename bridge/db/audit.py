"""The audit log table: appending in the chain's order, reading it back in batches."""

from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Engine, Row, bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.audit import AuditEntry, AuditRow, seal
from bridge.db.engine import AUDITED, Database
from bridge.db.schema import audit_head, audit_log
from bridge.db.steps import Step, Steps, built
from bridge.db.util import now_ms

log = logging.getLogger("passerelle.db.audit")

# pg_advisory_xact_lock key: "passerelle audit" — every instance sharing the database agrees.
_PG_LOCK = 0x7061737361756474
BATCH = 5000


# The statements of an append, built once (their compiled form is cached by SQLAlchemy).
_PG_ADVISORY = text("SELECT pg_advisory_xact_lock(:key)")
_TAKE_LOCK = update(audit_head).where(audit_head.c.id == 1).values(id=1)
_READ_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
_INSERT_ROW = audit_log.insert()
_SET_HEAD = (
    update(audit_head)
    .where(audit_head.c.id == 1)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)
# Moves the head only from where it was: matching no row means another append came between.
_MOVE_HEAD = _SET_HEAD.where(
    audit_head.c.seq == bindparam("old_seq"), audit_head.c.hash == bindparam("old_hash")
)

# The head as this process last wrote it, per engine. A guess, never trusted: an append tries
# _MOVE_HEAD from it, and falls back to reading the head when that matches nothing (another
# instance appended, or the transaction that wrote it was rolled back).
_last_head: weakref.WeakKeyDictionary[Engine, tuple[int, str]] = weakref.WeakKeyDictionary()


async def append_in(conn: AsyncConnection, entry: AuditEntry) -> AuditRow | None:
    """Append in the caller's transaction (the one that stores the item's final state), so
    the row exists exactly when that state does. None if `entry.item_key` is already logged.

    Appends are serialised across instances for the rest of the transaction: an advisory
    lock on PostgreSQL, the write lock on SQLite (taken by the first write, here the head's).

    An entry without a key takes two statements on SQLite (three on PostgreSQL) when this
    process wrote the head last: the head moved from the remembered one, which also takes the
    lock and proves that it is still the head, then the row; else the head is read first."""
    postgres = conn.dialect.name == "postgresql"
    if postgres:
        await conn.execute(_PG_ADVISORY, {"key": _PG_LOCK})
    stored = entry.cleaned()
    engine = conn.sync_engine
    remembered = _last_head.get(engine) if stored.item_key is None else None
    if remembered is not None:
        row = seal(entry, seq=remembered[0] + 1, time_ms=now_ms(), prev_hash=remembered[1])
        moved = await conn.execute(
            _MOVE_HEAD,
            {
                "new_seq": row.seq,
                "new_hash": row.hash,
                "old_seq": remembered[0],
                "old_hash": remembered[1],
            },
        )
        if moved.rowcount == 1:
            await conn.execute(_INSERT_ROW, _columns(row))
            _last_head[engine] = (row.seq, row.hash)
            _logged(conn, row)
            return row
    if not postgres:
        await conn.execute(_TAKE_LOCK)
    if stored.item_key is not None:
        known = await conn.execute(
            select(audit_log.c.seq).where(audit_log.c.item_key == stored.item_key)
        )
        if known.first() is not None:
            log.debug("audit: %s already logged", stored.item_key)
            return None
    head = (await conn.execute(_READ_HEAD)).one()
    row = seal(entry, seq=int(head.seq) + 1, time_ms=now_ms(), prev_hash=str(head.hash))
    await conn.execute(_INSERT_ROW, _columns(row))
    await conn.execute(_SET_HEAD, {"new_seq": row.seq, "new_hash": row.hash})
    _last_head[engine] = (row.seq, row.hash)
    _logged(conn, row)
    return row


def append_all_steps(
    dialect: str, engine: Engine, entries: list[AuditEntry], audited: list[AuditEntry]
) -> Steps[None]:
    """Append several entries without item keys, chained in this order, as steps (steps.py):
    the head moved once, then the rows (instead of append_in's two statements per entry).
    Each entry appended is added to `audited`, to be told to the audit observers once
    committed (`Database.write_audited`)."""
    if not entries:
        return
    if any(entry.item_key is not None for entry in entries):
        raise ValueError("entries with item keys are appended by append_in")
    postgres = dialect == "postgresql"
    if postgres:
        yield Step("audit.pg_lock", built(_PG_ADVISORY), {"key": _PG_LOCK}, returns="row")
    remembered = _last_head.get(engine)
    if remembered is not None:
        rows = _chain(entries, *remembered)
        moved = yield Step(
            "audit.move_head",
            built(_MOVE_HEAD),
            {
                "new_seq": rows[-1].seq,
                "new_hash": rows[-1].hash,
                "old_seq": remembered[0],
                "old_hash": remembered[1],
            },
        )
        if moved == 1:
            yield from _insert_steps(engine, rows, audited)
            return
    if not postgres:
        yield Step("audit.take_lock", built(_TAKE_LOCK), {})
    head = yield Step("audit.read_head", built(_READ_HEAD), {}, returns="row")
    rows = _chain(entries, int(head[0]), str(head[1]))
    yield Step(
        "audit.set_head", built(_SET_HEAD), {"new_seq": rows[-1].seq, "new_hash": rows[-1].hash}
    )
    yield from _insert_steps(engine, rows, audited)


def _insert_steps(engine: Engine, rows: list[AuditRow], audited: list[AuditEntry]) -> Steps[None]:
    for row in rows:
        yield Step("audit.insert", _insert_bound, _columns(row))
    _last_head[engine] = (rows[-1].seq, rows[-1].hash)
    for row in rows:
        audited.append(row.entry)
        _log_row(row)


@functools.cache
def _insert_bound() -> Any:
    """The audit row INSERT with a bound parameter per column _columns gives."""
    return audit_log.insert().values({name: bindparam(name) for name in _COLUMN_NAMES})


def _chain(entries: list[AuditEntry], seq: int, prev_hash: str) -> list[AuditRow]:
    """The entries sealed one after the other, after the row (seq, prev_hash)."""
    rows: list[AuditRow] = []
    time_ms = now_ms()
    for entry in entries:
        row = seal(entry, seq=seq + 1, time_ms=time_ms, prev_hash=prev_hash)
        rows.append(row)
        seq, prev_hash = row.seq, row.hash
    return rows


def _columns(row: AuditRow) -> dict[str, Any]:
    stored = row.entry
    return {
        "seq": row.seq,
        "time": row.time_ms,
        "direction": stored.direction,
        "item_key": stored.item_key,
        "link": stored.link,
        "room_id": stored.room_id,
        "sender": stored.sender,
        "recipients": json.dumps(list(stored.recipients), ensure_ascii=False),
        "ids": json.dumps(dict(stored.ids), ensure_ascii=False, sort_keys=True),
        "verdict": stored.verdict,
        "outcome": stored.outcome,
        "reason": stored.reason,
        "body_sha256": stored.body_sha256,
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


# The columns _columns gives, in its order.
_COLUMN_NAMES = (
    "seq",
    "time",
    "direction",
    "item_key",
    "link",
    "room_id",
    "sender",
    "recipients",
    "ids",
    "verdict",
    "outcome",
    "reason",
    "body_sha256",
    "prev_hash",
    "hash",
)


def _logged(conn: AsyncConnection, row: AuditRow) -> None:
    audited = conn.info.get(AUDITED)
    if audited is not None:  # told to Database.audit_observers after the commit
        audited.append(row.entry)
    _log_row(row)


def _log_row(row: AuditRow) -> None:
    entry = row.entry
    log.debug("audit row %d: %s %s %s", row.seq, entry.direction, entry.outcome, entry.link)


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
