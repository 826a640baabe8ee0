#!/usr/bin/env python3
"""Outbound webhooks: room messages delivered to a legacy system's URL, as ratios to what the
homeserver takes from a plain client and to raw HTTP.

Starts its own Synapse and `python -m bridge run` (SQLite, INFO) with one outbound hook per
measured phase, each on its own room (Alice, the bot and Bob), delivering to a receiver in this
process (aiohttp, 127.0.0.1, listed in webhooks.egress) that checks every signature:

    python bench/webhooks_out.py [--messages 300] [--concurrency 8] [--warmup 50]

Phases, in one run against the same servers:

1. plain: Alice sends N messages one at a time into a room the bot is in without a hook, then
   N with K in flight (what the homeserver takes: the reference);
2. hooks: the same into a room with an outbound hook, one at a time and K in flight; the
   delivered rate is N / (last delivery received - first send started), the latency each
   message's delivery time minus the moment its send returned; every message delivered once,
   in the room's order (K in flight: the order Synapse gave the events);
3. raw: this script POSTs N signed deliveries to the same receiver one at a time (the HTTP
   ceiling of the receiver on this machine);
4. the plain phases again: the reference is before and after together.

Ratios: delivered (hooks) / plain sends, same concurrency; a ratio ≥ 0.9 means the hook does
not slow the room down (the bridge keeps pace). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mail_to_matrix import (  # noqa: E402
    mean_rate,
)
from bench.measure import (  # noqa: E402
    code_version,
    disturbed_phases,
    find_pid,
    percentile,
    temp_folder,
)
from bench.webhooks import KEY, CpuMeter, in_flight, per_message, start_servers  # noqa: E402
from bridge.harness.ports import free_port  # noqa: E402
from bridge.harness.synapse import MatrixTestClient  # noqa: E402
from bridge.webhooks.signature import sign, verify_headers  # noqa: E402

TARGET = 0.9
PHASES = ("oseq", "ok")


@dataclass
class Receiver:
    """The legacy system: keeps (receive time, text) per hook; a bad signature is a 401 and
    counted."""

    port: int
    got: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    bad: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            verify_headers(KEY, request.headers, body, now=time.time(), tolerance=300)
        except Exception:
            self.bad += 1
            return web.Response(status=401)
        data = json.loads(body).get("data", {})
        self.got.setdefault(request.match_info["name"], []).append(
            (time.time(), str(data.get("text", "")))
        )
        return web.Response(status=204)

    async def wait_for(self, name: str, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while len(self.got.get(name, [])) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {len(self.got.get(name, []))} of {count} delivered")
            await asyncio.sleep(0.05)


def text(tag: str, seq: int, round_: int = 0) -> str:
    return f"Ticket {tag}-{round_}-{seq:05d}: printer on fire on floor {seq % 7}, please come."


@dataclass
class Bench:
    alice: MatrixTestClient
    rooms: dict[str, str]
    receiver: Receiver
    meter: CpuMeter
    count: int
    round: int = 0  # warm-up 0, measured 1: the texts differ

    async def send_all(self, tag: str, concurrency: int) -> tuple[list[float], list[float]]:
        """Alice's N messages into the room `tag`: (start, return) times of each send."""
        room = self.rooms[tag]
        starts = [0.0] * self.count
        ends = [0.0] * self.count

        async def one(seq: int) -> None:
            starts[seq] = time.time()
            await self.alice.send_text(room, text(tag, seq, self.round))
            ends[seq] = time.time()

        await in_flight(self.count, concurrency, one)
        return starts, ends

    async def plain(self, tag: str, concurrency: int) -> dict[str, Any]:
        self.meter.start()
        starts, ends = await self.send_all(tag, concurrency)
        cpu = self.meter.stop()
        elapsed = max(ends) - min(starts)
        return {
            "rate": round(self.count / elapsed, 2),
            "sends": self.count,
            "elapsed_s": round(elapsed, 3),
            "cpu_s": cpu,
            "cpu_ms": per_message(cpu, self.count),
        }

    async def hooks(self, tag: str, concurrency: int) -> dict[str, Any]:
        self.meter.start()
        starts, ends = await self.send_all(tag, concurrency)
        await self.receiver.wait_for(tag, self.count)
        cpu = self.meter.stop()
        got = self.receiver.got[tag]
        texts = [t for _, t in got]
        wanted = [text(tag, seq, self.round) for seq in range(self.count)]
        when = {t: at for at, t in got}
        latencies = [when[t] - ends[seq] for seq, t in enumerate(wanted) if t in when]
        duplicates = len(texts) - len(set(texts))
        order_ok = True
        if concurrency == 1:
            order_ok = texts == wanted
        return {
            "sent_rate": round(self.count / (max(ends) - min(starts)), 2),
            "delivered_rate": round(self.count / (max(at for at, _ in got) - min(starts)), 2),
            "latency_ms": {
                "p50": round(1000 * (percentile(latencies, 50) or 0), 1),
                "p99": round(1000 * (percentile(latencies, 99) or 0), 1),
            },
            "missing": len(set(wanted) - set(texts)),
            "duplicates": duplicates,
            "in_order": order_ok,
            "cpu_s": cpu,
            "cpu_ms": per_message(cpu, self.count),
        }

    async def raw(self, port: int) -> dict[str, Any]:
        """The same deliveries, POSTed by this script directly, one at a time."""
        self.meter.start()
        async with aiohttp.ClientSession() as session:
            begin = time.time()
            for seq in range(self.count):
                body = json.dumps({"type": "message.created", "data": {"text": text("raw", seq)}})
                webhook_id = f"msg_{uuid.uuid4().hex}"
                ts = int(time.time())
                headers = {
                    "content-type": "application/json",
                    "webhook-id": webhook_id,
                    "webhook-timestamp": str(ts),
                    "webhook-signature": sign(KEY, webhook_id, ts, body.encode()),
                }
                url = f"http://127.0.0.1:{port}/legacy/raw"
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
            elapsed = time.time() - begin
        cpu = self.meter.stop()
        return {"rate": round(self.count / elapsed, 2), "cpu_s": cpu}


