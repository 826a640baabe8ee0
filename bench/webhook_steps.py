#!/usr/bin/env python3
"""The webhook relay's database steps timed alone, in this process, on a fresh SQLite database.

    python bench/webhook_steps.py [--count 500] [--hooks 9]

Per step, µs of CPU (this process: the event loop and aiosqlite's thread) and elapsed:
`store` (a POST's commit); `sweep`, what the relay did per stored request before store()
queued requests itself (each hook room read, then up to 200 pending requests), with a backlog
of --count requests and with none (`sweep_no_backlog`); `record` (record_posted: state and
audit row in one commit) and `thread_root` (a reply's lookup).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bridge.config import DatabaseConfig  # noqa: E402
from bridge.core.audit import AuditEntry, digest  # noqa: E402
from bridge.core.ids import EventID, RoomID  # noqa: E402
from bridge.db import rooms  # noqa: E402
from bridge.db import webhooks as webhook_db  # noqa: E402
from bridge.db.engine import open_database  # noqa: E402


async def timed(count: int, step: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    for n in range(count):
        await step(n)
    return {
        "cpu_us": round(1e6 * (time.process_time() - cpu) / count, 1),
        "wall_us": round(1e6 * (time.perf_counter() - wall) / count, 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        db = await open_database(
            DatabaseConfig(url=f"sqlite+aiosqlite:///{folder}/p.db", pool_size=1)
        )
        room_ids = [RoomID(f"!room{n}:localhost") for n in range(args.hooks)]
        for room_id in room_ids:
            await rooms.save_room(
                db,
                room_id,
                bot_membership="join",
                is_direct=False,
                encrypted=False,
                invited_by=None,
            )
        body = json.dumps({"text": "Build 1 failed\n\nThe pipeline stopped at step 7."})
        items: list[webhook_db.HookInboxItem] = []

        async def store(n: int) -> None:
            item = await webhook_db.store(db, "ci", f"msg_{n}", body)
            assert item is not None
            items.append(item)

        async def sweep(n: int) -> None:
            for room_id in room_ids:
                await rooms.get_room(db, room_id)
            await webhook_db.pending(db, 200, set(), skip_hooks=())

        async def record(n: int) -> None:
            item = items[n]
            audit = AuditEntry(
                direction="webhook_in",
                link="webhook:ci",
                room_id=room_ids[0],
                sender=None,
                outcome="posted",
                recipients=(room_ids[0],),
                ids={"webhook_id": item.webhook_id, "event_id": f"$e{n}"},
                reason=None,
                body_sha256=digest(body.encode()),
            )
            await webhook_db.record_posted(
                db, item.id, EventID(f"$e{n}"), thread=None, audit=audit
            )

        async def thread_root(n: int) -> None:
            await webhook_db.thread_root(db, "ci", room_ids[0], f"t{n}")

        results: dict[str, Any] = {"count": args.count, "hook_rooms": args.hooks}
        results["store"] = await timed(args.count, store)
        # The sweep with a backlog: the first --backlog requests still pending.
        results["sweep"] = await timed(min(args.count, 200), sweep)
        results["record"] = await timed(args.count, record)
        results["thread_root"] = await timed(args.count, thread_root)
        results["sweep_no_backlog"] = await timed(min(args.count, 200), sweep)
        await db.close()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--hooks", type=int, default=9, help="hook rooms (the bench has 9)")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
