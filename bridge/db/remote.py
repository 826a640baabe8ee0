"""External ministry servers: /sync position, remote inbox, event map and remote outbox."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, bindparam, false, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID
from bridge.db.audit import append_in
from bridge.db.engine import Database
from bridge.db.schema import remote_event_map, remote_inbox, remote_outbox, remote_sync
from bridge.db.util import insert_ignore, now_ms, upsert

INBOX_DONE = ("done", "refused", "ignored", "failed")
OUTBOX_STATES = ("pending", "sent", "failed")


@dataclass(frozen=True)
class RemoteInboxItem:
    id: int
    remote: str
    room_id: str  # the remote room
    event_id: str
    event_json: str
    attempts: int
    received_at: int = 0  # ms since the epoch: when /sync gave it


@dataclass(frozen=True)
class Mapped:
    """One side's event as the other side knows it."""

    remote_event_id: str
    agency_event_id: EventID
    remote_sender: str
    direction: str  # in | out


@dataclass(frozen=True)
class RemoteOutgoing:
    id: int
    link_id: int
    room_id: RoomID
    event_id: EventID
    plan: dict[str, Any]
    attempts: int
    next_attempt_at: int  # ms
    created_at: int  # ms


# --- /sync intake -----------------------------------------------------------------------------


async def sync_position(db: Database, remote: str) -> str | None:
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(remote_sync.c.next_batch).where(remote_sync.c.remote == remote)
            )
        ).scalar()
    return None if value is None else str(value)


async def store_batch(
    db: Database,
    remote: str,
    events: Sequence[tuple[str, str, str]],
    next_batch: str,
) -> int:
    """Store (room ID, event ID, event JSON) triples and move the /sync position, in one
    commit. An event stored before (a batch read again after a crash) is left as it is.
    Returns how many events were new."""
    now = now_ms()
    added = 0
    async with db.begin() as conn:
        for room_id, event_id, event_json in events:
            result = await conn.execute(
                insert_ignore(conn, remote_inbox, ["remote", "event_id"]).values(
                    remote=remote,
                    room_id=room_id,
                    event_id=event_id,
                    event_json=event_json,
                    received_at=now,
                    state="pending",
                    attempts=0,
                )
            )
            added += result.rowcount or 0
        await conn.execute(
            upsert(
                conn,
                remote_sync,
                ["remote"],
                {"remote": remote, "next_batch": next_batch, "updated_at": now},
            )
        )
    return added


async def known_events(db: Database, remote: str, event_ids: Sequence[str]) -> set[str]:
    """Which of these events are already in the inbox (to stop filling a gap)."""
    if not event_ids:
        return set()
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(remote_inbox.c.event_id).where(
                    remote_inbox.c.remote == remote, remote_inbox.c.event_id.in_(event_ids)
                )
            )
        ).all()
    return {str(r.event_id) for r in rows}


async def pending_events(
    db: Database, limit: int, exclude: set[int], *, after: int = 0
) -> list[RemoteInboxItem]:
    """Pending events in arrival order (only those stored after id `after`, if given)."""
    query = (
        select(remote_inbox)
        .where(remote_inbox.c.state == "pending", remote_inbox.c.id > after)
        .order_by(remote_inbox.c.id)
        .limit(limit + len(exclude))
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        RemoteInboxItem(
            id=int(r.id),
            remote=r.remote,
            room_id=r.room_id,
            event_id=r.event_id,
            event_json=r.event_json,
            attempts=int(r.attempts),
            received_at=int(r.received_at),
        )
        for r in rows
        if r.id not in exclude
    ][:limit]


async def finish(
    db: Database,
    item_id: int,
    state: str,
    *,
    error: str | None = None,
    audit: AuditEntry | None = None,
) -> None:
    """The event's final state, and its audit row in the same commit."""
    assert state in INBOX_DONE
    async with db.begin() as conn:
        await conn.execute(
            update(remote_inbox)
            .where(remote_inbox.c.id == item_id)
            .values(state=state, last_error=None if error is None else error[:2000])
        )
        if audit is not None:
            await append_in(conn, audit)