async def run(
    args: argparse.Namespace, folder: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    port = free_port()
    receiver = Receiver(port)
    app = web.Application()
    app.router.add_post("/legacy/{name}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        servers = await asyncio.to_thread(
            start_servers,
            folder,
            (),
            ("pseq", "pk", "warm"),
            (),
            stack,
            outgoing={tag: f"http://127.0.0.1:{port}/legacy/{tag}" for tag in PHASES},
            egress=[f"http://127.0.0.1:{port}/legacy"],
        )
        synapse_pid = find_pid(str(servers.synapse.config_path))
        bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
        results: dict[str, Any] = {"messages": args.messages, "concurrency": args.concurrency}
        async with MatrixTestClient(
            servers.synapse.base_url, servers.alice_token, servers.alice_id
        ) as alice:
            bot = servers.bridge.config.bot_mxid
            for room_id in servers.rooms.values():
                await alice.wait_for_membership(room_id, bot, "join", timeout=60)
            bench = Bench(alice, servers.rooms, receiver, CpuMeter(synapse_pid, bridge_pid), 0)
            # Warm-up, unmeasured: Synapse's first sends, the hooks' first connections.
            bench.count = args.warmup
            await bench.send_all("warm", 1)
            for tag in PHASES:
                await bench.send_all(tag, 1)
                await receiver.wait_for(tag, args.warmup)
            receiver.got.clear()
            bench.round = 1
            await asyncio.sleep(2)

            bench.count = args.messages
            k = args.concurrency
            print(f"plain, {args.messages} messages", flush=True)
            results["plain_seq"] = await bench.plain("pseq", 1)
            results["plain_k"] = await bench.plain("pk", k)
            print("hooks", flush=True)
            # The hooked rooms hold the warm-up's messages: count only this phase's.
            results["hooks_seq"] = await bench.hooks("oseq", 1)
            results["hooks_k"] = await bench.hooks("ok", k)
            print("raw POSTs", flush=True)
            results["raw"] = await bench.raw(port)
            print("plain again", flush=True)
            results["plain_seq_after"] = await bench.plain("pseq", 1)
            results["plain_k_after"] = await bench.plain("pk", k)
        seq_ref = mean_rate(results["plain_seq"], results["plain_seq_after"])
        k_ref = mean_rate(results["plain_k"], results["plain_k_after"])
        results["ratio_seq"] = round(results["hooks_seq"]["delivered_rate"] / seq_ref, 3)
        results["ratio_k"] = round(results["hooks_k"]["delivered_rate"] / k_ref, 3)
        results["ratio_raw"] = round(
            results["hooks_seq"]["delivered_rate"] / results["raw"]["rate"], 3
        )
        results["bad_signatures"] = receiver.bad
        results["target"] = TARGET
        results["disturbed"] = disturbed_phases(results)
        results["code"] = code_version()
        return results
    finally:
        await runner.cleanup()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        results = asyncio.run(run(args, folder, stack))
    for key in ("plain_seq", "plain_k", "plain_seq_after", "plain_k_after", "raw"):
        print(f"{key:16s} {results[key]['rate']:8.2f} /s")
    for key in ("hooks_seq", "hooks_k"):
        r = results[key]
        print(
            f"{key:16s} sent {r['sent_rate']:.2f}/s delivered {r['delivered_rate']:.2f}/s "
            f"p50 {r['latency_ms']['p50']} ms p99 {r['latency_ms']['p99']} ms "
            f"missing {r['missing']} duplicates {r['duplicates']} in order {r['in_order']} "
            f"CPU ms/msg synapse {r['cpu_ms']['synapse']} bridge {r['cpu_ms']['bridge']}"
        )
    for key in ("ratio_seq", "ratio_k"):
        verdict = "ok" if results[key] >= TARGET else "MISSED"
        print(f"{key}: {results[key]} ({verdict}, target {TARGET})")
    print(json.dumps(results, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
