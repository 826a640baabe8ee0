"""Small helpers shared by the query modules."""

from __future__ import annotations

import functools
import time
from typing import Any

from sqlalchemy import Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert


def now_ms() -> int:
    return int(time.time() * 1000)


def insert_ignore(conn: AsyncConnection, table: Table, index: list[str]) -> Insert:
    """INSERT … ON CONFLICT (index) DO NOTHING, for the connection's dialect."""
    return insert_ignore_for(conn.dialect.name, table, index)


def insert_ignore_for(dialect: str, table: Table, index: list[str]) -> Insert:
    """`insert_ignore` for a dialect named (for statements built once, see bound_insert)."""
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


@functools.cache
def bound_insert_ignore(
    dialect: str, table: Table, index: tuple[str, ...], columns: tuple[str, ...]
) -> Insert:
    """INSERT … ON CONFLICT (index) DO NOTHING of `columns`, each bound to the parameter of
    its name, built once per dialect: executed with a dict of values, it costs no statement
    construction per row (`.values(**row)` was a third of the CPU of queueing a mail)."""
    return insert_ignore_for(dialect, table, list(index)).values(
        {name: bindparam(name) for name in columns}
    )


@functools.cache
def bound_update(
    table: Table, key: str, columns: tuple[str, ...], *, with_state: bool = False
) -> Any:
    """UPDATE table SET each of `columns` = :v_<column> WHERE key = :b_key [AND state =
    :b_state], built once per set of columns (see bound_insert_ignore)."""
    condition = table.c[key] == bindparam("b_key")
    if with_state:
        condition = condition & (table.c.state == bindparam("b_state"))
    return update(table).where(condition).values({c: bindparam(f"v_{c}") for c in columns})
