"""Outbound webhooks: the outbox of room events to POST, in order per hook."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import false, func, select, update

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID
from bridge.db.audit import append_in
from bridge.db.engine import Database
from bridge.db.schema import webhook_outbox
from bridge.db.util import insert_ignore, now_ms

STATES = ("pending", "sent", "failed")


@dataclass(frozen=True)
class HookDelivery:
    id: int
    hook: str
    room_id: RoomID
    event_id: EventID
    kind: str  # message.created | message.edited | message.redacted
    payload: dict[str, Any]
    sender: str | None
    attempts: int
    next_attempt_at: int  # ms since the epoch
    created_at: int


async def enqueue(
    db: Database,
    *,
    hook: str,
    room_id: RoomID,
    event_id: EventID,
    kind: str,
    payload: dict[str, Any],
    sender: str | None,
) -> int | None:
    """Queue an event for a hook, due now; None if the hook already has it (a handler run
    again after a crash)."""
    now = now_ms()
    async with db.begin() as conn:
        value = (
            await conn.execute(
                insert_ignore(conn, webhook_outbox, ["hook", "event_id"])
                .values(
                    hook=hook,
                    room_id=room_id,
                    event_id=event_id,
                    kind=kind,
                    payload=json.dumps(payload, ensure_ascii=False, separators=(",", ":")),
                    sender=sender,
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
                .returning(webhook_outbox.c.id)
            )
        ).scalar_one_or_none()
    return None if value is None else int(value)


async def delivered_or_queued(db: Database, hook: str, event_ids: list[str]) -> set[str]:
    """Which of `event_ids` this hook was sent, or still has queued (not failed): an edit or
    a redaction goes only where its message went."""
    if not event_ids:
        return set()
    query = select(webhook_outbox.c.event_id).where(
        webhook_outbox.c.hook == hook,
        webhook_outbox.c.event_id.in_(event_ids),
        webhook_outbox.c.state != "failed",
    )
    async with db.begin() as conn:
        return {str(r.event_id) for r in (await conn.execute(query)).all()}


async def hooks_with_pending(db: Database) -> set[str]:
    query = select(webhook_outbox.c.hook).where(webhook_outbox.c.state == "pending").distinct()
    async with db.begin() as conn:
        return {str(r.hook) for r in (await conn.execute(query)).all()}


async def next_pending(db: Database, hook: str, limit: int) -> list[HookDelivery]:
    """The hook's oldest pending deliveries, in queue order."""
    query = (
        select(webhook_outbox)
        .where(webhook_outbox.c.state == "pending", webhook_outbox.c.hook == hook)
        .order_by(webhook_outbox.c.id)
        .limit(limit)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [_delivery(r) for r in rows]


def _delivery(r: Any) -> HookDelivery:
    return HookDelivery(
        id=int(r.id),
        hook=r.hook,
        room_id=RoomID(r.room_id),
        event_id=EventID(r.event_id),
        kind=r.kind,
        payload=json.loads(r.payload),
        sender=r.sender,
        attempts=int(r.attempts),
        next_attempt_at=int(r.next_attempt_at),
        created_at=int(r.created_at),
    )


async def mark_retry(
    db: Database, item_id: int, error: str, status: int | None, next_attempt_at: int
) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_outbox)
            .where(webhook_outbox.c.id == item_id, webhook_outbox.c.state == "pending")
            .values(
                attempts=webhook_outbox.c.attempts + 1,
                next_attempt_at=next_attempt_at,
                last_error=error[:2000],
                status_code=status,
            )
        )


async def finish(
    db: Database,
    item_id: int,
    state: str,
    *,
    status: int | None,
    error: str | None,
    audit: AuditEntry,
    told: bool = False,
) -> None:
    """Sent or failed, with its audit row in the same commit (only if it was still pending:
    a repeat records nothing twice). A sent item, or one `told` (nothing to say), is not told
    in the room."""
    assert state in ("sent", "failed")
    async with db.begin() as conn:
        changed = await conn.execute(
            update(webhook_outbox)
            .where(webhook_outbox.c.id == item_id, webhook_outbox.c.state == "pending")
            .values(
                state=state,
                attempts=webhook_outbox.c.attempts + 1,
                finished_at=now_ms(),
                last_error=None if error is None else error[:2000],
                status_code=status,
                reported=state == "sent" or told,
            )
        )
        if changed.rowcount:
            await append_in(conn, audit)


async def drop_pending(
    db: Database, hook: str, reason: str, audit: Callable[[HookDelivery], AuditEntry]
) -> int:
    """Every pending delivery of `hook` failed with `reason`, not told one by one (the hook was
    revoked: whoever revoked it was told), each with its audit row, in one commit; how many."""
    query = select(webhook_outbox).where(
        webhook_outbox.c.state == "pending", webhook_outbox.c.hook == hook
    )
    async with db.begin() as conn:
        items = [_delivery(r) for r in (await conn.execute(query)).all()]
        for item in items:
            await conn.execute(
                update(webhook_outbox)
                .where(webhook_outbox.c.id == item.id)
                .values(state="failed", finished_at=now_ms(), last_error=reason, reported=True)
            )
            await append_in(conn, audit(item))
    return len(items)


async def failures_to_report(
    db: Database, limit: int
) -> list[tuple[int, str, RoomID, EventID, str]]:
    """(id, hook, room, event, error) of failed deliveries not told yet."""
    query = (
        select(webhook_outbox)
        .where(webhook_outbox.c.reported == false(), webhook_outbox.c.state == "failed")
        .order_by(webhook_outbox.c.id)
        .limit(limit)
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        (int(r.id), str(r.hook), RoomID(r.room_id), EventID(r.event_id), r.last_error or "")
        for r in rows
    ]


async def mark_reported(db: Database, item_id: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_outbox).where(webhook_outbox.c.id == item_id).values(reported=True)
        )


async def counts(db: Database) -> dict[str, int]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(webhook_outbox.c.state, func.count()).group_by(webhook_outbox.c.state)
            )
        ).all()
    result = dict.fromkeys(STATES, 0)
    result.update({str(state): int(n) for state, n in rows})
    return result


async def pending_summary(db: Database) -> tuple[int, int | None]:
    """Deliveries waiting, and when the oldest was queued (ms since the epoch)."""
    query = select(func.count(), func.min(webhook_outbox.c.created_at)).where(
        webhook_outbox.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
