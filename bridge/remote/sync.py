"""Reading another homeserver: a /sync long-poll limited to the linked rooms, each batch stored
whole before its position is kept, gaps filled from /messages."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Protocol

from bridge.core.backoff import Backoff
from bridge.core.errors import PermanentError, TransientError
from bridge.core.health import ComponentHealth
from bridge.core.retry import describe
from bridge.core.tasks import wait_for
from bridge.remote.client import RemoteAuthError, RemoteClient

log = logging.getLogger("passerelle.remote.sync")

# What the relay looks at; everything else stays on the remote server.
TIMELINE_TYPES = [
    "m.room.message",
    "m.sticker",
    "m.reaction",
    "m.room.redaction",
    "m.room.member",
    "m.room.encryption",
    "m.room.encrypted",
    "m.room.tombstone",
]
TIMELINE_LIMIT = 100
GAP_PAGES = 10  # pages of /messages read back to fill a gap /sync left (limited: true)
POSITION_INTERVAL = 30.0  # seconds between writes of a position that stored nothing
MAX_ID = 255


class SyncStore(Protocol):
    """Where a remote's events and /sync position are kept."""

    async def position(self) -> str | None: ...

    async def store(self, events: list[tuple[str, str, str]], next_batch: str) -> int:
        """(room ID, event ID, event JSON) stored and next_batch kept, in one commit."""
        ...

    async def known(self, event_ids: list[str]) -> set[str]: ...


def sync_filter(rooms: Collection[str]) -> str:
    """Only the linked rooms' timelines; no presence, receipts, typing or account data."""
    nothing = {"not_types": ["*"]}
    return json.dumps(
        {
            "presence": nothing,
            "account_data": nothing,
            "room": {
                "rooms": sorted(rooms),
                "timeline": {"limit": TIMELINE_LIMIT, "types": TIMELINE_TYPES},
                "state": {"types": ["m.room.encryption", "m.room.tombstone"]},
                "ephemeral": nothing,
                "account_data": nothing,
            },
        },
        separators=(",", ":"),
    )


def batch_events(response: Mapping[str, Any], rooms: Collection[str]) -> list[tuple[str, Any]]:
    """(room ID, event) of every timeline event of the linked rooms in a /sync response, in
    order, joined rooms and rooms the account left (its removal is news too)."""
    out: list[tuple[str, Any]] = []
    sections = response.get("rooms")
    if not isinstance(sections, Mapping):
        return out
    for section in ("join", "leave"):
        joined = sections.get(section)
        if not isinstance(joined, Mapping):
            continue
        for room_id, room in joined.items():
            if room_id not in rooms or not isinstance(room, Mapping):
                continue
            timeline = room.get("timeline")
            events = timeline.get("events") if isinstance(timeline, Mapping) else None
            if isinstance(events, list):
                out.extend((room_id, event) for event in events)
    return out


def gaps(response: Mapping[str, Any], rooms: Collection[str]) -> dict[str, str]:
    """Rooms whose timeline /sync cut short (limited), with the token to read back from."""
    found: dict[str, str] = {}
    sections = response.get("rooms")
    joined = sections.get("join") if isinstance(sections, Mapping) else None
    if not isinstance(joined, Mapping):
        return found
    for room_id, room in joined.items():
        timeline = room.get("timeline") if isinstance(room, Mapping) else None
        if room_id in rooms and isinstance(timeline, Mapping) and timeline.get("limited"):
            token = timeline.get("prev_batch")
            if isinstance(token, str):
                found[room_id] = token
    return found


def _event_id(event: Any) -> str | None:
    if not isinstance(event, Mapping):
        return None
    event_id = event.get("event_id")
    if isinstance(event_id, str) and event_id.startswith("$") and len(event_id) <= MAX_ID:
        return event_id
    return None


