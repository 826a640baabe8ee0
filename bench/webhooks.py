#!/usr/bin/env python3
"""Inbound webhooks: accepted hooks/s and hook → event latency, as ratios to plain Matrix sends.

Starts its own Synapse (with the bridge's registration) and `python -m bridge run` with one
config hook per measured phase, each into its own room, on 127.0.0.1 with free ports and a
temporary directory; measures, prints, stops everything:

    python bench/webhooks.py [--hooks 300] [--rates 10,20,40,80] [--concurrency 8]

Phases, all in one run against the same servers:

1. plain: a client sends N messages (the hooks' text) into a room one at a time, then N with K
   in flight into another room, then N one at a time into a room the bot is in (Synapse pushes
   those to the appservice, as it does a ghost's message: the fair reference);
2. hooks: the same N messages POSTed as signed Standard Webhooks requests, one at a time, at
   each offered rate of --rates (open loop: a request is sent at its time whatever the earlier
   ones are doing), and with K in flight; accepted rate (202s), relay rate (events), latency
   (202 → the event's origin_server_ts), every hook once and in order;
3. scrape cost: the K-in-flight hooks again while /metrics (or /health when this checkout has
   no /metrics: then `metrics` is null) is fetched every 100 ms, then once more unscraped;
   scrape times, the bridge's CPU per scrape and the relay rate with scraping against without;
   with --pairs P, P pairs of one-at-a-time phases (plain into a room the bot is in, hooks);
4. the plain phases again: the reference is before and after together.

--diagnose splits the time between two hooks posted one at a time into the homeserver's answer
to the send and the bridge's own time; --profile DIR attaches py-spy to Synapse and the bridge.

Rates: plain = sends / wall-clock time of the sends; relay = hooks / (origin_server_ts of the
last event - start of the first POST); accepted = hooks / (last 202 - start of the first POST).
The bridge posts without `?ts=`, so origin_server_ts is Synapse's receive time. The last line
printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

# `tests` is not an installed package: import the test harness from this checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.mail_to_matrix import (  # noqa: E402
    marker,
    mean_rate,
    verdict,
)
from bench.measure import (  # noqa: E402
    BUSY_CORES,
    Profiler,
    add_run_options,
    code_version,
    disturbed_phases,
    find_pid,
    percentile,
    profile_summaries,
    temp_folder,
)
from bench.relay_diagnosis import (  # noqa: E402
    diagnose_log as relay_diagnose_log,
)
from bench.rooms import (  # noqa: E402
    MARKER_RE,
    SyncWatcher,
    room_history,
)
from bench.webhooks_servers import (  # noqa: E402
    KEY,
    CpuMeter,
    Servers,
    per_message,
    start_servers,
)
from bridge.harness.synapse import MatrixTestClient  # noqa: E402
from bridge.webhooks.signature import sign  # noqa: E402

# Issue 7: a relayed hook at >= 0.9 of a plain client's send rate.
TARGET = 0.9

SCRAPE_EVERY = 0.1  # seconds between two scrapes in phase 3


def hook_text(tag: str, seq: int) -> str:
    """The text of message `seq`: the plain phases send the same words."""
    return (
        f"Build {seq} failed\n\nThe pipeline stopped at step {marker(tag, seq)}; "
        "see the logs before Friday."
    )


# --- posting ----------------------------------------------------------------------------------


@dataclass
class Posted:
    start: float  # Unix seconds
    end: float
    status: int


class Poster:
    """Signed POSTs to the bridge's hooks over one connection pool."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self.base_url = base_url
        self.session = session

    async def post(self, hook: str, tag: str, seq: int) -> Posted:
        body = json.dumps({"text": hook_text(tag, seq)}).encode()
        webhook_id = f"msg_{tag}_{seq}_{uuid.uuid4().hex}"
        ts = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(KEY, webhook_id, ts, body),
        }
        begin = time.time()
        try:
            async with self.session.post(
                f"{self.base_url}/webhooks/v1/{hook}", data=body, headers=headers
            ) as response:
                await response.read()
                status = response.status
        except aiohttp.ClientError:
            status = 0
        return Posted(begin, time.time(), status)


async def in_flight(count: int, concurrency: int, one: Callable[[int], Awaitable[Any]]) -> None:
    """`one(seq)` for seq 0..count-1, in order, `concurrency` at a time."""
    counter = iter(range(count))

    async def worker() -> None:
        for seq in counter:
            await one(seq)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def metric_families(text: str) -> int:
    """How many metric families a /metrics answer holds; ValueError if it is not valid
    Prometheus text format."""
    return sum(1 for _ in text_string_to_metric_families(text))


