"""History backfill jobs of mail links, and the mails they fetched (mail_raw, state backfill)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from bridge.db.engine import Database
from bridge.db.mail import RawMail, raw_mail
from bridge.db.schema import mail_backfill, mail_raw
from bridge.db.util import insert_ignore, now_ms

# The state of a mail fetched by a backfill, until the relay settles it: never "pending",
# so the live queue never sees it and live mail never waits behind a long history.
WAITING = "backfill"
RUNNING = "running"


@dataclass(frozen=True)
class Job:
    id: int
    link_id: int
    mailbox: str
    room_id: str
    since: str | None
    last: int | None
    uidvalidity: int | None
    upto_uid: int | None
    state: str
    total: int
    handled: int
    posted: int
    owner: str | None
    heartbeat_at: int | None
    notice_event_id: str | None
    requested_by: str | None
    last_error: str | None


def _job(row: object) -> Job:
    return Job(**{name: getattr(row, name) for name in Job.__dataclass_fields__})


async def get_job(db: Database, job_id: int) -> Job | None:
    async with db.begin() as conn:
        row = (
            await conn.execute(select(mail_backfill).where(mail_backfill.c.id == job_id))
        ).first()
    return None if row is None else _job(row)


async def unfinished_job(db: Database, link_id: int) -> Job | None:
    """The link's backfill that has not ended (at most one is ever running per link)."""
    async with db.begin() as conn:
        row = (
            await conn.execute(
                select(mail_backfill)
                .where(mail_backfill.c.link_id == link_id, mail_backfill.c.state == RUNNING)
                .order_by(mail_backfill.c.id)
                .limit(1)
            )
        ).first()
    return None if row is None else _job(row)


async def unfinished_jobs(db: Database) -> list[Job]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(mail_backfill)
                .where(mail_backfill.c.state == RUNNING)
                .order_by(mail_backfill.c.id)
            )
        ).all()
    return [_job(row) for row in rows]


async def create_job(
    db: Database,
    *,
    link_id: int,
    mailbox: str,
    room_id: str,
    since: str | None,
    last: int | None,
    requested_by: str | None,
) -> Job:
    async with db.begin() as conn:
        result = await conn.execute(
            mail_backfill.insert().values(
                link_id=link_id,
                mailbox=mailbox,
                room_id=room_id,
                since=since,
                last=last,
                state=RUNNING,
                requested_by=requested_by,
                created_at=now_ms(),
            )
        )
        job_id = int(result.inserted_primary_key[0])  # type: ignore[index]
        row = (await conn.execute(select(mail_backfill).where(mail_backfill.c.id == job_id))).one()
    return _job(row)


def _held_by(owner: str | None) -> ColumnElement[bool]:
    column = mail_backfill.c.owner
    return column.is_(None) if owner is None else column == owner


async def claim(db: Database, job: Job, me: str) -> bool:
    """Take the job from its holder as read in `job` (compare-and-set: if somebody else took
    it meanwhile, nothing changes and the answer is False)."""
    async with db.begin() as conn:
        result = await conn.execute(
            update(mail_backfill)
            .where(
                mail_backfill.c.id == job.id,
                mail_backfill.c.state == RUNNING,
                _held_by(job.owner),
            )
            .values(owner=me, heartbeat_at=now_ms())
        )
    return bool(result.rowcount)


async def heartbeat(
    db: Database,
    job_id: int,
    me: str,
    *,
    total: int | None = None,
    handled: int | None = None,
    posted: int | None = None,
) -> bool:
    """Say the job is alive, with its counters; False when it is no longer ours (fenced)."""
    values: dict[str, int] = {"heartbeat_at": now_ms()}
    for name, value in (("total", total), ("handled", handled), ("posted", posted)):
        if value is not None:
            values[name] = value
    async with db.begin() as conn:
        result = await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job_id, mail_backfill.c.owner == me)
            .values(**values)
        )
    return bool(result.rowcount)


async def set_scope(db: Database, job_id: int, me: str, uidvalidity: int, upto_uid: int) -> bool:
    """Fix the folder generation and the highest UID the job takes (the rest is live mail's)."""
    async with db.begin() as conn:
        result = await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job_id, mail_backfill.c.owner == me)
            .values(uidvalidity=uidvalidity, upto_uid=upto_uid)
        )
    return bool(result.rowcount)


async def set_notice(db: Database, job_id: int, event_id: str) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job_id)
            .values(notice_event_id=event_id)
        )


async def finish_job(
    db: Database, job_id: int, me: str, state: str, error: str | None = None
) -> bool:
    assert state in ("done", "failed")
    async with db.begin() as conn:
        result = await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job_id, mail_backfill.c.owner == me)
            .values(
                state=state,
                last_error=None if error is None else error[:2000],
                finished_at=now_ms(),
                owner=None,
            )
        )
    return bool(result.rowcount)


