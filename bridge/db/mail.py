"""Raw mail store, Message-ID ⇄ event map and daily sender notices, per link."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Select, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.audit import AuditEntry
from bridge.core.ids import EventID, RoomID
from bridge.core.threading import Mapped
from bridge.db.audit import append_all_steps, append_in
from bridge.db.engine import Database
from bridge.db.schema import mail_raw, message_map, sender_notice
from bridge.db.steps import Step, Steps
from bridge.db.util import bound_insert_ignore, bound_update, insert_ignore, now_ms

DONE_STATES = ("done", "duplicate", "rejected", "ignored", "quarantined")


@dataclass(frozen=True)
class RawMail:
    id: int
    link_id: int
    uidvalidity: int
    uid: int
    message_id: str | None
    raw: bytes | None  # None for a mail too large to fetch
    size: int
    attempts: int
    received_at: int = 0  # ms since the epoch: when it was fetched and stored


@dataclass(frozen=True)
class MappedEvent:
    """The mail a Matrix event became (or came from), as the message_map knows it."""

    message_id: str
    thread_root: EventID
    subject: str | None


async def highest_uid(db: Database, mailbox: str, uidvalidity: int) -> int:
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(func.max(mail_raw.c.uid)).where(
                    mail_raw.c.mailbox == mailbox, mail_raw.c.uidvalidity == uidvalidity
                )
            )
        ).scalar()
    return int(value or 0)


async def has_any_mail(db: Database, link_id: int) -> bool:
    async with db.begin() as conn:
        row = (
            await conn.execute(select(mail_raw.c.id).where(mail_raw.c.link_id == link_id).limit(1))
        ).first()
    return row is not None


async def store_raw(
    db: Database,
    *,
    link_id: int,
    mailbox: str,
    uidvalidity: int,
    uid: int,
    message_id: str | None,
    raw: bytes | None,
    size: int,
    state: str = "pending",
    error: str | None = None,
) -> bool:
    """Store one fetched mail once. A Message-ID this link already has makes it a duplicate
    (a list's second copy, or a mailbox whose UIDVALIDITY changed): kept, never posted."""
    async with db.begin() as conn:
        return await _store_raw_in(
            conn,
            link_id=link_id,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            uid=uid,
            message_id=message_id,
            raw=raw,
            size=size,
            state=state,
            error=error,
        )


@dataclass(frozen=True)
class FetchedMail:
    uid: int
    message_id: str | None
    raw: bytes


async def store_raw_many(
    db: Database, *, link_id: int, mailbox: str, uidvalidity: int, mails: list[FetchedMail]
) -> int:
    """`store_raw` for several fetched mails of one mailbox, in one commit (all or none), in
    the order given; returns how many were stored as pending."""
    stored = 0
    async with db.begin() as conn:
        for mail in mails:
            stored += await _store_raw_in(
                conn,
                link_id=link_id,
                mailbox=mailbox,
                uidvalidity=uidvalidity,
                uid=mail.uid,
                message_id=mail.message_id,
                raw=mail.raw,
                size=len(mail.raw),
            )
    return stored


async def _store_raw_in(
    conn: AsyncConnection,
    *,
    link_id: int,
    mailbox: str,
    uidvalidity: int,
    uid: int,
    message_id: str | None,
    raw: bytes | None,
    size: int,
    state: str = "pending",
    error: str | None = None,
) -> bool:
    if message_id is not None and state == "pending":
        known = (
            await conn.execute(
                select(mail_raw.c.id)
                .where(mail_raw.c.link_id == link_id, mail_raw.c.message_id == message_id)
                .limit(1)
            )
        ).first()
        if known is not None:
            state, raw = "duplicate", None
    result = await conn.execute(
        insert_ignore(conn, mail_raw, ["mailbox", "uidvalidity", "uid"]).values(
            link_id=link_id,
            mailbox=mailbox,
            uidvalidity=uidvalidity,
            uid=uid,
            message_id=message_id,
            raw=raw,
            size=size,
            received_at=now_ms(),
            state=state,
            last_error=error,
        )
    )
    return bool(result.rowcount) and state == "pending"


def raw_mail(r: Row[Any]) -> RawMail:
    """A mail_raw row as the relay takes it."""
    return RawMail(
        id=r.id,
        link_id=r.link_id,
        uidvalidity=int(r.uidvalidity),
        uid=int(r.uid),
        message_id=r.message_id,
        raw=r.raw,
        size=int(r.size),
        attempts=int(r.attempts),
        received_at=int(r.received_at),
    )


async def pending_mail(db: Database, limit: int, exclude: set[int]) -> list[RawMail]:
    query = (
        select(mail_raw)
        .where(mail_raw.c.state == "pending")
        .order_by(mail_raw.c.uidvalidity, mail_raw.c.uid)
        .limit(limit + len(exclude))
    )
    async with db.begin() as conn:
        rows = (await conn.execute(query)).all()
    return [raw_mail(r) for r in rows if r.id not in exclude][:limit]


async def finish(
    db: Database,
    mail_id: int,
    state: str,
    *,
    error: str | None = None,
    event_id: str | None = None,
    audit: AuditEntry | None = None,
) -> None:
    """The mail's final state, and its audit row in the same commit."""
    assert state in DONE_STATES
    async with db.begin() as conn:
        await conn.execute(
            update(mail_raw)
            .where(mail_raw.c.id == mail_id)
            .values(state=state, last_error=error, event_id=event_id)
        )
        if audit is not None:
            await append_in(conn, audit)


async def count_failure(db: Database, mail_id: int, error: str) -> int:
    async with db.begin() as conn:
        await conn.execute(
            update(mail_raw)
            .where(mail_raw.c.id == mail_id)
            .values(attempts=mail_raw.c.attempts + 1, last_error=error[:2000])
        )
        value = (
            await conn.execute(select(mail_raw.c.attempts).where(mail_raw.c.id == mail_id))
        ).scalar_one()
    return int(value)


def _by_message_id() -> Select[Any]:
    return select(message_map.c.event_id, message_map.c.thread_root, message_map.c.subject).where(
        message_map.c.link_id == bindparam("link_id"),
        message_map.c.message_id == bindparam("message_id"),
    )


def _by_event() -> Select[Any]:
    return (
        select(message_map.c.message_id, message_map.c.thread_root, message_map.c.subject)
        .where(
            message_map.c.link_id == bindparam("link_id"),
            message_map.c.event_id == bindparam("event_id"),
        )
        .order_by(message_map.c.created_at, message_map.c.message_id)
        .limit(1)
    )


async def lookup(db: Database, link_id: int, message_id: str) -> Mapped | None:
    row = await db.read_one(
        "mail.lookup", _by_message_id, {"link_id": link_id, "message_id": message_id}
    )
    if row is None:
        return None
    return Mapped(EventID(row["event_id"]), EventID(row["thread_root"]), row["subject"])


async def lookup_event(db: Database, link_id: int, event_id: str) -> MappedEvent | None:
    """The Message-ID this link mapped to the event (the oldest, if there are several)."""
    row = await db.read_one(
        "mail.lookup_event", _by_event, {"link_id": link_id, "event_id": event_id}
    )
    if row is None:
        return None
    return MappedEvent(row["message_id"], EventID(row["thread_root"]), row["subject"])


@dataclass(frozen=True)
class PostedMail:
    """A mail posted as `event_id`, to be recorded: its mapping, its state and audit row."""

    mail_id: int
    link_id: int
    message_id: str
    room_id: RoomID
    event_id: EventID
    thread_root: EventID
    subject: str | None
    audit: AuditEntry | None = None


async def record_posted_many(db: Database, posted: list[PostedMail]) -> None:
    """Several posted mails recorded in one commit, in order: for each, its mapping and its
    state done, then their audit rows chained in the same order (all or none of them).
    Straight through the driver where it can be (`Database.write`)."""
    if not posted:
        return
    engine = db.engine.sync_engine
    created = now_ms()

    def steps(dialect: str, audited: list[AuditEntry]) -> Steps[None]:
        for mail in posted:
            yield Step(
                f"message_map.insert.{dialect}",
                functools.partial(map_statement, dialect),
                {
                    "link_id": mail.link_id,
                    "message_id": mail.message_id,
                    "room_id": mail.room_id,
                    "event_id": mail.event_id,
                    "thread_root": mail.thread_root,
                    "subject": mail.subject,
                    "created_at": created,
                },
            )
            yield Step(
                "mail.done",
                _done_statement,
                {
                    "b_key": mail.mail_id,
                    "v_state": "done",
                    "v_last_error": None,
                    "v_event_id": mail.event_id,
                },
            )
        entries = [mail.audit for mail in posted if mail.audit is not None]
        yield from append_all_steps(dialect, engine, entries, audited)

    await db.write_audited(steps)


def map_statement(dialect: str) -> Any:
    """A Message-ID ⇄ event mapping stored unless the Message-ID is mapped already, each
    column bound to the parameter of its name (mail in here, mail out in outbox.py)."""
    columns = ("link_id", "message_id", "room_id", "event_id", "thread_root", "subject")
    index = ("link_id", "message_id")
    return bound_insert_ignore(dialect, message_map, index, (*columns, "created_at"))


def _done_statement() -> Any:
    return bound_update(mail_raw, "id", ("state", "last_error", "event_id"))


async def record_posted(
    db: Database,
    *,
    mail_id: int,
    link_id: int,
    message_id: str,
    room_id: RoomID,
    event_id: EventID,
    thread_root: EventID,
    subject: str | None,
    audit: AuditEntry | None = None,
) -> None:
    """A posted mail: its Message-ID mapped, its state done and its audit row, in one commit."""
    mail = PostedMail(mail_id, link_id, message_id, room_id, event_id, thread_root, subject, audit)
    await record_posted_many(db, [mail])


async def refusals_today(db: Database, link_id: int, address: str, day: str) -> int:
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(sender_notice.c.refused).where(
                    (sender_notice.c.link_id == link_id)
                    & (sender_notice.c.address == address)
                    & (sender_notice.c.day == day)
                )
            )
        ).scalar()
    return int(value or 0)


async def count_refusal(db: Database, link_id: int, address: str, day: str) -> int:
    """Count a refused mail from a sender today; returns the count (1 = first today)."""
    async with db.begin() as conn:
        await conn.execute(
            insert_ignore(conn, sender_notice, ["link_id", "address", "day"]).values(
                link_id=link_id, address=address, day=day, refused=0
            )
        )
        where = (
            (sender_notice.c.link_id == link_id)
            & (sender_notice.c.address == address)
            & (sender_notice.c.day == day)
        )
        await conn.execute(
            update(sender_notice).where(where).values(refused=sender_notice.c.refused + 1)
        )
        value = (await conn.execute(select(sender_notice.c.refused).where(where))).scalar_one()
    return int(value)


async def pending_summary(db: Database) -> tuple[int, int | None]:
    """Fetched mails waiting to be handled, and when the oldest was stored (ms since epoch)."""
    query = select(func.count(), func.min(mail_raw.c.received_at)).where(
        mail_raw.c.state == "pending"
    )
    async with db.begin() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), None if oldest is None else int(oldest)
