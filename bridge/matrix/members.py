"""Who is in an agency room and under which display name, read once and dropped on every
membership change: every direction that shows or checks a name asks here."""

from __future__ import annotations

import logging

from bridge.core.errors import PermanentError
from bridge.core.ids import RoomID, UserID
from bridge.matrix.client import MatrixClient

log = logging.getLogger("passerelle.matrix.members")


class RoomMembers:
    def __init__(self, client: MatrixClient) -> None:
        self.client = client
        self._members: dict[RoomID, dict[UserID, tuple[str | None, str | None]]] = {}

    def changed(self, room_id: RoomID) -> None:
        """A membership event arrived in the room: read it again next time."""
        self._members.pop(room_id, None)

    async def members(
        self, room_id: RoomID, *, wanted: UserID | None = None
    ) -> dict[UserID, str | None]:
        """Joined members and their names; read again when `wanted` is not among them."""
        profiles = await self._profiles(room_id, wanted)
        return {user: name for user, (name, _avatar) in profiles.items()}

    async def avatar(self, room_id: RoomID, user_id: UserID) -> str | None:
        """The user's avatar (an mxc:// URL) in the room, if any."""
        return (await self._profiles(room_id, user_id)).get(user_id, (None, None))[1]

    async def _profiles(
        self, room_id: RoomID, wanted: UserID | None
    ) -> dict[UserID, tuple[str | None, str | None]]:
        members = self._members.get(room_id)
        if members is None or (wanted is not None and wanted not in members):
            try:
                members = await self.client.joined_members(room_id)
            except PermanentError as e:
                log.warning("cannot read the members of %s: %s", room_id, e)
                members = {}
            self._members[room_id] = members
        return members

    async def name(self, room_id: RoomID, user_id: UserID) -> tuple[str, bool]:
        """The user's display name in the room ("" if none), and whether another member
        has the same one."""
        members = await self.members(room_id, wanted=user_id)
        name = members.get(user_id) or ""
        same = [user for user, other in members.items() if other == name and user != user_id]
        return name, bool(name) and bool(same)
