"""Each link shown in its room's state (`m.bridge`, MSC2346), so every client can tell the
room is bridged, and to what; removed again when the link goes."""

from __future__ import annotations

import logging

from bridge.config import Config
from bridge.core.bridge_state import (
    BRIDGE_STATE_TYPES,
    bridge_state_content,
    bridge_state_key,
)
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import RoomID
from bridge.core.links import REMOTE_KIND, Link, split_remote_key
from bridge.db import links as link_db
from bridge.db.engine import Database
from bridge.matrix.client import MatrixClient
from bridge.relay.notices import tell_once
from bridge.relay.room_marking import RoomMarking

log = logging.getLogger("passerelle.bridge_state")


class BridgeState:
    """Sets and clears the state of links, and the room's marking line with it."""

    def __init__(
        self, config: Config, db: Database, client: MatrixClient, marking: RoomMarking
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.marking = marking

    async def announce(self, link: Link, active: bool) -> None:
        """The link's state set (`active`) or emptied (it was removed: `{}` is how a state
        event is taken away). Never raises for the homeserver: a refusal is told once."""
        content = bridge_state_content(
            link, bot_mxid=self.config.bot_mxid, remote_server=self._server_of(link)
        )
        for event_type in BRIDGE_STATE_TYPES:
            try:
                await self.client.send_state(
                    link.room_id, event_type, bridge_state_key(link), content if active else {}
                )
            except PermanentError as e:
                log.warning("could not set %s state in %s: %s", event_type, link.room_id, e)
                if self.client.errcode_of(e) == "M_FORBIDDEN":
                    await self._tell_denied(link.room_id)
                break  # the twin would be refused the same way
            except TransientError as e:
                log.warning("could not set %s state in %s: %s", event_type, link.room_id, e)
                break
        await self.marking.show(link.room_id, link)

    async def announce_all(self, room_id: RoomID | None = None) -> None:
        """The active links (of one room, or all) shown again: at start-up (links of the
        config file, state lost while the bot lacked the power) and when the bot joins."""
        links = (
            await link_db.all_links(self.db)
            if room_id is None
            else await link_db.links_in_room(self.db, room_id)
        )
        for link in links:
            if not link.paused:
                await self.announce(link, True)

    def _server_of(self, link: Link) -> str | None:
        if link.kind != REMOTE_KIND:
            return None
        remote = self.config.remotes.get(split_remote_key(link.remote)[0])
        return remote.server_name if remote is not None else None

    async def _tell_denied(self, room_id: RoomID) -> None:
        """The room's admins hear once what the bot needs to mark the room as bridged."""
        try:
            levels = await self.client.get_state(room_id, "m.room.power_levels") or {}
        except (TransientError, PermanentError):
            levels = {}
        events = levels.get("events")
        needed = events.get("m.bridge") if isinstance(events, dict) else None
        if not isinstance(needed, int):
            default = levels.get("state_default", 50)
            needed = default if isinstance(default, int) else 50
        text = (
            "The link works, but clients cannot show that this room is bridged: the bot needs "
            f"power level {needed} here to set the room's m.bridge state. A room admin can "
            "give it that level. (Said once in this room.)"
        )
        try:
            await tell_once(self.db, self.client, f"m.bridge-denied:{room_id}", room_id, text)
        except (TransientError, PermanentError) as e:
            log.warning("could not tell %s about m.bridge state: %s", room_id, e)
