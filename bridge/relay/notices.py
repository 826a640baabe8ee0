"""Notices the bridge says once: the room hears of a recurring refusal once per key (a room and
a day), however often it happens; a retry after a crash sends the same transaction again."""

from __future__ import annotations

from bridge.core.ids import EventID, RoomID
from bridge.db import kv
from bridge.db.engine import Database
from bridge.db.mail import MappedEvent
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.render import notice_content


async def tell_once(
    db: Database,
    client: MatrixClient,
    key: str,
    room_id: RoomID,
    text: str,
    *,
    reply_to: EventID | None = None,
) -> None:
    if await kv.get_value(db, key) is not None:
        return
    content = notice_content(text, reply_to=reply_to)
    await client.send_event(room_id, "m.room.message", content, derived_txn_id(key))
    # Told before recorded: if telling fails, the next occurrence tells instead of nobody.
    await kv.set_value(db, key, reply_to or "told")


def thread_of(mapped: MappedEvent | None, event_id: EventID | None) -> EventID | None:
    """The thread an event is in, for a reply to it: None for a top-level event."""
    if mapped is None or event_id is None or mapped.thread_root == event_id:
        return None
    return mapped.thread_root