async def count_failure(db: Database, item_id: int, error: str) -> int:
    async with db.begin() as conn:
        await conn.execute(
            update(remote_inbox)
            .where(remote_inbox.c.id == item_id)
            .values(attempts=remote_inbox.c.attempts + 1, last_error=error[:2000])
        )
        value = (
            await conn.execute(select(remote_inbox.c.attempts).where(remote_inbox.c.id == item_id))
        ).scalar_one()
    return int(value)


async def inbox_counts(db: Database, remote: str) -> dict[str, int]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(remote_inbox.c.state, func.count())
                .where(remote_inbox.c.remote == remote)
                .group_by(remote_inbox.c.state)
            )
        ).all()
    return {str(state): int(n) for state, n in rows}


# --- the event map ----------------------------------------------------------------------------


async def _map(
    conn: AsyncConnection,
    link_id: int,
    remote_event_id: str,
    agency_event_id: str,
    remote_sender: str,
    direction: str,
) -> None:
    await conn.execute(
        insert_ignore(conn, remote_event_map, ["link_id", "remote_event_id"]).values(
            link_id=link_id,
            remote_event_id=remote_event_id,
            agency_event_id=agency_event_id,
            remote_sender=remote_sender,
            direction=direction,
            created_at=now_ms(),
        )
    )


def _mapped_read(row: Mapping[str, Any] | None) -> Mapped | None:
    if row is None:
        return None
    return Mapped(
        remote_event_id=row["remote_event_id"],
        agency_event_id=EventID(row["agency_event_id"]),
        remote_sender=row["remote_sender"],
        direction=row["direction"],
    )


def _by(column: str) -> Callable[[], Select[Any]]:
    def build() -> Select[Any]:
        m = remote_event_map.c
        return select(m.remote_event_id, m.agency_event_id, m.remote_sender, m.direction).where(
            m.link_id == bindparam("link_id"), m[column] == bindparam("event_id")
        )

    return build


_BY_REMOTE = _by("remote_event_id")
_BY_AGENCY = _by("agency_event_id")


async def by_remote_event(db: Database, link_id: int, remote_event_id: str) -> Mapped | None:
    params = {"link_id": link_id, "event_id": remote_event_id}
    return _mapped_read(await db.read_one("remote.by_remote_event", _BY_REMOTE, params))


async def by_agency_event(db: Database, link_id: int, agency_event_id: str) -> Mapped | None:
    params = {"link_id": link_id, "event_id": agency_event_id}
    return _mapped_read(await db.read_one("remote.by_agency_event", _BY_AGENCY, params))


async def record_relayed(
    db: Database,
    *,
    item_id: int,
    link_id: int,
    remote_event_id: str,
    agency_event_id: str,
    remote_sender: str,
    audit: AuditEntry | None = None,
) -> None:
    """A remote event posted in the agency room: mapped, done and audited, in one commit."""
    async with db.begin() as conn:
        await _map(conn, link_id, remote_event_id, agency_event_id, remote_sender, "in")
        await conn.execute(
            update(remote_inbox)
            .where(remote_inbox.c.id == item_id)
            .values(state="done", last_error=None)
        )
        if audit is not None:
            await append_in(conn, audit)


# --- the outbox -------------------------------------------------------------------------------


