"""Write transactions of the hot paths (a mail queued for each Matrix message) straight through
the driver, on the engine's own connection.

Through SQLAlchemy's asyncio layer, queueing one mail (an INSERT, an UPDATE, an INSERT) cost
3.1 ms of CPU: greenlet hops, and a trip to aiosqlite's thread for every cursor operation,
each a semaphore post and a wake-up of the event loop. Here the transaction is described as
steps (see steps.py) and, on SQLite, run whole in aiosqlite's thread in one trip; on PostgreSQL,
statement by statement on the asyncpg connection. The connection is checked out of the
engine's pool as any transaction's: on SQLite that is the one connection every write takes
turns on, so these transactions queue with the others instead of fighting them for SQLite's
write lock. Checkout, transaction and return happen in one of SQLAlchemy's greenlets (an
AsyncConnection would take three, and a task to close it): with the rollback-on-return
skipped when nothing is open (`skip_idle_reset`), one write of one row costs 0.17 ms of CPU
on SQLite instead of 0.37.

Fencing is kept: with a lease holder (the FENCE of the running task) the lease's check runs
first in the same transaction, as in `Database.begin`. Audit entries appended by steps
(`audit.append_all_steps`) are told to the audit observers by the caller once `run` returns
(`Database.write_audited`), as `Database.begin` does after its commit.

Where the driver cannot be driven this way (another driver, an aiosqlite without the worker
call this relies on, a SQLite database in memory), `usable` is False and the caller runs the
same steps through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import PoolResetState
from sqlalchemy.util import await_only, greenlet_spawn

from bridge.core.leases import LeaseHolder
from bridge.db.leases import fence_steps
from bridge.db.steps import Statements, Step, Steps, T, drive, drive_sync


def driver_kind(engine: AsyncEngine) -> str | None:
    """ "sqlite" (aiosqlite, a file) or "asyncpg" when the driver can be driven directly."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.get_driver_name() == "aiosqlite":
        return None if url.database in (None, "", ":memory:") else "sqlite"
    if url.get_backend_name() == "postgresql" and url.get_driver_name() == "asyncpg":
        return "asyncpg"
    return None


class Direct:
    """Runs described write transactions through the driver (see the module's docstring)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._kind = driver_kind(engine)
        self._statements = Statements(engine.dialect)
        self.commits = 0  # transactions committed here (SQLAlchemy's events do not see them)

    @property
    def usable(self) -> bool:
        return self._kind is not None

    async def run(self, work: Callable[[str], Steps[T]], holder: LeaseHolder | None) -> T:
        """Run `work(dialect)` in one transaction, after the fencing check of `holder`."""
        result: T = await greenlet_spawn(self._checked_out, work, holder)
        self.commits += 1
        return result

    def _checked_out(self, work: Callable[[str], Steps[T]], holder: LeaseHolder | None) -> T:
        """In a greenlet: check a connection out of the pool, run the transaction, return it
        (awaiting the driver through `await_only`)."""
        dialect = self._engine.dialect.name
        connection = self._engine.sync_engine.raw_connection()
        try:
            driver: Any = connection.driver_connection
            if self._kind == "sqlite":
                in_thread = getattr(driver, "_execute", None)
                database = getattr(driver, "_conn", None)
                if in_thread is None or not isinstance(database, sqlite3.Connection):
                    raise RuntimeError("this aiosqlite cannot run a function in its thread")
                result: T = await_only(in_thread(self._sqlite, database, work, dialect, holder))
            else:
                result = await_only(self._asyncpg_transaction(driver, work, dialect, holder))
            return result
        finally:
            connection.close()

    async def _asyncpg_transaction(
        self,
        driver: Any,
        work: Callable[[str], Steps[T]],
        dialect: str,
        holder: LeaseHolder | None,
    ) -> T:
        async with driver.transaction():
            if holder is not None:
                await self._asyncpg(driver, fence_steps(dialect, holder))
            return await self._asyncpg(driver, work(dialect))

    def _sqlite(
        self,
        connection: sqlite3.Connection,
        work: Callable[[str], Steps[T]],
        dialect: str,
        holder: LeaseHolder | None,
    ) -> T:
        """In aiosqlite's thread: the whole transaction, committed, or rolled back."""
        if connection.in_transaction:  # never the case after a checkout; never kept
            connection.rollback()
        connection.execute("BEGIN IMMEDIATE")
        try:
            if holder is not None:
                self._sqlite_steps(connection, fence_steps(dialect, holder))
            result = self._sqlite_steps(connection, work(dialect))
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        return result

    def _sqlite_steps(self, connection: sqlite3.Connection, steps: Steps[T]) -> T:
        def execute(step: Step) -> Any:
            cursor = connection.execute(*self._compiled(step))
            if step.returns == "row":
                rows = cursor.fetchall()  # to the end: the statement is then complete
                return tuple(rows[0]) if rows else None
            return cursor.rowcount

        return drive_sync(steps, execute)

    async def _asyncpg(self, driver: Any, steps: Steps[T]) -> T:
        async def execute(step: Step) -> Any:
            sql, values = self._compiled(step)
            if step.returns == "row":
                row = await driver.fetchrow(sql, *values)
                return None if row is None else tuple(row)
            status: str = await driver.execute(sql, *values)  # "UPDATE 1"
            return int(status.rsplit(" ", 1)[-1])

        return await drive(steps, execute)

    def _compiled(self, step: Step) -> tuple[str, tuple[Any, ...]]:
        compiled = self._statements.get(step.name, step.build)
        return compiled.sql, compiled.values(step.params)


def skip_idle_reset(engine: AsyncEngine) -> None:
    """Roll an aiosqlite connection back on its return to the pool only when a transaction is
    open, instead of always (a trip to its thread each time). The engine must be made with
    `pool_reset_on_return=None`; SQLAlchemy's own transactions are ended before their
    connection returns (`transaction_was_reset`), and so are the driver path's."""

    @event.listens_for(engine.sync_engine, "reset")
    def _reset(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
        if state.terminate_only or not state.asyncio_safe or state.transaction_was_reset:
            return
        try:
            open_ = bool(record.driver_connection.in_transaction)
        except Exception:  # closed, or not an aiosqlite connection: roll back as by default
            open_ = True
        if open_:
            dbapi_connection.rollback()


_FRESH = "passerelle.fresh"


def ping_on_checkout(engine: AsyncEngine) -> None:
    """Check an asyncpg connection on its way out of the pool with one round trip (a simple
    query, unprepared, which a pgbouncer in transaction mode passes too), instead of
    `pool_pre_ping`, whose asyncpg ping takes three (BEGIN, a prepared query, ROLLBACK): a
    fifth of each driver-path write's time in a profile of mail out. A connection that does
    not answer (a restarted server) is replaced before the transaction starts: the pool gets
    a new one."""

    @event.listens_for(engine.sync_engine, "connect")
    def _fresh(dbapi_connection: Any, record: Any) -> None:
        record.info[_FRESH] = True

    @event.listens_for(engine.sync_engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.pop(_FRESH, False):  # just opened: nothing to check
            return
        try:
            await_only(dbapi_connection.driver_connection.execute("SELECT 1"))
        except Exception as e:
            raise DisconnectionError(f"connection lost: {type(e).__name__}") from e