async def scrape_loop(
    session: aiohttp.ClientSession,
    url: str,
    times_ms: list[float],
    failed: list[float],
    stop: asyncio.Event,
    *,
    parse: bool,
) -> None:
    """GET `url` every SCRAPE_EVERY seconds until `stop`; the time of each answer read whole.
    With `parse`, every answer is then checked with prometheus_client's parser, after the
    phase: parsing is the scraper's cost, and this process shares the machine with the relay."""
    answers: list[tuple[int, str]] = []
    while not stop.is_set():
        begin = time.monotonic()
        try:
            async with session.get(url) as response:
                answers.append((response.status, await response.text()))
        except aiohttp.ClientError:
            failed.append(time.time())
        else:
            times_ms.append((time.monotonic() - begin) * 1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                stop.wait(), max(0.0, SCRAPE_EVERY - (time.monotonic() - begin))
            )
    if parse:
        for status, text in answers:
            try:
                if status != 200 or not metric_families(text):
                    raise ValueError(f"status {status}")
            except ValueError:
                failed.append(time.time())


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Bench:
    servers: Servers
    alice: MatrixTestClient
    poster: Poster
    meter: CpuMeter
    count: int

    @property
    def bot(self) -> str:
        return self.servers.bridge.config.bot_mxid

    async def plain(self, name: str, concurrency: int) -> dict[str, Any]:
        room_id = self.servers.rooms[name]
        watcher = SyncWatcher(self.alice, {room_id: name})
        await watcher.begin()
        send_ms: list[float] = []

        async def one(seq: int) -> None:
            begin = time.monotonic()
            await self.alice.send_text(room_id, hook_text(name, seq), extra={"m.mentions": {}})
            send_ms.append((time.monotonic() - begin) * 1000)

        self.meter.start(name)
        watching = asyncio.create_task(watcher.wait(self.count, 120 + self.count * 0.3))
        start = time.monotonic()
        await in_flight(self.count, concurrency, one)
        elapsed = time.monotonic() - start
        complete = await watching
        cpu = self.meter.stop()
        seqs = [
            int(m.group(2))
            for e in await room_history(self.alice, room_id)
            if (m := MARKER_RE.search(str(e["content"].get("body", "")))) and m.group(1) == name
        ]
        return {
            "in_flight": concurrency,
            "sends": self.count,
            "elapsed_s": round(elapsed, 2),
            "rate_per_s": round(self.count / elapsed, 2),
            "send_p50_ms": round(percentile(send_ms, 50) or 0, 1),
            "send_p99_ms": round(percentile(send_ms, 99) or 0, 1),
            "all_seen": complete and sorted(seqs) == list(range(self.count)),
            "cpu_s": cpu,
            "cpu_ms_per_message": per_message(cpu, self.count),
        }

    async def hooks(
        self,
        name: str,
        *,
        rate: float | None = None,
        concurrency: int = 1,
        scrape_url: str | None = None,
    ) -> dict[str, Any]:
        """N hooks to hook `name`: at `rate` per second (open loop) or `concurrency` in flight
        back to back; wait until every one is in its room, then check them."""
        room_id = self.servers.rooms[name]
        watcher = SyncWatcher(self.alice, {room_id: name})
        await watcher.begin()
        posted: dict[int, Posted] = {}

        async def one(seq: int) -> None:
            posted[seq] = await self.poster.post(name, name, seq)

        scrapes: list[float] = []
        failed: list[float] = []
        stop = asyncio.Event()
        self.meter.start(name)
        scraper = (
            asyncio.create_task(
                scrape_loop(
                    self.poster.session,
                    scrape_url,
                    scrapes,
                    failed,
                    stop,
                    parse=scrape_url.endswith("/metrics"),
                )
            )
            if scrape_url
            else None
        )
        watching = asyncio.create_task(watcher.wait(self.count, 120 + self.count * 0.3))
        if rate is None:
            await in_flight(self.count, concurrency, one)
        else:
            t0 = time.monotonic()
            tasks = []
            for seq in range(self.count):
                delay = t0 + seq / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(seq)))
            await asyncio.gather(*tasks)
        complete = await watching
        stop.set()
        cpu = self.meter.stop()
        if scraper is not None:
            await scraper  # the answers parsed: not in the phase's CPU

        accepted = {seq: p for seq, p in posted.items() if p.status == 202}
        statuses: dict[str, int] = {}
        for p in posted.values():
            statuses[str(p.status)] = statuses.get(str(p.status), 0) + 1
        ghost = self.servers.bridge.config.hook_ghost_mxid(name)
        events = [
            (int(m.group(2)), int(e["origin_server_ts"]))
            for e in await room_history(self.alice, room_id)
            if e.get("sender") == ghost
            and (m := MARKER_RE.search(str(e["content"].get("body", ""))))
            and m.group(1) == name
        ]
        counts: dict[int, int] = {}
        ts: dict[int, int] = {}
        order: list[int] = []
        for seq, origin in events:
            counts[seq] = counts.get(seq, 0) + 1
            if seq not in ts:
                ts[seq] = origin
                order.append(seq)
        # In order: a hook accepted (202) before another was sent must come first. Requests in
        # flight together have no order of their own.
        out_of_order = sum(
            1
            for i, later in enumerate(order)
            for earlier in order[i + 1 :]
            if earlier in posted and later in posted and posted[earlier].end < posted[later].start
        )
        first_start = min(p.start for p in posted.values())
        last_accept = max((p.end for p in accepted.values()), default=first_start)
        latencies = [ts[seq] - 1000 * p.end for seq, p in accepted.items() if seq in ts]
        relay_s = (max(ts.values()) / 1000 - first_start) if ts else 0.0
        post_ms = [1000 * (p.end - p.start) for p in posted.values()]
        result: dict[str, Any] = {
            "offered_per_s": rate,
            "in_flight": None if rate is not None else concurrency,
            "hooks": self.count,
            "statuses": statuses,
            "errors": self.count - len(accepted),
            "accepted_per_s": round(len(accepted) / max(last_accept - first_start, 1e-6), 2),
            "rate_per_s": round(len(ts) / relay_s, 2) if relay_s > 0 else 0.0,
            "post_p50_ms": round(percentile(post_ms, 50) or 0, 1),
            "post_p99_ms": round(percentile(post_ms, 99) or 0, 1),
            "latency_p50_ms": round(percentile(latencies, 50) or 0, 1),
            "latency_p99_ms": round(percentile(latencies, 99) or 0, 1),
            "duplicates": sum(n - 1 for n in counts.values()),
            "missing": len([seq for seq in accepted if seq not in ts]),
            "out_of_order": out_of_order,
            "all_seen": complete,
            "cpu_s": cpu,
            "cpu_ms_per_message": per_message(cpu, self.count),
        }
        if scrape_url:
            result["scrapes"] = len(scrapes)
            result["scrape_errors"] = len(failed)
            result["scrape_p50_ms"] = round(percentile(scrapes, 50) or 0, 2)
            result["scrape_p99_ms"] = round(percentile(scrapes, 99) or 0, 2)
        return result


