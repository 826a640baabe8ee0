"""What the bridge knows about its own state, shown by /health and the bot's `status`."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class ComponentHealth:
    """Reachability of one dependency (homeserver, later IMAP and SMTP)."""

    name: str
    reachable: bool = False
    checked_at: float | None = None
    last_ok_at: float | None = None
    last_error: str | None = None

    def ok(self) -> None:
        now = time.time()
        self.reachable = True
        self.checked_at = self.last_ok_at = now
        self.last_error = None

    def failed(self, error: str) -> None:
        self.reachable = False
        self.checked_at = time.time()
        self.last_error = error

    def as_dict(self) -> dict[str, object]:
        return {
            "reachable": self.reachable,
            "checked_at": self.checked_at,
            "last_ok_at": self.last_ok_at,
            "last_error": self.last_error,
        }
