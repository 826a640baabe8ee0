#!/usr/bin/env python3
"""The naive copy bot of `remote_relay.py`: a plain client on each server that reads one side's
/sync and re-sends each message to the other side. Run in a process of its own:

    python bench/copy_bot.py CONFIG STATUS
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

# `bench` and `bridge` are imported from this checkout when run as a script.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.measure import quote, start_script, stop_process  # noqa: E402
from bridge.registration import atomic_write  # noqa: E402

BOT_POLL_MS = 30_000  # the bridge's default remotes.*.sync_timeout


def timeline_filter(rooms: Sequence[str], limit: int) -> str:
    """m.room.message of `rooms` only: no state, presence, receipts or account data."""
    return json.dumps(
        {
            "room": {
                "rooms": list(rooms),
                "timeline": {"limit": limit, "types": ["m.room.message"]},
                "state": {"types": []},
                "ephemeral": {"types": []},
                "account_data": {"types": []},
            },
            "presence": {"types": []},
            "account_data": {"types": []},
        },
        separators=(",", ":"),
    )


# --- the naive copy bot (its own process) --------------------------------------------------------


@dataclass
class BotSide:
    """One server as the bot sees it: its account there and the room it copies from / to."""

    base_url: str
    user_id: str
    token: str
    room_id: str


class CopyBot:
    """Reads one side's /sync and re-sends each m.room.message to the other side, one at a
    time, in order; never copies its own messages back."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.copied = 0
        self.gaps = 0  # /sync answers with limited: true (events skipped; should stay 0)

    async def _call(self, side: BotSide, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {side.token}"}
        for attempt in range(5):
            async with self.http.request(
                method, side.base_url + path, headers=headers, **kwargs
            ) as response:
                body = await response.json(content_type=None)
                if response.status < 400 and isinstance(body, dict):
                    return body
                if response.status < 500 and response.status != 429:
                    raise RuntimeError(f"{method} {path}: {response.status} {body}")
            await asyncio.sleep(0.5 * (attempt + 1))
        raise RuntimeError(f"{method} {path}: gave up")

    async def _sync(self, side: BotSide, since: str | None, timeout_ms: int) -> dict[str, Any]:
        params = {"filter": timeline_filter([side.room_id], 1000), "timeout": str(timeout_ms)}
        if since is not None:
            params["since"] = since
        return await self._call(side, "GET", "/_matrix/client/v3/sync", params=params)

    async def start(self, source: BotSide) -> str:
        """The current /sync position of `source`: what came before is not copied."""
        return str((await self._sync(source, None, 0))["next_batch"])

    async def copy(self, source: BotSide, target: BotSide, since: str, prefix: bool) -> None:
        while True:
            response = await self._sync(source, since, BOT_POLL_MS)
            since = str(response["next_batch"])
            room = ((response.get("rooms") or {}).get("join") or {}).get(source.room_id) or {}
            timeline = room.get("timeline") or {}
            if timeline.get("limited"):
                self.gaps += 1
            for event in timeline.get("events") or []:
                if event.get("sender") == source.user_id:
                    continue  # its own copy
                content = dict(event.get("content") or {})
                if prefix:  # as the bridge names agency senders on the remote side
                    content["body"] = f"{event['sender']} : {content.get('body', '')}"
                txn = f"copy-{uuid.uuid4().hex}"
                await self._call(
                    target,
                    "PUT",
                    f"/_matrix/client/v3/rooms/{quote(target.room_id)}/send/m.room.message/{txn}",
                    json=content,
                )
                self.copied += 1


def serve_bot(config_path: Path, status_path: Path) -> None:
    """`python bench/copy_bot.py CONFIG STATUS`: the bot, until SIGTERM; it writes "ready" to
    STATUS once both directions have their starting position, and its counts when it stops."""
    raw = json.loads(config_path.read_text())
    agency, remote = BotSide(**raw["agency"]), BotSide(**raw["remote"])

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        timeout = aiohttp.ClientTimeout(total=BOT_POLL_MS / 1000 + 30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            bot = CopyBot(http)
            from_remote, from_agency = await bot.start(remote), await bot.start(agency)
            tasks = [
                asyncio.create_task(bot.copy(remote, agency, from_remote, prefix=False)),
                asyncio.create_task(bot.copy(agency, remote, from_agency, prefix=True)),
            ]
            status_path.write_text("ready\n")
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in [stopping, *tasks]:
                task.cancel()
            for task in done:
                if task is not stopping and task.exception() is not None:
                    status_path.write_text(f"failed {task.exception()!r}\n")
                    raise SystemExit(1)
            status_path.write_text(f"stopped copied={bot.copied} gaps={bot.gaps}\n")

    asyncio.run(serve())


@dataclass
class BotProcess:
    """The bot in a process of its own (`python bench/copy_bot.py`)."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def status_path(self) -> Path:
        return self.folder / "bot.status"

    def start(self, agency: BotSide, remote: BotSide, timeout: float = 30) -> None:
        config = self.folder / "bot.json"
        atomic_write(config, json.dumps({"agency": vars(agency), "remote": vars(remote)}))
        self.proc = start_script(
            [__file__, str(config), str(self.status_path)],
            self.folder / "bot.out",
            self.status_path,
            "copy bot",
            timeout,
        )

    def output(self) -> str:
        return (self.folder / "bot.out").read_text(errors="replace")[-2000:]

    def stop(self) -> str:
        """Stop it; its last status ("stopped copied=… gaps=…" or why it failed)."""
        stop_process(self.proc)
        with contextlib.suppress(OSError):
            return self.status_path.read_text().strip()
        return ""


if __name__ == "__main__":
    serve_bot(Path(sys.argv[1]), Path(sys.argv[2]))
