"""Links: which room is bound to which remote, with what settings."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Row, delete, func, select, update

from bridge.core.ids import RoomID, UserID
from bridge.core.links import Link, LinkSettings
from bridge.db.engine import Database
from bridge.db.schema import link, room
from bridge.db.util import insert_ignore, now_ms


def _link(row: Row[Any]) -> Link:
    settings = json.loads(row.settings_json)
    return Link(
        id=int(row.id),
        name=row.name,
        room_id=RoomID(row.room_id),
        kind=row.kind,
        remote=row.remote,
        settings=LinkSettings.from_json(settings),
        paused=bool(row.paused),
        source=str(settings.get("source", "bot")),
        created_by=UserID(row.created_by) if row.created_by else None,
    )


async def all_links(db: Database) -> list[Link]:
    async with db.begin() as conn:
        rows = (await conn.execute(select(link).order_by(link.c.id))).all()
    return [_link(r) for r in rows]


async def links_in_room(db: Database, room_id: RoomID) -> list[Link]:
    async with db.begin() as conn:
        rows = (await conn.execute(select(link).where(link.c.room_id == room_id))).all()
    return [_link(r) for r in rows]


async def link_by_remote(db: Database, kind: str, remote: str) -> Link | None:
    async with db.begin() as conn:
        row = (
            await conn.execute(select(link).where(link.c.kind == kind, link.c.remote == remote))
        ).first()
    return None if row is None else _link(row)


async def save_link(
    db: Database,
    *,
    room_id: RoomID,
    kind: str,
    remote: str,
    settings: LinkSettings,
    source: str,
    created_by: UserID | None,
) -> Link:
    """Create the link, or update the room and settings of the existing one for this remote."""
    data = json.dumps(settings.as_json() | {"source": source})
    async with db.begin() as conn:
        await conn.execute(
            insert_ignore(conn, room, ["room_id"]).values(
                room_id=room_id, bot_membership="unknown", updated_at=now_ms()
            )
        )
        existing = (
            await conn.execute(
                select(link.c.id).where(link.c.kind == kind, link.c.remote == remote)
            )
        ).scalar()
        if existing is None:
            await conn.execute(
                link.insert().values(
                    name=f"{kind}:{remote}",
                    room_id=room_id,
                    kind=kind,
                    remote=remote,
                    settings_json=data,
                    created_by=created_by,
                    created_at=now_ms(),
                )
            )
        else:
            await conn.execute(
                update(link)
                .where(link.c.id == existing)
                .values(room_id=room_id, settings_json=data, paused=False)
            )
    found = await link_by_remote(db, kind, remote)
    assert found is not None
    return found


async def delete_link(db: Database, link_id: int) -> int:
    """Remove a link and its records; the room keeps its messages. Messages from Matrix not
    sent yet are dropped with it (they would go to a list or remote room the room is no
    longer linked to): returns how many."""
    from bridge.db.schema import (
        mail_backfill,
        mail_outbox,
        mail_raw,
        message_map,
        remote_event_map,
        remote_outbox,
        sender_notice,
    )

    async with db.begin() as conn:
        unsent = 0
        for outbox in (mail_outbox, remote_outbox):
            unsent += (
                await conn.execute(
                    select(func.count())
                    .select_from(outbox)
                    .where(outbox.c.link_id == link_id, outbox.c.state == "pending")
                )
            ).scalar_one()
        tables = (
            mail_backfill,
            sender_notice,
            message_map,
            mail_raw,
            mail_outbox,
            remote_event_map,
            remote_outbox,
        )
        for table in tables:
            await conn.execute(delete(table).where(table.c.link_id == link_id))
        await conn.execute(delete(link).where(link.c.id == link_id))
    return int(unsent)


async def set_paused(db: Database, link_id: int, paused: bool) -> None:
    async with db.begin() as conn:
        await conn.execute(update(link).where(link.c.id == link_id).values(paused=paused))
