"""A bot notice that says how a long task is going, edited in place (m.replace)."""

from __future__ import annotations

from typing import Any

from bridge.core.ids import EventID, RoomID
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.render import notice_content


class NoticeBoard:
    """Posts a notice, then replaces its text; `key` makes every send idempotent."""

    def __init__(self, client: MatrixClient) -> None:
        self.client = client

    async def show(
        self, room_id: RoomID, text: str, *, key: str, replaces: EventID | None = None
    ) -> EventID:
        """Post `text` as a new notice, or as the new text of the notice `replaces`; returns
        the ID of the event sent."""
        if replaces is None:
            return await self.client.send_event(
                room_id, "m.room.message", notice_content(text), derived_txn_id("progress", key)
            )
        content: dict[str, Any] = {
            "msgtype": "m.notice",
            "body": f"* {text}",
            "m.mentions": {},
            "m.new_content": {"msgtype": "m.notice", "body": text, "m.mentions": {}},
            "m.relates_to": {"rel_type": "m.replace", "event_id": replaces},
        }
        return await self.client.send_event(
            room_id, "m.room.message", content, derived_txn_id("progress-edit", key)
        )
