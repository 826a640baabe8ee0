"""Reading rooms back after a homeserver outage, for events it never pushed to us."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mautrix.api import Method, Path

from bridge.core.ids import RoomID
from bridge.db import inbox, rooms
from bridge.db.engine import Database
from bridge.matrix.appservice import is_own_echo, validate_event
from bridge.matrix.client import MatrixClient

log = logging.getLogger("passerelle.matrix.catchup")

PAGE = 50
MAX_PAGES = 4
CONCURRENCY = 4


class CatchUp:
    """Finds events a homeserver accepted but never pushed (it can drop its in-memory queue
    when it is killed), so the bridge handles them anyway.

    Only the tail of each room is read: events newer than the newest one already stored for
    that room. Anything older was either handled or predates the bridge, and is left alone.
    """

    def __init__(self, db: Database, client: MatrixClient) -> None:
        self.db = db
        self.client = client

    async def run(self) -> int:
        room_ids = await rooms.joined_rooms(self.db)
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one(room_id: RoomID) -> int:
            async with limit:
                return await self._room(room_id)

        found = sum(await asyncio.gather(*(one(r) for r in room_ids)))
        if found:
            log.info("caught up %d events the homeserver had not pushed", found)
        return found

    async def _room(self, room_id: RoomID) -> int:
        since = await inbox.latest_origin_ts(self.db, room_id)
        if since is None:
            return 0
        newer: list[dict[str, Any]] = []
        token: str | None = None
        for _ in range(MAX_PAGES):
            query = {"dir": "b", "limit": str(PAGE)}
            if token:
                query["from"] = token
            page = await self.client.request(
                Method.GET, Path.v3.rooms[room_id].messages, query=query
            )
            chunk = page.get("chunk")
            if not isinstance(chunk, list) or not chunk:
                break
            reached_known = False
            for event in chunk:
                ts = event.get("origin_server_ts") if isinstance(event, dict) else None
                if isinstance(ts, int) and ts > since:
                    newer.append(event)
                else:
                    reached_known = True
            end = page.get("end")
            if reached_known or not isinstance(end, str):
                break
            token = end
        valid = []
        for event in reversed(newer):  # oldest first, as they happened
            event.setdefault("room_id", room_id)
            checked = validate_event(event)
            if not isinstance(checked, inbox.Rejected) and not is_own_echo(
                self.client.config, event
            ):
                valid.append(checked)
        return await inbox.store_caught_up(self.db, valid) if valid else 0