def diagnose_log(text: str, since: float, until: float) -> dict[str, Any]:
    """From a --diagnose bridge log: the gap between two hooks posted in a room, and the
    homeserver's answer time to the send inside it; the difference is the bridge's own time
    on the relay's path (its other work, the POSTs and their commits, runs beside it)."""
    return relay_diagnose_log(text, since, until, _posted_hook)


def _posted_hook(message: str) -> bool:
    return message.startswith("webhook ") and " posted as " in message


def describe(label: str, r: dict[str, Any]) -> None:
    cpu = r["cpu_ms_per_message"]
    line = f"  {label:<24} {r['rate_per_s']:>7}/s"
    if "accepted_per_s" in r:
        line += (
            f" (accepted {r['accepted_per_s']}/s, errors {r['errors']}), latency p50 "
            f"{r['latency_p50_ms']} ms p99 {r['latency_p99_ms']} ms, dup {r['duplicates']} "
            f"missing {r['missing']} out of order {r['out_of_order']}"
        )
    else:
        line += f" (send p50 {r['send_p50_ms']} ms, p99 {r['send_p99_ms']} ms)"
    line += (
        f"; CPU ms/msg synapse {cpu['synapse']} bridge {cpu['bridge']} bench {cpu['bench']} "
        f"others {cpu['others']}"
    )
    if "scrape_p50_ms" in r:
        line += f"; {r['scrapes']} scrapes p50 {r['scrape_p50_ms']} ms p99 {r['scrape_p99_ms']} ms"
    print(line, flush=True)