async def enqueue(
    db: Database, *, link_id: int, room_id: RoomID, event_id: EventID, plan: dict[str, Any]
) -> int | None:
    """Queue an agency event for the remote room, due now. None if this link already has it
    (a handler run again after a crash)."""
    now = now_ms()
    async with db.begin() as conn:
        value = (
            await conn.execute(
                insert_ignore(conn, remote_outbox, ["link_id", "event_id"])
                .values(
                    link_id=link_id,
                    room_id=room_id,
                    event_id=event_id,
                    plan_json=json.dumps(plan, ensure_ascii=False),
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
                .returning(remote_outbox.c.id)
            )
        ).scalar_one_or_none()
    return None if value is None else int(value)


async def links_with_pending(db: Database) -> set[int]:
    """The links that have something waiting to be sent."""
    query = select(remote_outbox.c.link_id).where(remote_outbox.c.state == "pending").distinct()
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return {int(r.link_id) for r in rows}


async def next_outgoing(db: Database, link_id: int, limit: int) -> list[RemoteOutgoing]:
    """The oldest pending items of a link, in order: what it sends next."""
    query = (
        select(remote_outbox)
        .where(remote_outbox.c.state == "pending", remote_outbox.c.link_id == link_id)
        .order_by(remote_outbox.c.id)
        .limit(limit)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        RemoteOutgoing(
            id=int(r.id),
            link_id=int(r.link_id),
            room_id=RoomID(r.room_id),
            event_id=EventID(r.event_id),
            plan=json.loads(r.plan_json),
            attempts=int(r.attempts),
            next_attempt_at=int(r.next_attempt_at),
            created_at=int(r.created_at),
        )
        for r in rows
    ]


async def mark_sent(
    db: Database,
    item: RemoteOutgoing,
    remote_event_id: str,
    sender: str,
    audit: AuditEntry | None = None,
) -> None:
    """Sent: the remote event mapped to the agency event, the item done and audited, in one
    commit (the audit row only if the item was still pending)."""
    async with db.begin() as conn:
        await _map(conn, item.link_id, remote_event_id, item.event_id, sender, "out")
        changed = await conn.execute(
            update(remote_outbox)
            .where(remote_outbox.c.id == item.id, remote_outbox.c.state == "pending")
            .values(
                state="sent",
                remote_event_id=remote_event_id,
                finished_at=now_ms(),
                last_error=None,
                reported=True,
            )
        )
        if audit is not None and changed.rowcount:
            await append_in(conn, audit)


async def mark_done_without_event(
    db: Database, item_id: int, note: str, audit: AuditEntry | None = None
) -> None:
    """Nothing had to be sent after all (e.g. the redaction of a message never relayed)."""
    async with db.begin() as conn:
        changed = await conn.execute(
            update(remote_outbox)
            .where(remote_outbox.c.id == item_id, remote_outbox.c.state == "pending")
            .values(state="sent", finished_at=now_ms(), last_error=note[:2000], reported=True)
        )
        if audit is not None and changed.rowcount:
            await append_in(conn, audit)


async def mark_retry(db: Database, item_id: int, error: str, next_attempt_at: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(remote_outbox)
            .where(remote_outbox.c.id == item_id, remote_outbox.c.state == "pending")
            .values(
                attempts=remote_outbox.c.attempts + 1,
                next_attempt_at=next_attempt_at,
                last_error=error[:2000],
            )
        )


async def mark_failed(
    db: Database, item_id: int, error: str, audit: AuditEntry | None = None
) -> None:
    async with db.begin() as conn:
        changed = await conn.execute(
            update(remote_outbox)
            .where(remote_outbox.c.id == item_id, remote_outbox.c.state == "pending")
            .values(
                state="failed",
                attempts=remote_outbox.c.attempts + 1,
                finished_at=now_ms(),
                last_error=error[:2000],
            )
        )
        if audit is not None and changed.rowcount:
            await append_in(conn, audit)


async def failures_to_report(
    db: Database, limit: int
) -> list[tuple[int, int, RoomID, EventID, str]]:
    """(id, link id, agency room, agency event, error) of failed items not told yet."""
    query = (
        select(remote_outbox)
        .where(remote_outbox.c.reported == false(), remote_outbox.c.state == "failed")
        .order_by(remote_outbox.c.id)
        .limit(limit)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        (int(r.id), int(r.link_id), RoomID(r.room_id), EventID(r.event_id), r.last_error or "")
        for r in rows
    ]


async def mark_reported(db: Database, item_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(remote_outbox).where(remote_outbox.c.id == item_id).values(reported=True)
        )


async def outbox_counts(db: Database) -> dict[str, int]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(remote_outbox.c.state, func.count()).group_by(remote_outbox.c.state)
            )
        ).all()
    result = dict.fromkeys(OUTBOX_STATES, 0)
    result.update({str(state): int(n) for state, n in rows})
    return result


async def outbox_pending_summary(db: Database) -> tuple[int, int | None]:
    """Events waiting to be sent to remotes, and when the oldest was queued (ms since epoch)."""
    query = select(func.count(), func.min(remote_outbox.c.created_at)).where(
        remote_outbox.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
