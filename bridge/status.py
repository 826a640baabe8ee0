"""The bridge's state in one report, shared by GET /health and the bot's `status` command."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bridge import __version__
from bridge.core.health import ComponentHealth
from bridge.db import inbox
from bridge.db.engine import Database

log = logging.getLogger("passerelle.status")


class StatusReporter:
    def __init__(self, db: Database, homeserver: ComponentHealth) -> None:
        self.db = db
        self.homeserver = homeserver
        # Other sections of the report, by name (the mail side adds "mailboxes").
        self.extra: dict[str, Callable[[], dict[str, Any]]] = {}
        # Sections that read the database (the outbox); left out when the database fails.
        self.db_extra: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}

    async def report(self) -> dict[str, Any]:
        database: dict[str, Any] = {"dialect": self.db.dialect, "ok": True, "error": None}
        queue: dict[str, int] = {}
        sections: dict[str, Any] = {}
        try:
            await self.db.ping()
            queue = await inbox.counts(self.db)
            for name, source in self.db_extra.items():
                sections[name] = await source()
        except Exception as e:
            log.warning("database check failed: %s", e)
            database.update(ok=False, error=str(e).splitlines()[0][:200] if str(e) else repr(e))
        if not database["ok"]:
            status = "failing"
        elif not self.homeserver.reachable:
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "version": __version__,
            "database": database,
            "homeserver": self.homeserver.as_dict(),
            "queue": queue,
            **{name: source() for name, source in self.extra.items()},
            **sections,
        }