async def pairs(bench: Bench, count: int) -> list[dict[str, Any]]:
    """`count` pairs of one-at-a-time phases, a plain client into a room the bot is in and
    hooks, back to back (in turn plain first and hooks first): on a machine whose speed
    drifts, each pair's ratio compares like with like."""
    found = []
    for i in range(count):
        if i % 2:
            hooks = await bench.hooks(f"hpair{i}", concurrency=1)
            plain = await bench.plain(f"pbpair{i}", 1)
        else:
            plain = await bench.plain(f"pbpair{i}", 1)
            hooks = await bench.hooks(f"hpair{i}", concurrency=1)
        pair = {
            "plain_bot_room_per_s": plain["rate_per_s"],
            "hooks_per_s": hooks["rate_per_s"],
            "ratio": round(hooks["rate_per_s"] / plain["rate_per_s"], 3),
            "others_cores": [
                round(r["cpu_s"]["others"] / max(r["cpu_s"]["wall"], 1e-6), 2)
                for r in (plain, hooks)
            ],
            "cpu_ms_per_message": {
                "plain": {k: plain["cpu_ms_per_message"][k] for k in ("synapse", "bridge")},
                "hooks": {k: hooks["cpu_ms_per_message"][k] for k in ("synapse", "bridge")},
            },
            "errors": hooks["errors"] + hooks["duplicates"] + hooks["missing"],
            "out_of_order": hooks["out_of_order"],
        }
        print(f"  pair {i}: {pair}", flush=True)
        found.append(pair)
    return found


def rate_name(rate: float) -> str:
    return f"hr{rate:g}".replace(".", "d")


