"""Inbound webhooks: the inbox of verified requests and each hook's thread roots."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import func, select, update

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID
from bridge.db.audit import append_in
from bridge.db.engine import Database
from bridge.db.schema import webhook_inbox, webhook_thread
from bridge.db.util import insert_ignore, now_ms

INBOX_DONE = ("done", "refused", "ignored", "failed")


@dataclass(frozen=True)
class HookInboxItem:
    id: int
    hook: str
    webhook_id: str
    body: str  # the request's JSON object, as verified
    attempts: int
    received_at: int = 0  # ms since the epoch: when it was accepted (202)


async def store(db: Database, hook: str, webhook_id: str, body: str) -> HookInboxItem | None:
    """Keep a verified request, and return it as kept; None if this hook already has one with
    that webhook-id."""
    received_at = now_ms()
    async with db.begin() as conn:
        result = await conn.execute(
            insert_ignore(conn, webhook_inbox, ["hook", "webhook_id"])
            .values(hook=hook, webhook_id=webhook_id, body=body, received_at=received_at)
            .returning(webhook_inbox.c.id)
        )
        item_id = result.scalar_one_or_none()
    if item_id is None:
        return None
    return HookInboxItem(int(item_id), hook, webhook_id, body, 0, received_at)


async def pending(
    db: Database, limit: int, exclude: set[int], *, skip_hooks: Collection[str] = ()
) -> list[HookInboxItem]:
    """Pending requests in arrival order, those in `exclude` and of `skip_hooks` (waiting
    for their room) left out."""
    query = (
        select(webhook_inbox)
        .where(webhook_inbox.c.state == "pending", webhook_inbox.c.hook.not_in(skip_hooks))
        .order_by(webhook_inbox.c.id)
        .limit(limit + len(exclude))
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [
        HookInboxItem(
            id=int(r.id),
            hook=r.hook,
            webhook_id=r.webhook_id,
            body=r.body,
            attempts=int(r.attempts),
            received_at=int(r.received_at),
        )
        for r in rows
        if r.id not in exclude
    ][:limit]


async def thread_root(db: Database, hook: str, room_id: str, thread_key: str) -> EventID | None:
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(webhook_thread.c.root_event_id).where(
                    webhook_thread.c.hook == hook,
                    webhook_thread.c.room_id == room_id,
                    webhook_thread.c.thread_key == thread_key,
                )
            )
        ).scalar_one_or_none()
    return None if value is None else EventID(value)


async def record_posted(
    db: Database,
    item_id: int,
    event_id: EventID,
    *,
    thread: tuple[str, str, str] | None,
    audit: AuditEntry,
) -> None:
    """The request posted: its event, the thread it started (hook, room, key) if any, and its
    audit row, in one commit."""
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_inbox)
            .where(webhook_inbox.c.id == item_id)
            .values(state="done", event_id=event_id, last_error=None)
        )
        if thread is not None:
            hook, room_id, key = thread
            await conn.execute(
                insert_ignore(conn, webhook_thread, ["hook", "room_id", "thread_key"]).values(
                    hook=hook,
                    room_id=room_id,
                    thread_key=key,
                    root_event_id=event_id,
                    created_at=now_ms(),
                )
            )
        await append_in(conn, audit)


async def finish(
    db: Database, item_id: int, state: str, *, error: str, audit: AuditEntry | None = None
) -> None:
    """A final state other than posted, and its audit row in the same commit."""
    assert state in INBOX_DONE
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_inbox)
            .where(webhook_inbox.c.id == item_id)
            .values(state=state, last_error=error[:2000])
        )
        if audit is not None:
            await append_in(conn, audit)


async def count_failure(db: Database, item_id: int, error: str) -> int:
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_inbox)
            .where(webhook_inbox.c.id == item_id)
            .values(attempts=webhook_inbox.c.attempts + 1, last_error=error[:2000])
        )
        value = (
            await conn.execute(
                select(webhook_inbox.c.attempts).where(webhook_inbox.c.id == item_id)
            )
        ).scalar_one()
    return int(value)


async def counts(db: Database) -> dict[str, int]:
    """How many requests are in each state."""
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(webhook_inbox.c.state, func.count()).group_by(webhook_inbox.c.state)
            )
        ).all()
    return {str(state): int(n) for state, n in rows}


async def pending_summary(db: Database) -> tuple[int, int | None]:
    """Requests waiting to be posted, and when the oldest arrived (ms since the epoch)."""
    query = select(func.count(), func.min(webhook_inbox.c.received_at)).where(
        webhook_inbox.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
