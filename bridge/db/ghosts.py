"""Ghost users: one Matrix user per remote identity."""

from __future__ import annotations

from sqlalchemy import select

from bridge.core.ids import UserID
from bridge.db.engine import Database
from bridge.db.schema import ghost
from bridge.db.util import now_ms, upsert


async def ghost_exists(db: Database, mxid: UserID) -> bool:
    async with db.begin() as conn:
        row = (await conn.execute(select(ghost.c.mxid).where(ghost.c.mxid == mxid))).first()
    return row is not None


async def get_display_name(db: Database, mxid: UserID) -> str | None:
    async with db.begin() as conn:
        row = (
            await conn.execute(select(ghost.c.display_name).where(ghost.c.mxid == mxid))
        ).first()
    return None if row is None else row.display_name


async def save_ghost(
    db: Database, mxid: UserID, *, kind: str, remote_id: str, display_name: str
) -> None:
    values = {
        "mxid": mxid,
        "remote_kind": kind,
        "remote_id": remote_id,
        "display_name": display_name,
        "registered": True,
        "created_at": now_ms(),
    }
    async with db.begin() as conn:
        await conn.execute(upsert(conn, ghost, ["mxid"], values))