class RemoteSyncer:
    """One remote's /sync loop. Stops for good when the token is refused (401)."""

    def __init__(
        self,
        client: RemoteClient,
        store: SyncStore,
        health: ComponentHealth,
        *,
        rooms: Callable[[], Collection[str]],
        on_stored: Callable[[], None],
        on_token_refused: Callable[[str], Awaitable[None]],
        timeout_ms: int,
        own_user_id: str | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.health = health
        self.rooms = rooms
        self.on_stored = on_stored
        self.on_token_refused = on_token_refused
        self.timeout_ms = timeout_ms
        self.own_user_id = own_user_id
        self._since: str | None = None  # the position asked from (read from the store once)
        self._kept_at = 0.0
        self._changed = asyncio.Event()
        self.stopped_reason: str | None = None

    def rooms_changed(self) -> None:
        """The linked rooms changed: end the current long-poll and ask again."""
        self._changed.set()

    async def run(self) -> None:
        backoff = Backoff(initial=1.0, maximum=60.0)
        while True:
            rooms = set(self.rooms())
            self._changed.clear()
            if not rooms:
                await self._changed.wait()
                continue
            try:
                await self.sync_once(rooms)
            except RemoteAuthError as e:
                self.stopped_reason = str(e)
                await self.on_token_refused(str(e))
                return
            except Exception as e:
                # Outages and refusals, but also anything unforeseen in an answer: the loop
                # must never die silently, and never spin.
                delay = backoff.next_delay()
                self.health.failed(str(e) or type(e).__name__)
                log.warning(
                    "remote %s: /sync failed (%s); again in %.0f s",
                    self.client.name,
                    e if isinstance(e, (TransientError, PermanentError)) else describe(e),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await wait_for(self._changed.wait(), delay)
                continue
            backoff.reset()
            self.health.ok()

    async def sync_once(self, rooms: set[str]) -> int:
        """One /sync round: returns how many new events were stored."""
        if self._since is None:
            self._since = await self.store.position()
        since = self._since
        filter_json = sync_filter(rooms)
        if since is None:
            # A new remote: start from now. What was said before the link is not relayed.
            response = await self.client.sync(
                None, json.dumps({"room": {"timeline": {"limit": 0}}}), 0
            )
            await self._keep(response, [])
            return 0
        poll = asyncio.ensure_future(self.client.sync(since, filter_json, self.timeout_ms))
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            done, _ = await asyncio.wait({poll, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if poll not in done:
            poll.cancel()
            return 0
        response = poll.result()
        events: list[tuple[str, str, str]] = []
        for room_id, token in gaps(response, rooms).items():
            events.extend(await self._fill_gap(room_id, token))
        for room_id, event in batch_events(response, rooms):
            event_id = _event_id(event)
            if event_id is not None and not self._own_echo(event):
                events.append((room_id, event_id, json.dumps(event, ensure_ascii=False)))
        added = await self._keep(response, events)
        if added:
            log.debug("remote %s: %d new events", self.client.name, added)
            self.on_stored()
        return added

    async def _keep(self, response: Mapping[str, Any], events: list[tuple[str, str, str]]) -> int:
        """Store the events with the new position, in one commit. An answer with nothing to
        store (often only the bridge's own echoes) moves the position in memory, and in the
        database at most every POSITION_INTERVAL seconds: after a crash such answers are read
        again, and again store nothing."""
        token = _next_batch(response)
        now = time.monotonic()
        if events or self._since is None or now - self._kept_at >= POSITION_INTERVAL:
            added = await self.store.store(events, token)
            self._kept_at = now
        else:
            added = 0
        self._since = token
        return added

    def _own_echo(self, event: Mapping[str, Any]) -> bool:
        """A message the bridge's own account sent (it comes back in /sync): nothing to relay,
        so not even stored. Its state events (its membership) do matter, and are kept."""
        return (
            self.own_user_id is not None
            and event.get("sender") == self.own_user_id
            and "state_key" not in event
        )

    async def _fill_gap(self, room_id: str, token: str) -> list[tuple[str, str, str]]:
        """Events /sync skipped, read back until one already stored (oldest first)."""
        found: list[tuple[str, str, str]] = []
        for _ in range(GAP_PAGES):
            page = await self.client.messages(room_id, token, "b", 100, None)
            chunk = page.get("chunk")
            if not isinstance(chunk, list) or not chunk:
                break
            ids = [e for e in (_event_id(ev) for ev in chunk) if e is not None]
            known = await self.store.known(ids)
            stop = False
            for event in chunk:
                event_id = _event_id(event)
                if event_id is None:
                    continue
                if event_id in known:
                    stop = True
                    break
                if event.get("type") in TIMELINE_TYPES and not self._own_echo(event):
                    found.append((room_id, event_id, json.dumps(event, ensure_ascii=False)))
            end = page.get("end")
            if stop or not isinstance(end, str):
                break
            token = end
        else:
            log.warning(
                "remote %s: a gap in %s was longer than read back", self.client.name, room_id
            )
        found.reverse()
        return found


def _next_batch(response: Mapping[str, Any]) -> str:
    token = response.get("next_batch")
    if not isinstance(token, str) or not token or len(token) > 4096:
        raise PermanentError("the remote answered /sync without a next_batch")
    return token
