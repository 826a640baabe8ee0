"""What the benchmarks read back from a room: its history, a /sync watcher timing each event's
arrival, and the check that every relayed message came once, in order, from the right ghost."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.measure import quote
from bridge.core.authentication import CONTENT_KEY as AUTH_KEY
from bridge.harness.synapse import MatrixTestClient

GHOST_PREFIX = "@passerelle_"
MARKER_RE = re.compile(r"BENCH-([a-z0-9]+)-(\d{5})")


async def room_history(client: MatrixTestClient, room_id: str) -> list[dict[str, Any]]:
    """Every m.room.message of a room, oldest first (paginated /messages)."""
    events: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        params = {"dir": "b", "limit": "1000", "filter": json.dumps({"types": ["m.room.message"]})}
        if token is not None:
            params["from"] = token
        response = await client.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/messages", params=params
        )
        chunk = [e for e in response.get("chunk", []) if isinstance(e, dict)]
        events.extend(chunk)
        end = response.get("end")
        if not chunk or not isinstance(end, str):
            break
        token = end
    events.reverse()
    return events


class SyncWatcher:
    """Counts marker events per room through an incremental /sync (cheap: one request per
    second or so), to know when a phase is complete. The numbers come from /messages later."""

    def __init__(self, client: MatrixTestClient, tags: dict[str, str]) -> None:
        self.client = client
        self.tags = tags  # room ID -> the marker tag expected there
        self.rooms = list(tags)
        self.seen: dict[str, set[int]] = {room: set() for room in self.rooms}
        self.limited = False
        self._since: str | None = None
        self._filter = json.dumps(
            {
                "room": {
                    "rooms": self.rooms,
                    "timeline": {"limit": 1000, "types": ["m.room.message"]},
                    "state": {"types": []},
                    "ephemeral": {"types": []},
                    "account_data": {"types": []},
                },
                "presence": {"types": []},
                "account_data": {"types": []},
            }
        )

    async def _sync(self, timeout_ms: int) -> None:
        params = {"filter": self._filter, "timeout": str(timeout_ms)}
        if self._since is not None:
            params["since"] = self._since
        response = await self.client.request("GET", "/_matrix/client/v3/sync", params=params)
        self._since = str(response["next_batch"])
        joined = (response.get("rooms") or {}).get("join") or {}
        for room_id, room in joined.items():
            if room_id not in self.seen:
                continue
            timeline = room.get("timeline") or {}
            if timeline.get("limited"):
                self.limited = True
            for event in timeline.get("events") or []:
                self._count(room_id, event)

    def _count(self, room_id: str, event: dict[str, Any]) -> None:
        match = MARKER_RE.search(str((event.get("content") or {}).get("body", "")))
        if match and match.group(1) == self.tags[room_id]:
            self.seen[room_id].add(int(match.group(2)))

    async def begin(self) -> None:
        """Take the current position: what came before is not counted."""
        await self._sync(0)
        self.seen = {room: set() for room in self.rooms}
        self.limited = False

    async def wait(self, expected: int, timeout: float) -> bool:
        """Until every room shows `expected` distinct markers; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(len(s) >= expected for s in self.seen.values()):
                return True
            if self.limited:
                # The timeline skipped events: count from the room history instead.
                for room_id in self.rooms:
                    for event in await room_history(self.client, room_id):
                        self._count(room_id, event)
                self.limited = False
                continue
            await self._sync(5000)
            await asyncio.sleep(0.5)
        return all(len(s) >= expected for s in self.seen.values())


# --- analysis ---------------------------------------------------------------------------------


@dataclass
class RoomCheck:
    """What arrived in one room, against what was sent."""

    ts: dict[int, int]  # seq -> origin_server_ts of its first event
    duplicates: int
    missing: list[int]
    out_of_order: int
    unexpected: int
    notices: list[str]
    verdicts: Counter[str]  # "verdict/method" of the sender verdict each message carries


def check_room(
    events: list[dict[str, Any]], tag: str, expected: int, senders: Callable[[str], bool], bot: str
) -> RoomCheck:
    ts: dict[int, int] = {}
    counts: Counter[int] = Counter()
    order: list[int] = []
    unexpected = 0
    notices: list[str] = []
    verdicts: Counter[str] = Counter()
    for event in events:
        sender = str(event.get("sender", ""))
        body = str((event.get("content") or {}).get("body", ""))
        if sender == bot:
            notices.append(body[:200])
            continue
        if not senders(sender):
            continue
        match = MARKER_RE.search(body)
        if match is None:
            unexpected += 1
            continue
        if match.group(1) != tag:  # an earlier phase in the same room
            continue
        seq = int(match.group(2))
        counts[seq] += 1
        if seq not in ts:
            ts[seq] = int(event["origin_server_ts"])
            order.append(seq)
            auth = event["content"].get(AUTH_KEY) or {}
            verdicts[f"{auth.get('verdict')}/{auth.get('method')}"] += 1
    highest = -1
    out_of_order = 0
    for seq in order:
        if seq < highest:
            out_of_order += 1
        highest = max(highest, seq)
    return RoomCheck(
        ts=ts,
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        missing=[seq for seq in range(expected) if seq not in ts],
        out_of_order=out_of_order,
        unexpected=unexpected,
        notices=notices,
        verdicts=verdicts,
    )


def is_link_notice(body: str) -> bool:
    """The bot's once-per-room words at link time (greeting, confirmation, the m.bridge
    state it may not set in a room where it lacks power level 50): not a relay problem."""
    return "Linked" in body or "help" in body or "m.bridge state" in body


def is_ghost(sender: str) -> bool:
    return sender.startswith(GHOST_PREFIX)
