"""Who may use the bridge: permission levels by user ID, server name or '*'."""

from __future__ import annotations

import enum
from collections.abc import Mapping

from bridge.core.ids import UserID


class PermissionLevel(enum.IntEnum):
    NONE = 0
    USER = 10
    ADMIN = 100

    @classmethod
    def parse(cls, value: object) -> PermissionLevel:
        if isinstance(value, str) and value.lower() in ("user", "admin"):
            return cls.USER if value.lower() == "user" else cls.ADMIN
        raise ValueError(f"unknown permission level {value!r}")


def server_of(mxid: str) -> str:
    """The server name of a user ID, lowercased; '' when it is not a user ID."""
    if not mxid.startswith("@") or ":" not in mxid:
        return ""
    return mxid.split(":", 1)[1].lower()


class PermissionTable:
    """Most specific entry wins: the exact user ID, then its exact server name, then '*'."""

    def __init__(self, entries: Mapping[str, PermissionLevel]) -> None:
        self._entries = dict(entries)

    def level_for(self, mxid: UserID) -> PermissionLevel:
        if mxid.startswith("@") and mxid in self._entries:
            return self._entries[mxid]
        server = server_of(mxid)
        if server and server in self._entries:
            return self._entries[server]
        return self._entries.get("*", PermissionLevel.NONE)

    def as_dict(self) -> dict[str, str]:
        return {k: v.name.lower() for k, v in self._entries.items()}
