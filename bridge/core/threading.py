"""Where a message goes in a room: which thread, replying to what, from its references."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.core.ids import EventID
from bridge.core.message import ThreadRef


@dataclass(frozen=True)
class Mapped:
    """A message already bridged in this link: its event and the root of its thread."""

    event_id: EventID
    thread_root: EventID
    subject: str | None = None


@dataclass(frozen=True)
class ThreadTarget:
    """thread_root None: the message starts a new conversation. parent: the event it answers."""

    thread_root: EventID | None
    parent: EventID | None
    subject: str | None = None

    @property
    def is_new(self) -> bool:
        return self.parent is None


NEW_THREAD = ThreadTarget(thread_root=None, parent=None)


async def resolve_thread(
    ref: ThreadRef, lookup: Callable[[str], Awaitable[Mapped | None]]
) -> ThreadTarget:
    """In-Reply-To first, then References from the newest to the oldest; the first Message-ID
    known in this link decides. `lookup` only sees one link, so a reference to another link's
    message cannot pull a mail into this room's thread: it starts a new one."""
    candidates = [*ref.in_reply_to, *reversed(ref.references)]
    seen: set[str] = set()
    for message_id in candidates:
        if message_id in seen or message_id == ref.message_id:
            continue
        seen.add(message_id)
        found = await lookup(message_id)
        if found is not None:
            return ThreadTarget(
                thread_root=found.thread_root, parent=found.event_id, subject=found.subject
            )
    return NEW_THREAD
