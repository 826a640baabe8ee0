"""Links: which room is bound to which remote, with what settings."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, bindparam, delete, func, select, update

from bridge.core.ids import RoomID, UserID
from bridge.core.links import Link, LinkSettings
from bridge.db.engine import Database
from bridge.db.schema import link, room
from bridge.db.util import insert_ignore, now_ms


@functools.lru_cache(maxsize=1024)
def _settings(settings_json: str) -> tuple[LinkSettings, str]:
    """A link's settings and source, read once per distinct text (links made alike share it;
    LinkSettings is immutable): reading 10,000 links is done several times at start-up."""
    settings = json.loads(settings_json)
    return LinkSettings.from_json(settings), str(settings.get("source", "bot"))


def _link(row: Row[Any]) -> Link:
    settings, source = _settings(row.settings_json)
    return Link(
        id=int(row.id),
        name=row.name,
        room_id=RoomID(row.room_id),
        kind=row.kind,
        remote=row.remote,
        settings=settings,
        paused=bool(row.paused),
        source=source,
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
    await save_links(db, [LinkWrite(room_id, kind, remote, settings, source, created_by)])
    found = await link_by_remote(db, kind, remote)
    assert found is not None
    return found


@dataclass(frozen=True)
class LinkWrite:
    """One link to create, or to update (room and settings) if its remote is linked."""

    room_id: RoomID
    kind: str
    remote: str
    settings: LinkSettings
    source: str
    created_by: UserID | None = None


async def save_links(db: Database, writes: Sequence[LinkWrite], chunk: int = 500) -> None:
    """`save_link` for many links, `chunk` to a transaction: thousands of links in a config
    took one transaction each (5,000: 50 s of CPU at the first start)."""
    for start in range(0, len(writes), chunk):
        part = writes[start : start + chunk]
        stamp = now_ms()
        async with db.begin() as conn:
            await conn.execute(
                insert_ignore(conn, room, ["room_id"]).values(
                    [
                        {"room_id": r, "bot_membership": "unknown", "updated_at": stamp}
                        for r in dict.fromkeys(w.room_id for w in part)
                    ]
                )
            )
            existing: dict[tuple[str, str], int] = {}
            for kind in {w.kind for w in part}:
                remotes = [w.remote for w in part if w.kind == kind]
                rows = await conn.execute(
                    select(link.c.id, link.c.remote).where(
                        link.c.kind == kind, link.c.remote.in_(remotes)
                    )
                )
                existing.update({(kind, row.remote): int(row.id) for row in rows})
            new = [w for w in part if (w.kind, w.remote) not in existing]
            if new:
                await conn.execute(
                    link.insert(),
                    [
                        {
                            "name": f"{w.kind}:{w.remote}",
                            "room_id": w.room_id,
                            "kind": w.kind,
                            "remote": w.remote,
                            "settings_json": _settings_text(w),
                            "created_by": w.created_by,
                            "created_at": stamp,
                        }
                        for w in new
                    ],
                )
            changed = [w for w in part if (w.kind, w.remote) in existing]
            if changed:
                await conn.execute(
                    update(link)
                    .where(link.c.id == bindparam("b_id"))
                    .values(
                        room_id=bindparam("b_room"),
                        settings_json=bindparam("b_settings"),
                        paused=False,
                    ),
                    [
                        {
                            "b_id": existing[(w.kind, w.remote)],
                            "b_room": w.room_id,
                            "b_settings": _settings_text(w),
                        }
                        for w in changed
                    ],
                )


def _settings_text(write: LinkWrite) -> str:
    return json.dumps(write.settings.as_json() | {"source": write.source})


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
