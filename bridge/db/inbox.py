"""Appservice transactions and the durable inbox of events they carried."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Update, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.ids import EventID, RoomID, TxnID, UserID
from bridge.db.engine import Database
from bridge.db.schema import appservice_txn, dead_letter, inbox_event
from bridge.db.steps import Step, Steps
from bridge.db.util import insert_ignore, now_ms

# Keep a dead-lettered payload readable without letting one event fill the disk.
MAX_DEAD_PAYLOAD = 65536
# pg_advisory_xact_lock key of the inbox ("pasinbox" as a number).
INBOX_LOCK = 0x706173696E626F78


@dataclass(frozen=True)
class IncomingEvent:
    event_id: EventID
    room_id: RoomID
    event_type: str
    sender: UserID
    origin_ts: int
    event_json: str


@dataclass(frozen=True)
class Rejected:
    payload: Any
    reason: str


async def _insert_events(conn: AsyncConnection, events: list[IncomingEvent], now: int) -> int:
    """Insert the events not stored yet, all in one statement (multi-row VALUES); returns
    how many were new."""
    if not events:
        return 0
    rows = [
        {
            "event_id": ev.event_id,
            "room_id": ev.room_id,
            "event_type": ev.event_type,
            "sender": ev.sender,
            "event_json": ev.event_json,
            "origin_ts": ev.origin_ts,
            "received_at": now,
        }
        for ev in events
    ]
    statement = insert_ignore(conn, inbox_event, ["event_id"]).returning(inbox_event.c.seq)
    result = await conn.execute(statement, rows)
    return len(result.all())


async def store_caught_up(db: Database, events: list[IncomingEvent]) -> int:
    """Store events found by reading rooms back (not pushed); returns how many were new."""
    async with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INBOX_LOCK})
        return await _insert_events(conn, events, now_ms())


async def latest_origin_ts(db: Database, room_id: RoomID) -> int | None:
    """Timestamp of the newest event stored for a room, or None when it has none."""
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(func.max(inbox_event.c.origin_ts)).where(inbox_event.c.room_id == room_id)
            )
        ).scalar()
    return None if value is None else int(value)


@dataclass(frozen=True)
class TxnOutcome:
    replay: bool
    stored: int
    duplicates: int
    rejected: int


@dataclass(frozen=True)
class InboxEvent:
    seq: int
    event_id: EventID
    room_id: RoomID
    event_type: str
    sender: UserID
    event: dict[str, Any]
    attempts: int


def _dump(payload: Any) -> str:
    # ASCII-escaped: a dead letter may hold lone surrogates no database can store raw.
    try:
        dumped = json.dumps(payload, ensure_ascii=True, default=repr)
    except (TypeError, ValueError, RecursionError):
        dumped = ascii(payload)
    return dumped[:MAX_DEAD_PAYLOAD]


async def store_transaction(
    db: Database,
    txn_id: TxnID,
    digest: str,
    events: list[IncomingEvent],
    rejected: list[Rejected],
) -> TxnOutcome:
    """Store a transaction's events durably, once, in one database transaction.

    The txnId is opaque and may hold any character, so it is stored as a hash. The same txnId
    with the same body is a replay and changes nothing. The same txnId with a
    different body (a homeserver whose counter restarted) is taken as new; its events are still
    deduplicated by event ID, so nothing is handled twice either way.
    """
    txn_key = hashlib.sha256(txn_id.encode("utf-8", "surrogatepass")).hexdigest()
    async with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            # One writer of the inbox at a time, across bridge instances: concurrent
            # transactions with overlapping events would otherwise deadlock on the unique index.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": INBOX_LOCK})
        seen = (
            await conn.execute(
                select(appservice_txn.c.digest).where(appservice_txn.c.txn_key == txn_key)
            )
        ).scalar_one_or_none()
        if seen == digest:
            return TxnOutcome(replay=True, stored=0, duplicates=len(events), rejected=0)
        now = now_ms()
        stored = await _insert_events(conn, events, now)
        for bad in rejected:
            await conn.execute(
                dead_letter.insert().values(
                    source="transaction",
                    ref=txn_key,
                    payload=_dump(bad.payload),
                    reason=bad.reason,
                    created_at=now,
                )
            )
        if seen is None:
            await conn.execute(
                appservice_txn.insert().values(txn_key=txn_key, digest=digest, received_at=now)
            )
        else:
            await conn.execute(
                update(appservice_txn)
                .where(appservice_txn.c.txn_key == txn_key)
                .values(digest=digest, received_at=now)
            )
    return TxnOutcome(
        replay=False, stored=stored, duplicates=len(events) - stored, rejected=len(rejected)
    )


async def pending_events(db: Database, limit: int, exclude: set[int]) -> list[InboxEvent]:
    """Pending events in arrival order, skipping those already being handled."""
    query = (
        select(
            inbox_event.c.seq,
            inbox_event.c.event_id,
            inbox_event.c.room_id,
            inbox_event.c.event_type,
            inbox_event.c.sender,
            inbox_event.c.event_json,
            inbox_event.c.attempts,
        )
        .where(inbox_event.c.state == "pending")
        .order_by(inbox_event.c.seq)
        .limit(limit + len(exclude))
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        InboxEvent(
            seq=row.seq,
            event_id=EventID(row.event_id),
            room_id=RoomID(row.room_id),
            event_type=row.event_type,
            sender=UserID(row.sender),
            event=json.loads(row.event_json),
            attempts=row.attempts,
        )
        for row in rows
        if row.seq not in exclude
    ][:limit]


async def mark_events_done(db: Database, seqs: list[int]) -> None:
    """Settle handled events: every one of `seqs` done, in one statement and one commit.

    The only place the dispatcher settles events (a fencing check for the instance's lease
    belongs in this transaction)."""
    if not seqs:
        return
    done_at = now_ms()

    def steps(dialect: str) -> Steps[None]:
        for start in range(0, len(seqs), _DONE_CHUNK):
            chunk = seqs[start : start + _DONE_CHUNK]
            # A statement per power of two (a few compiled in all), the list padded with its
            # last number.
            size = 1 << (len(chunk) - 1).bit_length()
            padded = chunk + [chunk[-1]] * (size - len(chunk))
            params: dict[str, Any] = {f"s{i}": seq for i, seq in enumerate(padded)}
            params["v_done_at"] = done_at
            yield Step(f"inbox.done.{size}", functools.partial(_done_statement, size), params)

    await db.write(steps)


_DONE_CHUNK = 512


@functools.cache
def _done_statement(size: int) -> Update:
    return (
        update(inbox_event)
        .where(inbox_event.c.seq.in_([bindparam(f"s{i}") for i in range(size)]))
        .values(state="done", done_at=bindparam("v_done_at"), last_error=None)
    )


async def record_failure(db: Database, seq: int, error: str) -> int:
    """Count one failed attempt; returns the number of attempts so far."""
    async with db.begin() as conn:
        await conn.execute(
            update(inbox_event)
            .where(inbox_event.c.seq == seq)
            .values(attempts=inbox_event.c.attempts + 1, last_error=error[:2000])
        )
        attempts = (
            await conn.execute(select(inbox_event.c.attempts).where(inbox_event.c.seq == seq))
        ).scalar_one()
    return int(attempts)


async def mark_dead(db: Database, item: InboxEvent, reason: str) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(inbox_event)
            .where(inbox_event.c.seq == item.seq)
            .values(state="dead", done_at=now_ms(), last_error=reason[:2000])
        )
        await conn.execute(
            dead_letter.insert().values(
                source="event",
                ref=item.event_id,
                payload=_dump(item.event),
                reason=reason[:2000],
                created_at=now_ms(),
            )
        )


async def counts(db: Database) -> dict[str, int]:
    """Number of inbox events per state, and of dead letters."""
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(inbox_event.c.state, func.count()).group_by(inbox_event.c.state)
            )
        ).all()
        dead_letters = (await conn.execute(select(func.count()).select_from(dead_letter))).scalar()
    result = {"pending": 0, "done": 0, "dead": 0}
    result.update({str(state): int(n) for state, n in rows})
    result["dead_letters"] = int(dead_letters or 0)
    return result


async def pending_summary(db: Database) -> tuple[int, int | None]:
    """Stored events waiting to be handled, and when the oldest came in (ms since epoch)."""
    query = select(func.count(), func.min(inbox_event.c.received_at)).where(
        inbox_event.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
