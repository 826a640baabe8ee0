"""Ghost users: one Matrix user per remote identity."""

from __future__ import annotations

from sqlalchemy import select

from bridge.core.ids import UserID
from bridge.db.engine import Database
from bridge.db.schema import ghost


async def ghost_exists(db: Database, mxid: UserID) -> bool:
    async with db.begin() as conn:
        row = (await conn.execute(select(ghost.c.mxid).where(ghost.c.mxid == mxid))).first()
    return row is not None
