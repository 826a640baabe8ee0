"""Opening the database: engine, durable SQLite settings, safety checks and migrations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Select, event, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bridge.config import DatabaseConfig
from bridge.core.audit import AuditEntry
from bridge.core.leases import LeaseHolder
from bridge.db import leases as lease_db
from bridge.db.direct import Direct, ping_on_checkout, skip_idle_reset
from bridge.db.reader import Reader
from bridge.db.steps import Steps, T, run_steps
from bridge.logsetup import mask_driver_logs

log = logging.getLogger("passerelle.db")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Key in a connection's info: the audit entries appended in its current transaction.
AUDITED = "passerelle.audited"
# Tables only a Synapse database has: pointing the bridge at one would be a serious mistake.
SYNAPSE_TABLES = {"event_json", "room_memberships", "e2e_room_keys"}
# The lease the running task works under (set by the lease keeper for a unit's tasks): every
# transaction it opens checks the lease first (fencing), and fails with LeaseLost if another
# instance took it. Unset (single instance, HTTP handlers): no check.
FENCE: ContextVar[LeaseHolder | None] = ContextVar("passerelle_fence", default=None)


class DatabaseError(Exception):
    """The database cannot be used: unreachable, foreign, or newer than this code."""


def _alembic_config(connection: Connection) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL with synchronous=FULL: a committed transaction survives power loss.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


class Database:
    """The bridge's mapping database; every query module takes one of these."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Lookups by key, on a connection of their own (see reader.py).
        self.reader = Reader(engine, _sqlite_pragmas if engine.dialect.name == "sqlite" else None)
        # The hot paths' write transactions, straight through the driver (see direct.py).
        self.direct = Direct(engine)
        # Told of every audit entry once the transaction that stored it has committed (the
        # metrics count there: nothing rolled back, no duplicate, and no metrics in SQL code).
        self.audit_observers: list[Callable[[AuditEntry], None]] = []

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection inside one transaction, committed on success."""
        audited: list[AuditEntry] = []
        holder = FENCE.get()
        async with self.engine.begin() as conn:
            if holder is not None:
                await lease_db.check(conn, holder)
            conn.info[AUDITED] = audited
            yield conn
            # Not in a `finally`: after a failure or a cancellation the connection may be
            # invalidated, and reading its info would raise instead of rolling back. A list
            # left behind is replaced by the next transaction on that connection.
            conn.info.pop(AUDITED, None)
        self.tell_audited(audited)

    def tell_audited(self, entries: list[AuditEntry]) -> None:
        """Tell the audit observers of entries whose transaction has committed."""
        for entry in entries:
            for observer in self.audit_observers:
                try:
                    observer(entry)
                except Exception:
                    log.exception("audit observer failed")

    async def write(self, work: Callable[[str], Steps[T]]) -> T:
        """Run the transaction `work(dialect)` describes (steps.py), fenced as `begin`'s:
        straight through the driver where it can be, else through SQLAlchemy."""
        if self.direct.usable:
            return await self.direct.run(work, FENCE.get())
        async with self.begin() as conn:
            return await run_steps(conn, work(conn.dialect.name))

    async def write_audited(self, work: Callable[[str, list[AuditEntry]], Steps[T]]) -> T:
        """`write` for a transaction that appends audit entries (`audit.append_all_steps`):
        `work(dialect, audited)` adds each to `audited`, and they are told to the audit
        observers once the transaction has committed, as `begin` does."""
        audited: list[AuditEntry] = []
        result = await self.write(lambda dialect: work(dialect, audited))
        self.tell_audited(audited)
        return result

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def read_one(
        self, name: str, build: Callable[[], Select[Any]], params: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        """A point read by key through `reader` (plain ints and strings only)."""
        return await self.reader.one(name, build, params)

    async def close(self) -> None:
        await self.reader.close()
        await self.engine.dispose()


def create_engine(config: DatabaseConfig) -> AsyncEngine:
    # Stored webhook secrets are statement parameters, which aiosqlite logs at DEBUG.
    mask_driver_logs()
    if config.url.startswith("sqlite"):
        # One connection: SQLite has one writer at a time anyway, and several connections
        # would wait for each other's lock in busy-handler sleeps (measured: half their time
        # with ten rooms). Queued in-process instead, every transaction goes straight through.
        engine = create_async_engine(
            config.url, pool_size=1, max_overflow=0, pool_timeout=300, pool_reset_on_return=None
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        skip_idle_reset(engine)
        return engine
    engine = create_async_engine(config.url, pool_size=config.pool_size, pool_recycle=1800)
    ping_on_checkout(engine)
    return engine


def _check_and_upgrade(connection: Connection) -> str | None:
    tables = set(inspect(connection).get_table_names())
    synapse = tables & SYNAPSE_TABLES
    if synapse:
        raise DatabaseError(
            "this database holds Synapse's tables "
            f"({', '.join(sorted(synapse))}); give Passerelle a database of its own"
        )
    cfg = _alembic_config(connection)
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    if "alembic_version" in tables:
        current = connection.execute(text("SELECT version_num FROM alembic_version")).scalars()
        for revision in current:
            try:
                script.get_revision(revision)
            except Exception:
                raise DatabaseError(
                    f"the database schema is at revision {revision}, newer than this Passerelle "
                    f"(which knows up to {head}); upgrade Passerelle or restore a backup"
                ) from None
    elif tables:
        known = tables & {"inbox_event", "appservice_txn"}
        if not known:
            raise DatabaseError(
                f"the database already holds tables that are not Passerelle's "
                f"({', '.join(sorted(tables)[:5])}); give Passerelle a database of its own"
            )
    command.upgrade(cfg, "head")
    return head


def _check_sqlite_folder(url: str) -> None:
    if url.startswith("sqlite"):
        parent = Path(url.split(":///", 1)[1]).expanduser().resolve().parent
        if not parent.is_dir():
            raise DatabaseError(f"the SQLite file's folder {parent} does not exist")


async def open_database(config: DatabaseConfig) -> Database:
    """Connect, refuse foreign or newer schemas, run pending migrations."""
    _check_sqlite_folder(config.url)
    engine = create_engine(config)
    try:
        async with engine.begin() as conn:
            head = await conn.run_sync(_check_and_upgrade)
    except DatabaseError:
        await engine.dispose()
        raise
    except (SQLAlchemyError, OSError) as e:
        await engine.dispose()
        raise DatabaseError(f"cannot open the database: {_one_line(e)}") from e
    log.info("database ready (%s, schema revision %s)", engine.dialect.name, head)
    return Database(engine)


def _check_sqlite_file(url: str) -> None:
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1]).expanduser()
        if not path.is_file():
            raise DatabaseError(f"the SQLite file {path} does not exist")


async def open_existing(config: DatabaseConfig) -> Database:
    """Connect to the bridge's database as it is, to read (admin tools): nothing is created
    or migrated; DatabaseError if it does not exist or cannot be reached."""
    _check_sqlite_file(config.url)
    engine = create_engine(config)
    try:
        await Database(engine).ping()
    except (SQLAlchemyError, OSError) as e:
        await engine.dispose()
        raise DatabaseError(f"cannot open the database: {_one_line(e)}") from e
    return Database(engine)


def _one_line(error: BaseException) -> str:
    text_ = str(getattr(error, "orig", None) or error)
    return text_.strip().splitlines()[0] if text_.strip() else type(error).__name__
