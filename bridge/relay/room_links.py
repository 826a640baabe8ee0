"""The links of each room, of one kind, read once: every message of a linked room needs them.
Dropped whenever links change (link, unlink, a waiting link resumed, a link paused)."""

from __future__ import annotations

from bridge.core.ids import RoomID
from bridge.core.links import Link
from bridge.db import links as link_db
from bridge.db.engine import Database


class RoomLinks:
    def __init__(self, db: Database, kind: str) -> None:
        self.db = db
        self.kind = kind
        self._links: dict[RoomID, list[Link]] = {}

    def changed(self) -> None:
        self._links.clear()

    async def of(self, room_id: RoomID) -> list[Link]:
        """The room's links of this kind, paused ones included."""
        links = self._links.get(room_id)
        if links is None:
            links = [
                link
                for link in await link_db.links_in_room(self.db, room_id)
                if link.kind == self.kind
            ]
            self._links[room_id] = links
        return links
