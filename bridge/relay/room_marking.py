"""A room's classification marking where its members see it: the first line of its topic."""

from __future__ import annotations

import logging
from typing import Any

from bridge.config import Config
from bridge.core.bridge_state import MARKING_KEY
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import RoomID
from bridge.core.links import Link
from bridge.core.marking import highest, marked_topic
from bridge.db import links as link_db
from bridge.db.engine import Database
from bridge.matrix.client import MatrixClient
from bridge.relay.notices import tell_once

log = logging.getLogger("passerelle.markings")

__all__ = ["MARKING_KEY", "RoomMarking"]


class RoomMarking:
    """Keeps a room's topic starting with `[LEVEL]`, the highest marking of its links."""

    def __init__(self, config: Config, db: Database, client: MatrixClient) -> None:
        self.config = config
        self.db = db
        self.client = client

    async def show(self, room_id: RoomID, changed: Link | None = None) -> None:
        """Set the topic's marking line from the room's links. At start-up (`changed` None) a
        room none of whose links is marked is left alone; after a link was made, changed or
        removed (`changed`), a marking line no link calls for goes (a link re-made without its
        marking). Never raises for the homeserver's refusals: the room is told once."""
        links = [link for link in await link_db.links_in_room(self.db, room_id) if not link.paused]
        markings = [link.settings.marking for link in links if link.settings.marking]
        if not markings and changed is None:
            return
        levels = self.config.mail.markings.levels
        marking = highest(markings, levels)
        try:
            current = await self.client.get_state(room_id, "m.room.topic") or {}
            topic = current.get("topic")
            topic = topic if isinstance(topic, str) else ""
            wanted = marked_topic(topic, marking, levels)
            if wanted == topic:
                return
            await self.client.send_state(room_id, "m.room.topic", "", _topic(current, wanted))
            log.info("topic of %s marked %s", room_id, marking)
        except PermanentError as e:
            log.warning("could not mark the topic of %s: %s", room_id, e)
            if self.client.errcode_of(e) == "M_FORBIDDEN":
                await self._tell_denied(room_id, marking)
        except TransientError as e:
            log.warning("could not mark the topic of %s: %s", room_id, e)

    async def _tell_denied(self, room_id: RoomID, marking: str | None) -> None:
        shown = f"“[{marking}]”" if marking else "its marking line"
        text = (
            f"This room is linked with a classification marking, but the bot may not change "
            f"the room's topic to start with {shown}. A room admin can give the bot the power "
            "to change the topic, or write it there. (Said once in this room.)"
        )
        try:
            await tell_once(self.db, self.client, f"topic-denied:{room_id}", room_id, text)
        except (TransientError, PermanentError) as e:
            log.warning("could not tell %s about its topic: %s", room_id, e)


def _topic(current: dict[str, Any], topic: str) -> dict[str, Any]:
    """The topic content with its text replaced; a rich `m.topic` (MSC3765) becomes the same
    plain text, so no client shows the old topic."""
    content = dict(current)
    content["topic"] = topic
    if "m.topic" in content:
        content["m.topic"] = [{"mimetype": "text/plain", "body": topic}]
    return content