async def run(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    synapse_pid = find_pid(str(servers.synapse.config_path))
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    results: dict[str, Any] = {
        "hooks": args.hooks,
        "rates": args.rates,
        "concurrency": args.concurrency,
    }
    base = servers.bridge.base_url
    async with (
        MatrixTestClient(servers.synapse.base_url, servers.alice_token, servers.alice_id) as alice,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
    ):
        bench = Bench(
            servers,
            alice,
            Poster(base, session),
            CpuMeter(synapse_pid, bridge_pid, Profiler(args.profile)),
            args.hooks,
        )
        bot = bench.bot
        for name, room_id in servers.rooms.items():
            if name.startswith(("h", "pb")):
                await alice.wait_for_membership(room_id, bot, "join", timeout=60)
        # Warm-up, unmeasured: Synapse's first sends are slower; each hook's ghost is registered
        # and joined by its first request.
        warm = await alice.create_room(name="warm-up")
        for seq in range(args.warmup):
            await alice.send_text(warm, f"warm-up {seq}")
        for name in servers.rooms:
            if name.startswith("h"):
                posted = await bench.poster.post(name, "warm", 0)
                if posted.status != 202:
                    raise RuntimeError(f"hook {name} refused the warm-up: {posted.status}")
        for name, room_id in servers.rooms.items():
            if name.startswith("h"):
                ghost = servers.bridge.config.hook_ghost_mxid(name)
                await alice.wait_for_event(
                    room_id, lambda e, g=ghost: e.get("sender") == g, timeout=60
                )
        await asyncio.sleep(2)

        k = args.concurrency
        print(f"phase 1: plain, {args.hooks} messages", flush=True)
        results["plain_seq"] = r = await bench.plain("pseq", 1)
        describe("plain, 1 in flight", r)
        results["plain_k"] = r = await bench.plain("pk", k)
        describe(f"plain, {k} in flight", r)
        results["plain_seq_bot_room"] = r = await bench.plain("pbseq", 1)
        describe("plain, 1 in flight, bot's room", r)

        print(f"phase 2: hooks, {args.hooks} requests", flush=True)
        window = time.time()
        results["hooks_seq"] = r = await bench.hooks("hseq", concurrency=1)
        describe("hooks, 1 in flight", r)
        if args.diagnose:
            results["diagnosis_seq"] = diag = diagnose_log(
                servers.bridge.log_text(), window, time.time()
            )
            print(f"  diagnosis (hooks, 1 in flight): {diag}", flush=True)
        for rate in args.rates:
            results[f"hooks_{rate_name(rate)[1:]}"] = r = await bench.hooks(
                rate_name(rate), rate=rate
            )
            describe(f"hooks, offered {rate:g}/s", r)
        results["hooks_k"] = r = await bench.hooks("hk", concurrency=k)
        describe(f"hooks, {k} in flight", r)

        print("phase 3: scrape cost", flush=True)
        async with session.get(base + "/metrics") as response:
            metrics_text = await response.text()
            metrics_status = response.status
        if metrics_status == 404:
            results["metrics"] = None
            results["scrape_endpoint"] = "/health"
            results["scrape_note"] = (
                "no /metrics in this checkout (404): /health scraped instead, as a placeholder"
            )
        else:
            if metrics_status != 200:
                raise RuntimeError(f"/metrics answered {metrics_status}")
            results["metrics"] = {
                "status": metrics_status,
                "bytes": len(metrics_text.encode()),
                "families": metric_families(metrics_text),  # ValueError: not valid
            }
            results["scrape_endpoint"] = "/metrics"
        print(f"  scraping {results['scrape_endpoint']} every {SCRAPE_EVERY * 1000:g} ms")
        results["hooks_k_scraped"] = scraped = await bench.hooks(
            "hscrape", concurrency=k, scrape_url=base + results["scrape_endpoint"]
        )
        describe(f"hooks, {k} in flight, scraped", scraped)
        results["hooks_k_after"] = r = await bench.hooks("hkafter", concurrency=k)
        describe(f"hooks, {k} in flight (after)", r)

        if args.pairs:
            print(f"pairs: plain into a room the bot is in, and hooks, {args.pairs} times")
            results["pairs"] = await pairs(bench, args.pairs)
            ratios = [pair["ratio"] for pair in results["pairs"]]
            results["ratio_seq_bot_room_pairs_median"] = statistics.median(ratios)

        # The plain reference again: a drift in the machine's speed weighs on both sides.
        print("plain again", flush=True)
        results["plain_seq_after"] = r = await bench.plain("pseqafter", 1)
        describe("plain, 1 in flight (after)", r)
        results["plain_k_after"] = r = await bench.plain("pkafter", k)
        describe(f"plain, {k} in flight (after)", r)
        results["plain_seq_bot_room_after"] = r = await bench.plain("pbseqafter", 1)
        describe("plain, 1 in flight, bot's room (after)", r)
        if results["metrics"] is not None:
            results["metrics"].update(
                {
                    key: scraped[key]
                    for key in ("scrapes", "scrape_errors", "scrape_p50_ms", "scrape_p99_ms")
                }
            )

    results["plain_seq_rate_per_s"] = plain_seq = mean_rate(
        results["plain_seq"], results["plain_seq_after"]
    )
    results["plain_k_rate_per_s"] = plain_k = mean_rate(
        results["plain_k"], results["plain_k_after"]
    )
    results["plain_seq_bot_room_rate_per_s"] = plain_bot = mean_rate(
        results["plain_seq_bot_room"], results["plain_seq_bot_room_after"]
    )
    # The fair reference keeps order as the relay must (one send at a time); ratio_seq_bot_room
    # also makes Synapse push each event to the appservice, as it does for a ghost's message.
    results["ratio_seq"] = round(results["hooks_seq"]["rate_per_s"] / plain_seq, 3)
    results["ratio_seq_bot_room"] = round(results["hooks_seq"]["rate_per_s"] / plain_bot, 3)
    results["ratio_k"] = round(results["hooks_k"]["rate_per_s"] / plain_k, 3)
    results["ratio_k_vs_plain_seq"] = round(results["hooks_k"]["rate_per_s"] / plain_seq, 3)
    # Scraped against the unscraped runs just before and after it.
    unscraped = (results["hooks_k"]["rate_per_s"] + results["hooks_k_after"]["rate_per_s"]) / 2
    results["scrape_rate_ratio"] = round(results["hooks_k_scraped"]["rate_per_s"] / unscraped, 3)
    # The bridge's CPU per scrape: its CPU in the scraped phase above the mean of the two
    # unscraped ones (the same number of hooks), shared among the scrapes.
    scraped = results["hooks_k_scraped"]
    extra = scraped["cpu_s"]["bridge"] - (
        (results["hooks_k"]["cpu_s"]["bridge"] + results["hooks_k_after"]["cpu_s"]["bridge"]) / 2
    )
    results["scrape_bridge_cpu_ms"] = (
        round(1000 * extra / scraped["scrapes"], 2) if scraped.get("scrapes") else None
    )
    results["disturbed"] = disturbed_phases(results)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--hooks", type=int, default=300, help="messages per phase")
    parser.add_argument(
        "--rates",
        type=lambda text: [float(v) for v in text.split(",") if v.strip()],
        default=[10.0, 20.0, 40.0, 80.0],
        help="offered hook rates per second, comma-separated (open loop)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight in the unbounded phases"
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="unmeasured sends first, to warm Synapse up"
    )
    add_run_options(parser)  # --keep, --profile DIR (py-spy per phase), --native
    parser.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="then P pairs of one-at-a-time phases, plain into a room the bot is in and hooks "
        "(the median of their ratios: ratio_seq_bot_room_pairs_median)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="log the bridge's homeserver requests (DEBUG) and split the time between two "
        "posts of the one-at-a-time phase into the send and the rest (not for the ratios)",
    )
    args = parser.parse_args(argv)
    if args.hooks < 1 or args.concurrency < 1 or args.warmup < 0 or args.pairs < 0:
        parser.error("counts must be positive")
    if any(rate <= 0 for rate in args.rates):
        parser.error("rates must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    code = code_version()
    plain = ["pseq", "pk", "pseqafter", "pkafter"]
    bot_rooms = ["pbseq", "pbseqafter", *(f"pbpair{i}" for i in range(args.pairs))]
    hooks = [
        "hseq",
        *(rate_name(rate) for rate in args.rates),
        "hk",
        "hscrape",
        "hkafter",
        *(f"hpair{i}" for i in range(args.pairs)),
    ]
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        print(f"starting Synapse and the bridge in {folder}", flush=True)
        servers = start_servers(folder, plain, bot_rooms, hooks, stack, diagnose=args.diagnose)
        try:
            results = asyncio.run(run(servers, args))
        except BaseException:
            print(f"--- bridge log tail ---\n{servers.bridge.log_tail(40)}", file=sys.stderr)
            raise
        results["bridge_log_errors"] = sum(
            "ERROR" in line or "Traceback" in line
            for line in servers.bridge.log_text().splitlines()
        )
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    results["code"] = code

    print()
    print(
        "plain reference (mean of before and after): 1 in flight "
        f"{results['plain_seq_rate_per_s']}/s, {args.concurrency} in flight "
        f"{results['plain_k_rate_per_s']}/s"
    )
    for key, value in results.items():
        if key.startswith("hooks_") and isinstance(value, dict):
            print(
                f"{key}: accepted {value['accepted_per_s']}/s, relayed {value['rate_per_s']}/s, "
                f"hook -> event p50 {value['latency_p50_ms']} ms p99 {value['latency_p99_ms']} ms"
            )
    print(
        "plain reference, 1 in flight into a room the bot is in: "
        f"{results['plain_seq_bot_room_rate_per_s']}/s"
    )
    for key, label in (
        ("ratio_seq", "1 in flight / plain 1 in flight"),
        ("ratio_seq_bot_room", "1 in flight / plain 1 in flight into a room the bot is in"),
        ("ratio_k", f"{args.concurrency} in flight / plain {args.concurrency} in flight"),
        ("ratio_k_vs_plain_seq", f"{args.concurrency} in flight / plain 1 in flight"),
    ):
        print(
            f"hook relay/plain ({label}): {results[key]:.2f} (target >= {TARGET}) "
            f"{verdict(results[key], TARGET)}"
        )
    if "ratio_seq_bot_room_pairs_median" in results:
        print(
            "hook relay/plain into a room the bot is in, 1 in flight, median of "
            f"{len(results['pairs'])} pairs: {results['ratio_seq_bot_room_pairs_median']:.2f} "
            f"({', '.join(str(pair['ratio']) for pair in results['pairs'])})"
        )
    scraped = results["hooks_k_scraped"]
    print(
        f"scrape of {results['scrape_endpoint']} under load: p50 {scraped['scrape_p50_ms']} ms, "
        f"p99 {scraped['scrape_p99_ms']} ms, bridge CPU {results['scrape_bridge_cpu_ms']} ms "
        f"each; relay rate scraped / not {results['scrape_rate_ratio']:.2f}"
        + ("" if results["metrics"] is not None else f" ({results['scrape_note']})")
    )
    problems = [
        f"{key}: {value[k]} {k}"
        for key, value in results.items()
        if isinstance(value, dict) and "duplicates" in value
        for k in ("errors", "duplicates", "missing", "out_of_order")
        if value[k]
    ]
    print("errors, order and once-only: " + ("; ".join(problems) if problems else "ok"))
    if args.profile is not None:
        results["profiles"] = profile_summaries(args.profile)
    if results["disturbed"]:
        print(
            "WARNING: other processes on this machine used more than "
            f"{BUSY_CORES} cores during {', '.join(results['disturbed'])} "
            f"(cores used: {results['disturbed']}); those numbers are unreliable"
        )
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
