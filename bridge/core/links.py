"""Links between a room and a remote (for now: a mailing list's mailbox), with their policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bridge.core.ids import RoomID, UserID
from bridge.core.policy import DomainPattern, domain_allowed

THREAD_MODES = ("threads", "flat")


@dataclass(frozen=True)
class LinkSettings:
    allowed_senders: tuple[str, ...] = ()
    thread_mode: str = "threads"
    # Matrix → mail: the sender address (None: mail.from_address), whether edits send a
    # correction mail, and the recipient domains allowed besides the list address.
    from_address: str | None = None
    send_edits: bool = True
    egress_domains: tuple[str, ...] = ()
    # Sender domains whose mail is posted only when authenticated (DKIM/DMARC); None: all of
    # allowed_senders. A classification marking (None: unmarked), see mail.markings.
    require_authenticated: tuple[str, ...] | None = None
    marking: str | None = None

    def patterns(self) -> list[DomainPattern]:
        return [DomainPattern.parse(p) for p in self.allowed_senders]

    def recipient_allowed(self, list_address: str, recipient: str) -> bool:
        """Egress policy: the list itself, or an address at one of egress_domains."""
        if recipient.lower() == list_address.lower():
            return True
        local, at, domain = recipient.rpartition("@")
        if not at or not local or "@" in local:
            return False
        patterns = [DomainPattern.parse(p) for p in self.egress_domains]
        return bool(patterns) and domain_allowed(domain, patterns)

    def sender_allowed(self, address: str) -> bool:
        """Whether mail from this canonical address may be posted (exact domain policy)."""
        domain = address.rpartition("@")[2]
        return bool(domain) and domain_allowed(domain, self.patterns())

    def authentication_required(self, address: str) -> bool:
        """Whether mail from this canonical address must be authenticated to be posted."""
        patterns = (
            self.allowed_senders
            if self.require_authenticated is None
            else self.require_authenticated
        )
        domain = address.rpartition("@")[2]
        return bool(domain) and domain_allowed(domain, [DomainPattern.parse(p) for p in patterns])

    def as_json(self) -> dict[str, Any]:
        return {
            "allowed_senders": list(self.allowed_senders),
            "thread_mode": self.thread_mode,
            "from_address": self.from_address,
            "send_edits": self.send_edits,
            "egress_domains": list(self.egress_domains),
            "require_authenticated": (
                None if self.require_authenticated is None else list(self.require_authenticated)
            ),
            "marking": self.marking,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinkSettings:
        senders = data.get("allowed_senders", [])
        mode = data.get("thread_mode", "threads")
        sender = data.get("from_address")
        egress = data.get("egress_domains", [])
        required = data.get("require_authenticated")
        marking = data.get("marking")
        return cls(
            allowed_senders=tuple(str(s) for s in senders) if isinstance(senders, list) else (),
            thread_mode=mode if mode in THREAD_MODES else "threads",
            from_address=sender if isinstance(sender, str) and sender else None,
            send_edits=data.get("send_edits", True) is not False,
            egress_domains=tuple(str(d) for d in egress) if isinstance(egress, list) else (),
            # Anything but a list keeps the default (all allowed senders): never less strict.
            require_authenticated=(
                tuple(str(d) for d in required) if isinstance(required, list) else None
            ),
            marking=marking if isinstance(marking, str) and marking else None,
        )


@dataclass(frozen=True)
class Link:
    id: int
    name: str
    room_id: RoomID
    kind: str  # "mail" or "remote"
    remote: str  # the list address, or remote_link_key() for a remote room
    settings: LinkSettings
    paused: bool
    source: str  # "config" or "bot"
    created_by: UserID | None = None  # who linked it by command; None for the config file


REMOTE_KIND = "remote"


def remote_link_key(remote: str, room_id: str) -> str:
    """What a remote link's `remote` column holds: "<remote name>/<room ID on that server>"
    (a remote's name has no "/", a room ID starts with "!")."""
    return f"{remote}/{room_id}"


def split_remote_key(key: str) -> tuple[str, str]:
    """(remote name, remote room ID) of a remote link."""
    remote, _, room_id = key.partition("/")
    return remote, room_id
