"""Point reads by key (the mapping lookups of every relayed message) on a connection of their
own, straight through the driver.

Through SQLAlchemy's asyncio layer a lookup of one row by its key cost 0.5–0.6 ms of CPU
(pool checkout, greenlet hops, BEGIN/COMMIT, reset on return), a hundred times the driver's own
0.006 ms, and its tail grew with the machine's load. Here each statement is compiled once for
the dialect, then every read is one driver call under a lock: aiosqlite's `execute_fetchall`
on a second SQLite connection (WAL lets it read beside the writer), or asyncpg's `fetchrow`.

Only for reads whose parameters and result columns are plain integers and strings (no type
processing happens). Reads are not fenced by leases: fencing is about what a unit commits.
If the connection fails (a restarted PostgreSQL, say), the read goes through the ordinary
path instead and the connection is opened again at the next read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Select, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bridge.db.direct import driver_kind
from bridge.db.steps import Statements

log = logging.getLogger("passerelle.db")

# After a failed read, lookups take the ordinary path this long before a new connection is
# tried (a database refusing one more connection is not asked again at every lookup).
RETRY_AFTER = 30


class _Failed(Exception):
    """The driver failed a read (its error is the cause)."""


class Reader:
    """One connection for point reads; `one()` falls back to the engine if it cannot be used."""

    def __init__(self, engine: AsyncEngine, pragmas: Callable[[Any, Any], None] | None) -> None:
        self._engine = engine
        self._pragmas = pragmas
        # In memory, a second connection would see another, empty database: no driver path.
        self._kind = driver_kind(engine)
        self._own: AsyncEngine | None = None
        self._conn: AsyncConnection | None = None
        self._driver: Any = None
        self._lock = asyncio.Lock()
        self._statements = Statements(engine.dialect)
        self._columns: dict[str, tuple[str, ...]] = {}
        self._closed = False
        self._retry_at = 0.0

    async def one(
        self, name: str, build: Callable[[], Select[Any]], params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """The first row of the statement `build()` makes (compiled once under `name`), with
        bind values `params`, as a mapping of column name to value; None if no row."""
        if self._kind is not None and not self._closed and time.monotonic() >= self._retry_at:
            try:
                return await self._driver_read(name, build, params)
            except _Failed as e:  # the connection was dropped; the ordinary way for a while
                self._retry_at = time.monotonic() + RETRY_AFTER
                log.warning(
                    "lookup connection failed (%s); lookups take the ordinary way for %d s",
                    e.__cause__,
                    RETRY_AFTER,
                )
        async with self._engine.connect() as conn:
            row = (await conn.execute(build(), dict(params))).first()
        return None if row is None else dict(row._mapping)

    async def _driver_read(
        self, name: str, build: Callable[[], Select[Any]], params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        compiled = self._statements.get(name, build)
        columns = self._columns.get(name)
        if columns is None:
            columns = self._columns[name] = tuple(str(c.key) for c in build().selected_columns)
        values = compiled.values(params)
        async with self._lock:
            try:
                driver = self._driver or await self._open()
                if self._kind == "sqlite":
                    rows = await driver.execute_fetchall(compiled.sql, values)
                    row = rows[0] if rows else None
                else:
                    row = await driver.fetchrow(compiled.sql, *values)
            except BaseException as e:
                # Failed or cut in the middle (cancelled): the connection may be left busy or
                # broken, so it is not used again; the next read opens another.
                await self._drop()
                if isinstance(e, Exception):
                    raise _Failed from e
                raise
        return None if row is None else dict(zip(columns, tuple(row), strict=True))

    async def _open(self) -> Any:
        own = self._own
        if own is None:
            own = self._own = create_async_engine(self._engine.url, pool_size=1, max_overflow=0)
            if self._pragmas is not None:
                event.listen(own.sync_engine, "connect", self._pragmas)
        self._conn = await own.connect()
        raw = await self._conn.get_raw_connection()
        self._driver = raw.driver_connection
        return self._driver

    async def _drop(self) -> None:
        conn, self._conn, self._driver = self._conn, None, None
        if conn is not None:
            try:
                await conn.invalidate()
                await conn.close()
            except Exception:  # already broken: nothing more to give back
                log.debug("closing the broken lookup connection failed", exc_info=True)

    async def close(self) -> None:
        self._closed = True
        async with self._lock:
            await self._drop()
            if self._own is not None:
                await self._own.dispose()
                self._own = None
