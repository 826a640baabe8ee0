"""Rooms the management bot is in or was invited to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select, update

from bridge.core.ids import RoomID, UserID
from bridge.db.engine import Database
from bridge.db.schema import room
from bridge.db.util import now_ms, upsert


@dataclass(frozen=True)
class Room:
    room_id: RoomID
    is_direct: bool
    bot_membership: str
    encrypted: bool
    member_count: int
    invited_by: UserID | None

    @property
    def is_direct_chat(self) -> bool:
        """Only the bot and one person: commands need no prefix here."""
        return self.member_count <= 2


async def get_room(db: Database, room_id: RoomID) -> Room | None:
    async with db.begin() as conn:
        row = (await conn.execute(select(room).where(room.c.room_id == room_id))).first()
    if row is None:
        return None
    return _room(row)


async def all_rooms(db: Database) -> dict[RoomID, Room]:
    """Every room, by ID, in one query (start-up looks at thousands of linked rooms)."""
    async with db.begin() as conn:
        rows = (await conn.execute(select(room))).all()
    return {RoomID(row.room_id): _room(row) for row in rows}


def _room(row: Row[Any]) -> Room:
    return Room(
        room_id=RoomID(row.room_id),
        is_direct=bool(row.is_direct),
        bot_membership=row.bot_membership,
        encrypted=bool(row.encrypted),
        member_count=int(row.member_count),
        invited_by=UserID(row.invited_by) if row.invited_by else None,
    )


async def save_room(
    db: Database,
    room_id: RoomID,
    *,
    bot_membership: str,
    is_direct: bool,
    encrypted: bool,
    invited_by: UserID | None,
    member_count: int = 0,
) -> None:
    values = {
        "member_count": member_count,
        "room_id": room_id,
        "bot_membership": bot_membership,
        "is_direct": is_direct,
        "encrypted": encrypted,
        "invited_by": invited_by,
        "updated_at": now_ms(),
    }
    async with db.begin() as conn:
        await conn.execute(upsert(conn, room, ["room_id"], values))


async def set_membership(db: Database, room_id: RoomID, membership: str) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(room)
            .where(room.c.room_id == room_id)
            .values(bot_membership=membership, updated_at=now_ms())
        )


async def set_encrypted(db: Database, room_id: RoomID) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(room)
            .where(room.c.room_id == room_id)
            .values(encrypted=True, updated_at=now_ms())
        )


async def set_member_count(db: Database, room_id: RoomID, count: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(room)
            .where(room.c.room_id == room_id)
            .values(member_count=count, updated_at=now_ms())
        )


async def joined_rooms(db: Database) -> list[RoomID]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(select(room.c.room_id).where(room.c.bot_membership == "join"))
        ).scalars()
        return [RoomID(r) for r in rows]
