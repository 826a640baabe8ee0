"""Links between a room and a remote (for now: a mailing list's mailbox), with their policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.core.ids import RoomID
from bridge.core.policy import DomainPattern, domain_allowed

THREAD_MODES = ("threads", "flat")


@dataclass(frozen=True)
class LinkSettings:
    allowed_senders: tuple[str, ...] = ()
    thread_mode: str = "threads"

    def patterns(self) -> list[DomainPattern]:
        return [DomainPattern.parse(p) for p in self.allowed_senders]

    def sender_allowed(self, address: str) -> bool:
        """Whether mail from this canonical address may be posted (exact domain policy)."""
        domain = address.rpartition("@")[2]
        return bool(domain) and domain_allowed(domain, self.patterns())

    def as_json(self) -> dict[str, Any]:
        return {"allowed_senders": list(self.allowed_senders), "thread_mode": self.thread_mode}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkSettings:
        senders = data.get("allowed_senders", [])
        mode = data.get("thread_mode", "threads")
        return cls(
            allowed_senders=tuple(str(s) for s in senders) if isinstance(senders, list) else (),
            thread_mode=mode if mode in THREAD_MODES else "threads",
        )


@dataclass(frozen=True)
class Link:
    id: int
    name: str
    room_id: RoomID
    kind: str  # "mail"
    remote: str  # the list address
    settings: LinkSettings
    paused: bool
    source: str  # "config" or "bot"
