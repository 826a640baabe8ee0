"""Leases in the shared database: acquire (one conditional write), renew, release, and the
fencing check a holder's writes run inside their own transaction."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Update,
    bindparam,
    delete,
    func,
    literal,
    literal_column,
    select,
)
from sqlalchemy import update as sql_update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.core.leases import LeaseHolder, LeaseLost, check_holder
from bridge.db.schema import lease
from bridge.db.steps import Step, Steps, run_steps
from bridge.db.util import insert_ignore

if TYPE_CHECKING:
    from bridge.db.engine import Database

# Presence rows: every running instance holds "instance:<id>" (how many share the work).
INSTANCE_PREFIX = "instance:"
# A name list is sent in chunks (SQL parameter limits).
CHUNK = 500

# Milliseconds since the epoch on the database's clock: the one clock every instance shares.
_NOW_SQL = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    "sqlite": "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
}


def _unfenced(db: Database) -> AsyncContextManager[AsyncConnection]:
    """A transaction on the lease table itself: never fenced (a fenced caller — a unit that
    drops another — would hold its own lease row while this one waits on another, and a
    renewal waits on both: a deadlock)."""
    return db.engine.begin()


def _now(conn: AsyncConnection) -> ColumnElement[int]:
    return literal_column(_NOW_SQL[conn.dialect.name], BigInteger)


def _chunks(names: Iterable[str]) -> list[list[str]]:
    ordered = sorted(set(names))
    return [ordered[i : i + CHUNK] for i in range(0, len(ordered), CHUNK)]


@dataclass(frozen=True)
class LeaseRow:
    name: str
    owner: str
    epoch: int
    expires_in_ms: int  # negative: expired


async def acquire(db: Database, name: str, owner: str, ttl_ms: int) -> int | None:
    """Take the lease if it is free, expired, or left by an earlier process with this same
    owner ID; returns the new epoch, or None when another instance holds it. One conditional
    write either way, so two instances can never both succeed."""
    async with _unfenced(db) as conn:
        now = _now(conn)
        inserted = await conn.execute(
            insert_ignore(conn, lease, ["name"]).values(
                name=name,
                owner=owner,
                epoch=1,
                acquired_at=now,
                renewed_at=now,
                expires_at=now + literal(ttl_ms, BigInteger),
            )
        )
        if inserted.rowcount == 1:
            return 1
        taken = await conn.execute(
            sql_update(lease)
            .where(lease.c.name == name, (lease.c.expires_at < now) | (lease.c.owner == owner))
            .values(
                owner=owner,
                epoch=lease.c.epoch + 1,
                acquired_at=now,
                renewed_at=now,
                expires_at=now + literal(ttl_ms, BigInteger),
            )
            .returning(lease.c.epoch)
        )
        epoch = taken.scalar_one_or_none()
    return None if epoch is None else int(epoch)


async def acquire_many(
    db: Database, names: Iterable[str], owner: str, ttl_ms: int
) -> dict[str, int]:
    """acquire() for many names, a few statements per 500 (thousands of mailboxes at
    start-up): name → new epoch of those taken; the others are held by another instance."""
    taken: dict[str, int] = {}
    for chunk in _chunks(names):
        async with _unfenced(db) as conn:
            now = _now(conn)
            expires = now + literal(ttl_ms, BigInteger)
            inserted = await conn.execute(
                insert_ignore(conn, lease, ["name"])
                .values(owner=owner, epoch=1, acquired_at=now, renewed_at=now, expires_at=expires)
                .returning(lease.c.name, lease.c.epoch),
                [{"name": name} for name in chunk],
            )
            taken.update({str(n): int(e) for n, e in inserted.all()})
            rest = [name for name in chunk if name not in taken]
            if not rest:
                continue
            updated = await conn.execute(
                sql_update(lease)
                .where(
                    lease.c.name.in_(rest),
                    (lease.c.expires_at < now) | (lease.c.owner == owner),
                )
                .values(
                    owner=owner,
                    epoch=lease.c.epoch + 1,
                    acquired_at=now,
                    renewed_at=now,
                    expires_at=expires,
                )
                .returning(lease.c.name, lease.c.epoch)
            )
            taken.update({str(n): int(e) for n, e in updated.all()})
    return taken


async def renew(db: Database, owner: str, ttl_ms: int) -> dict[str, int]:
    """Extend every unexpired lease of `owner` in one statement; returns name → epoch of
    those renewed. A lease that expired is not renewed: it has to be acquired again (a new
    epoch), since another instance may have held it meanwhile."""
    async with _unfenced(db) as conn:
        now = _now(conn)
        rows = await conn.execute(
            sql_update(lease)
            .where(lease.c.owner == owner, lease.c.expires_at > now)
            .values(renewed_at=now, expires_at=now + literal(ttl_ms, BigInteger))
            .returning(lease.c.name, lease.c.epoch)
        )
        return {str(name): int(epoch) for name, epoch in rows.all()}


async def release(db: Database, owner: str, names: Iterable[str]) -> None:
    """Hand leases back at once (a clean stop): another instance may take them on its next
    look instead of waiting for them to expire. The epoch stays, so it only ever grows."""
    async with _unfenced(db) as conn:
        for chunk in _chunks(names):
            await conn.execute(
                sql_update(lease)
                .where(lease.c.owner == owner, lease.c.name.in_(chunk))
                .values(expires_at=0)
            )


async def free(db: Database, names: Iterable[str]) -> set[str]:
    """Which of `names` nobody holds (no row yet, or expired): worth trying to acquire."""
    found: set[str] = set()
    async with _unfenced(db) as conn:
        now = _now(conn)
        for chunk in _chunks(names):
            held = (
                await conn.execute(
                    select(lease.c.name).where(lease.c.name.in_(chunk), lease.c.expires_at >= now)
                )
            ).scalars()
            found.update(set(chunk) - {str(name) for name in held})
    return found


async def live_instances(db: Database) -> int:
    """Instances whose presence lease is unexpired."""
    async with _unfenced(db) as conn:
        count = (
            await conn.execute(
                select(func.count()).where(
                    lease.c.name.startswith(INSTANCE_PREFIX, autoescape=True),
                    lease.c.expires_at >= _now(conn),
                )
            )
        ).scalar()
    return int(count or 0)


async def forget_instances(db: Database, older_than_ms: int) -> int:
    """Delete presence rows of instances gone for longer than `older_than_ms`."""
    async with _unfenced(db) as conn:
        result = await conn.execute(
            delete(lease).where(
                lease.c.name.startswith(INSTANCE_PREFIX, autoescape=True),
                lease.c.expires_at < _now(conn) - literal(older_than_ms, BigInteger),
            )
        )
    return int(result.rowcount)


async def all_leases(db: Database) -> list[LeaseRow]:
    """Every lease, for status pages and tests."""
    async with _unfenced(db) as conn:
        rows = (
            await conn.execute(
                select(
                    lease.c.name,
                    lease.c.owner,
                    lease.c.epoch,
                    lease.c.expires_at - _now(conn),
                ).order_by(lease.c.name)
            )
        ).all()
    return [LeaseRow(str(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]


async def check(conn: AsyncConnection, holder: LeaseHolder) -> None:
    """Fencing, inside the caller's transaction: raise LeaseLost unless `holder` still holds
    the lease (see fence_steps)."""
    await run_steps(conn, fence_steps(conn.dialect.name, holder))


def fence_steps(dialect: str, holder: LeaseHolder) -> Steps[None]:
    """The fencing check as steps (steps.py), to run first in a holder's transaction.

    On PostgreSQL the row is read FOR SHARE: a takeover (an UPDATE of that row) waits until
    this transaction has committed or rolled back, so a holder that lost its lease can never
    commit after another instance took it. On SQLite (whose driver starts a transaction only
    at the first write) the check is a write that changes nothing: it takes the database's one
    write lock at once, so no takeover commits before this transaction ends."""
    key = {"b_name": holder.name}
    if dialect == "postgresql":
        row = yield Step("lease.fence_read", _fence_read, key, returns="row")
        check_holder(holder, None if row is None else (str(row[0]), int(row[1])))
        return
    held = {**key, "b_owner": holder.owner, "b_epoch": holder.epoch}
    touched = yield Step("lease.fence_touch", _fence_touch, held)
    if touched != 1:
        row = yield Step("lease.read", _lease_read, key, returns="row")
        check_holder(holder, None if row is None else (str(row[0]), int(row[1])))
        # Same owner and epoch, yet nothing touched: it cannot be; refuse all the same.
        raise LeaseLost(f"lease {holder.name} could not be checked")


@functools.cache
def _lease_read() -> Select[Any]:
    return select(lease.c.owner, lease.c.epoch).where(lease.c.name == bindparam("b_name"))


@functools.cache
def _fence_read() -> Select[Any]:
    return _lease_read().with_for_update(read=True)


@functools.cache
def _fence_touch() -> Update:
    return (
        sql_update(lease)
        .where(
            lease.c.name == bindparam("b_name"),
            lease.c.owner == bindparam("b_owner"),
            lease.c.epoch == bindparam("b_epoch"),
        )
        .values(owner=lease.c.owner)
    )
