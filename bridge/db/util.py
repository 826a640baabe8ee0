"""Small helpers shared by the query modules."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert


def now_ms() -> int:
    return int(time.time() * 1000)


def insert_ignore(conn: AsyncConnection, table: Table, index: list[str]) -> Insert:
    """INSERT … ON CONFLICT (index) DO NOTHING, for the connection's dialect."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=index)
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=index)
    raise NotImplementedError(f"unsupported database dialect {dialect}")


def upsert(
    conn: AsyncConnection, table: Table, index: list[str], values: dict[str, Any]
) -> Insert:
    """INSERT … ON CONFLICT (index) DO UPDATE with the non-key values."""
    update = {k: v for k, v in values.items() if k not in index}
    dialect = conn.dialect.name
    if dialect == "postgresql":
        pg = postgresql.insert(table).values(**values)
        return pg.on_conflict_do_update(index_elements=index, set_=update)
    if dialect == "sqlite":
        lite = sqlite.insert(table).values(**values)
        return lite.on_conflict_do_update(index_elements=index, set_=update)
    raise NotImplementedError(f"unsupported database dialect {dialect}")
