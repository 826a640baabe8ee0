"""Webhooks made in a room with the bot's `webhook` commands (inbound, or outbound with a URL):
their secrets and makers."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from bridge.db.engine import Database
from bridge.db.schema import webhook_room_hook
from bridge.db.util import now_ms


@dataclass(frozen=True)
class RoomHook:
    name: str
    room_id: str
    secret: str = field(repr=False)
    previous_secret: str | None = field(repr=False)
    previous_expires_at: int | None  # ms since the epoch
    created_by: str
    created_at: int
    url: str | None = None  # outbound: where the room's messages are POSTed

    @property
    def outbound(self) -> bool:
        return self.url is not None


async def all_hooks(db: Database) -> list[RoomHook]:
    async with db.begin() as conn:
        rows = (
            await conn.execute(select(webhook_room_hook).order_by(webhook_room_hook.c.name))
        ).all()
    return [
        RoomHook(
            name=r.name,
            room_id=r.room_id,
            secret=r.secret,
            previous_secret=r.previous_secret,
            previous_expires_at=None
            if r.previous_expires_at is None
            else int(r.previous_expires_at),
            created_by=r.created_by,
            created_at=int(r.created_at),
            url=r.url,
        )
        for r in rows
    ]


async def create(
    db: Database, name: str, room_id: str, secret: str, created_by: str, *, url: str | None = None
) -> RoomHook | None:
    """The new hook (outbound when `url` is given), or None when a room hook already has that
    name."""
    hook = RoomHook(name, room_id, secret, None, None, created_by, now_ms(), url)
    try:
        async with db.begin() as conn:
            await conn.execute(
                insert(webhook_room_hook).values(
                    name=name,
                    room_id=room_id,
                    secret=secret,
                    created_by=created_by,
                    created_at=hook.created_at,
                    url=url,
                )
            )
    except IntegrityError:
        return None
    return hook


async def rotate(db: Database, name: str, secret: str, previous: str, expires_at: int) -> None:
    async with db.begin() as conn:
        await conn.execute(
            update(webhook_room_hook)
            .where(webhook_room_hook.c.name == name)
            .values(secret=secret, previous_secret=previous, previous_expires_at=expires_at)
        )


async def remove(db: Database, name: str) -> None:
    async with db.begin() as conn:
        await conn.execute(delete(webhook_room_hook).where(webhook_room_hook.c.name == name))
