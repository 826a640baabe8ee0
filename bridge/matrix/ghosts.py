"""Ghost users: registered, named and joined on demand, one per remote sender."""

from __future__ import annotations

import logging

from bridge.config import Config
from bridge.core.errors import PermanentError
from bridge.core.ghosts import encode_localpart, ghost_display_name
from bridge.core.ids import RoomID, UserID
from bridge.db import ghosts
from bridge.db.engine import Database
from bridge.matrix.client import MatrixClient

log = logging.getLogger("passerelle.matrix.ghosts")


class GhostManager:
    """Makes sure the ghost of a remote address exists, has the right name and is in a room."""

    def __init__(self, config: Config, client: MatrixClient, db: Database) -> None:
        self.config = config
        self.client = client
        self.db = db
        self._named: dict[UserID, str] = {}
        self._joined: set[tuple[UserID, RoomID]] = set()
        # Rooms where a ghost's join was refused until the bot invited it: the next ghosts are
        # invited first, without a join the homeserver refuses.
        self._invite_first: set[RoomID] = set()

    def mxid_for(self, address: str) -> UserID:
        return self.config.ghost_mxid(encode_localpart(address))

    async def ensure(
        self, address: str, display_name: str, room_id: RoomID, *, rename: bool = True
    ) -> UserID:
        """The ghost of a mail address, named "Name (address)", in the room. With rename
        false, an existing ghost keeps its name (a new one still gets this one)."""
        mxid = self.mxid_for(address)
        name = ghost_display_name(display_name, address)
        return await self.ensure_user(
            mxid, name, room_id, kind="mail", remote_id=address, rename=rename
        )

    async def ensure_user(
        self,
        mxid: UserID,
        name: str,
        room_id: RoomID,
        *,
        kind: str,
        remote_id: str,
        rename: bool = True,
    ) -> UserID:
        """A ghost registered, showing `name` (unless it exists and rename is false), and
        joined to the room."""
        if self._named.get(mxid) != name:
            known = await ghosts.get_display_name(self.db, mxid)
            if known is None:
                await self.client.register(mxid[1:].split(":", 1)[0])
            if known is not None and not rename:
                self._named[mxid] = known  # keeps its name; a later authenticated mail renames
            else:
                if known != name:
                    await self.client.set_displayname(mxid, name)
                    await ghosts.save_ghost(
                        self.db, mxid, kind=kind, remote_id=remote_id, display_name=name
                    )
                self._named[mxid] = name
        if (mxid, room_id) not in self._joined:
            await self._join(mxid, room_id)
            self._joined.add((mxid, room_id))
        return mxid

    async def _join(self, mxid: UserID, room_id: RoomID) -> None:
        """The ghost joins; in an invite-only room the bot (a member) invites it first."""
        if room_id not in self._invite_first:
            try:
                await self.client.join(room_id, as_user=mxid)
                return
            except PermanentError:
                # Invite-only: the bot invites, and from now on before the join.
                await self.client.invite(room_id, mxid)
                self._invite_first.add(room_id)
        else:
            try:
                await self.client.invite(room_id, mxid)
            except PermanentError as e:
                # Already invited or joined (this process forgets whom it joined when it
                # restarts), or the bot may no longer invite: the join says which.
                log.debug("inviting %s to %s refused: %s", mxid, room_id, e)
        await self.client.join(room_id, as_user=mxid)

    async def leave(self, mxid: UserID, room_id: RoomID) -> None:
        """The ghost leaves the room (its remote user left theirs)."""
        self._joined.discard((mxid, room_id))
        try:
            await self.client.leave(room_id, as_user=mxid)
        except PermanentError as e:
            log.info("%s could not leave %s: %s", mxid, room_id, e)
