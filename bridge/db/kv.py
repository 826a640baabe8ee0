"""Key-value bridge state."""

from __future__ import annotations

from sqlalchemy import select

from bridge.db.engine import Database
from bridge.db.schema import kv
from bridge.db.util import upsert


async def get_value(db: Database, key: str) -> str | None:
    async with db.begin() as conn:
        value = (await conn.execute(select(kv.c.value).where(kv.c.key == key))).scalar()
    return None if value is None else str(value)


async def set_value(db: Database, key: str, value: str) -> None:
    async with db.begin() as conn:
        await conn.execute(upsert(conn, kv, ["key"], {"key": key, "value": value}))