async def release(db: Database, job_id: int, me: str) -> None:
    """Let go of a job that is not finished (the process stops): anyone may resume it."""
    async with db.begin() as conn:
        await conn.execute(
            update(mail_backfill)
            .where(mail_backfill.c.id == job_id, mail_backfill.c.owner == me)
            .values(owner=None)
        )


async def known_uids(
    db: Database, mailbox: str, uidvalidity: int, uids: Sequence[int]
) -> dict[int, tuple[int, str]]:
    """Of `uids`, those already stored: UID → (row id, state)."""
    if not uids:
        return {}
    found: dict[int, tuple[int, str]] = {}
    lo, hi = min(uids), max(uids)
    async with db.begin() as conn:
        rows = await conn.execute(
            select(mail_raw.c.uid, mail_raw.c.id, mail_raw.c.state).where(
                mail_raw.c.mailbox == mailbox,
                mail_raw.c.uidvalidity == uidvalidity,
                mail_raw.c.uid >= lo,
                mail_raw.c.uid <= hi,
            )
        )
        for uid, row_id, state in rows:
            found[int(uid)] = (int(row_id), str(state))
    wanted = set(uids)
    return {uid: value for uid, value in found.items() if uid in wanted}


async def store_fetched(
    db: Database,
    *,
    link_id: int,
    mailbox: str,
    uidvalidity: int,
    mails: Sequence[tuple[int, str | None, bytes | None, int, str | None]],
) -> None:
    """Store fetched mails (uid, message_id, raw, size, error) in one commit, waiting for the
    backfill (not the live queue). A Message-ID the link already has makes a mail a
    duplicate, never posted: the same mail seen live, or twice in the folder."""
    async with db.begin() as conn:
        mids = [mid for _, mid, _, _, _ in mails if mid is not None]
        known: set[str] = set()
        for start in range(0, len(mids), 500):
            chunk = mids[start : start + 500]
            rows = await conn.execute(
                select(mail_raw.c.message_id).where(
                    mail_raw.c.link_id == link_id, mail_raw.c.message_id.in_(chunk)
                )
            )
            known.update(str(mid) for (mid,) in rows)
        stamp = now_ms()
        for uid, message_id, raw, size, error in mails:
            state = WAITING
            if message_id is not None and message_id in known:
                state, raw = "duplicate", None
            elif message_id is not None:
                known.add(message_id)
            await conn.execute(
                insert_ignore(conn, mail_raw, ["mailbox", "uidvalidity", "uid"]).values(
                    link_id=link_id,
                    mailbox=mailbox,
                    uidvalidity=uidvalidity,
                    uid=uid,
                    message_id=message_id,
                    raw=raw,
                    size=size,
                    received_at=stamp,
                    state=state,
                    last_error=error,
                )
            )


async def waiting_mail(
    db: Database, mailbox: str, uidvalidity: int, uids: Sequence[int]
) -> list[RawMail]:
    """The stored mails of `uids` that wait for the backfill, in UID order."""
    if not uids:
        return []
    async with db.begin() as conn:
        rows = (
            await conn.execute(
                select(mail_raw)
                .where(
                    and_(
                        mail_raw.c.mailbox == mailbox,
                        mail_raw.c.uidvalidity == uidvalidity,
                        mail_raw.c.uid.in_(list(uids)),
                        mail_raw.c.state == WAITING,
                    )
                )
                .order_by(mail_raw.c.uid)
            )
        ).all()
    return [raw_mail(r) for r in rows]


async def states(db: Database, ids: Sequence[int]) -> dict[int, str]:
    if not ids:
        return {}
    async with db.begin() as conn:
        rows = await conn.execute(
            select(mail_raw.c.id, mail_raw.c.state).where(mail_raw.c.id.in_(list(ids)))
        )
        return {int(row_id): str(state) for row_id, state in rows}


async def waiting_count(db: Database) -> int:
    """Backfilled mails not settled yet, over every job (for status and metrics)."""
    async with db.begin() as conn:
        value = (
            await conn.execute(
                select(func.count()).select_from(mail_raw).where(mail_raw.c.state == WAITING)
            )
        ).scalar_one()
    return int(value)


async def report(db: Database) -> dict[str, Any]:
    """For /status: the imports under way and how far each is, and the mails they fetched
    that wait to be posted."""
    jobs = [
        {"mailbox": job.mailbox, "handled": job.handled, "total": job.total, "posted": job.posted}
        for job in await unfinished_jobs(db)
    ]
    return {"running": jobs, "waiting": await waiting_count(db)}
