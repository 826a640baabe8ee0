"""The /sync side's view of the database: one remote's position and its stored events."""

from __future__ import annotations

from bridge.db import remote as remote_db
from bridge.db.engine import Database


class DbSyncStore:
    """Implements the syncer's SyncStore for one remote."""

    def __init__(self, db: Database, remote: str) -> None:
        self.db = db
        self.remote = remote

    async def position(self) -> str | None:
        return await remote_db.sync_position(self.db, self.remote)

    async def store(self, events: list[tuple[str, str, str]], next_batch: str) -> int:
        return await remote_db.store_batch(self.db, self.remote, events, next_batch)

    async def known(self, event_ids: list[str]) -> set[str]:
        return await remote_db.known_events(self.db, self.remote, event_ids)
