#!/usr/bin/env python3
"""Remote relay throughput and latency of the bridge, as ratios to a naive copy bot.

Starts two Synapses (the agency's, "localhost", with the bridge's registration; another
ministry's, "ministere.localhost", with none), `python -m bridge run` with that ministry as a
remote, and a naive copy bot in a process of its own, all on 127.0.0.1 with free ports and a
temporary directory; measures, prints, stops everything:

    python bench/remote_relay.py [--n 300] [--latency 50] [--pace 0.2]

Two pairs of rooms, one agency room and one ministry room each: the first linked by the bridge
(`!passerelle link-remote`), the second copied by the bot, a plain client with an ordinary
account on each server that reads each side's /sync and re-sends every message to the other side
with PUT /send, one at a time, in order. Both directions, in the same run:

1. throughput: a person sends N messages as fast as one client can (one at a time); rate = N /
   (the last copy seen on the other side - start of the first send). The bot runs before and
   after the bridge's turn; the reference is both together.
2. latency: K messages S seconds apart. Added latency = when a reader's /sync on the other side
   saw the copy - when the sender's own /sync saw the original.

"Seen" is a client's /sync long-poll answering (the bridge stamps ghost messages with the
remote's origin_server_ts, so the copies' timestamps cannot be used). CPU per message for the
bridge, both Synapses, the bot, the benchmark and other processes in each phase. The last line
printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# `bench` and `tests` are not installed packages: import them from this checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.copy_bot import BotProcess, BotSide, timeline_filter  # noqa: E402
from bench.mail_to_matrix import (  # noqa: E402
    marker,
    mean_rate,
)
from bench.matrix_to_mail import ms_stats, with_cpu  # noqa: E402
from bench.measure import (  # noqa: E402
    BUSY_CORES,
    CpuMeter,
    Probes,
    Profiler,
    add_run_options,
    code_version,
    disturbed_phases,
    find_pid,
    process_cpu,
    profile_summaries,
    temp_folder,
)
from bench.rooms import (  # noqa: E402
    MARKER_RE,
)
from bridge.config import read_yaml_file  # noqa: E402
from bridge.harness.ports import free_port  # noqa: E402
from bridge.harness.synapse import MatrixTestClient, SynapseServer  # noqa: E402
from bridge.registration import atomic_write, dump_yaml, generate_registration  # noqa: E402
from tests.conftest import BridgeProcess, bridge_config_dict  # noqa: E402
from tests.e2e.test_bot import message_from, replies_to  # noqa: E402

RATE_TARGET = 0.9  # bridge relay rate / bot relay rate
LATENCY_TARGET_MS = 50.0  # p50 of the bridge's added latency (copy seen - original seen)
REMOTE = "ministere"
MINISTRY_SERVER_NAME = "ministere.localhost"
BRIDGE_REMOTE_LOCALPART = "passerelle-agence"
READER_POLL_MS = 10_000  # under MatrixTestClient's 30 s request timeout
DIRECTIONS = {"r2a": "remote -> agency", "a2r": "agency -> remote"}


def message_text(tag: str, seq: int) -> str:
    return f"Point {marker(tag, seq)} : la réunion de coordination est confirmée pour jeudi."


def password(localpart: str) -> str:
    return "pw-" + localpart


# --- readers ------------------------------------------------------------------------------------


class Reader:
    """One client's /sync long-poll over some rooms: when each marked message was first seen
    there (the moment the /sync answer arrived), and in which order."""

    def __init__(self, client: MatrixTestClient, rooms: Sequence[str]) -> None:
        self.client = client
        self.rooms = list(rooms)
        self.seen: dict[tuple[str, str], dict[int, list[float]]] = {}  # (room, tag) -> seq
        self.order: dict[tuple[str, str], list[int]] = {}
        self.limited = 0
        self._filter = timeline_filter(self.rooms, 1000)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        response = await self.client.request(
            "GET",
            "/_matrix/client/v3/sync",
            params={"filter": self._filter, "timeout": "0"},
        )
        self._task = asyncio.create_task(self._loop(str(response["next_batch"])))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, since: str) -> None:
        while True:
            params = {"filter": self._filter, "timeout": str(READER_POLL_MS), "since": since}
            response = await self.client.request("GET", "/_matrix/client/v3/sync", params=params)
            now = time.time()
            since = str(response["next_batch"])
            joined = (response.get("rooms") or {}).get("join") or {}
            for room_id, room in joined.items():
                timeline = room.get("timeline") or {}
                if timeline.get("limited"):
                    self.limited += 1
                for event in timeline.get("events") or []:
                    body = str((event.get("content") or {}).get("body", ""))
                    if match := MARKER_RE.search(body):
                        key = (room_id, match.group(1))
                        seq = int(match.group(2))
                        self.seen.setdefault(key, {}).setdefault(seq, []).append(now)
                        self.order.setdefault(key, []).append(seq)

    def times(self, room_id: str, tag: str) -> dict[int, list[float]]:
        return self.seen.get((room_id, tag), {})

    def first(self, room_id: str, tag: str, seq: int) -> float | None:
        times = self.times(room_id, tag).get(seq)
        return min(times) if times else None

    async def wait(self, room_id: str, tag: str, count: int, timeout: float) -> bool:
        """Until `count` distinct messages of `tag` were seen in the room; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.times(room_id, tag)) < count:
            if self._task is not None and self._task.done():
                self._task.result()  # a reader that failed: say why
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def check(self, room_id: str, tag: str, count: int) -> dict[str, Any]:
        """Exactly once and in order: every seq of 0..count-1 seen once, nothing else."""
        seen = self.times(room_id, tag)
        order = self.order.get((room_id, tag), [])
        highest, out_of_order = -1, 0
        for seq in order:
            if seq < highest:
                out_of_order += 1
            highest = max(highest, seq)
        missing = [seq for seq in range(count) if seq not in seen]
        return {
            "seen": len(seen),
            "duplicates": sum(len(v) - 1 for v in seen.values()),
            "missing": len(missing),
            "missing_first": missing[:10],
            "out_of_order": out_of_order,
            "unexpected": sum(1 for seq in seen if not 0 <= seq < count),
        }


# --- the servers ---------------------------------------------------------------------------------


@dataclass
class Account:
    user_id: str
    token: str


@dataclass
class Servers:
    folder: Path
    agency: SynapseServer
    ministry: SynapseServer
    bridge: BridgeProcess
    bot: BotProcess
    alice: Account  # a person at the agency
    bob: Account  # a person at the ministry
    bridge_remote: Account  # the bridge's account on the ministry's server
    bot_agency: Account  # the copy bot's accounts
    bot_remote: Account


def account(synapse: SynapseServer, localpart: str) -> Account:
    user_id = synapse.register_user(localpart, password(localpart))
    return Account(user_id, synapse.login(localpart, password(localpart)))


def start_servers(folder: Path, stack: contextlib.ExitStack) -> Servers:
    """Both Synapses and the bridge, each stopped by `stack` however the run ends."""
    agency_port, bridge_port = free_port(), free_port()
    ministry = SynapseServer(
        data_dir=folder / "ministry", server_name=MINISTRY_SERVER_NAME, port=free_port()
    )
    database = f"sqlite+aiosqlite:///{folder / 'passerelle.db'}"
    settings = bridge_config_dict(
        agency_port,
        bridge_port,
        database,
        logging={"level": "INFO", "loggers": {"aiosqlite": "WARNING", "asyncio": "WARNING"}},
    )
    settings["appservice"]["as_token"] = settings["appservice"]["hs_token"] = "generate"
    config_path = folder / "config.yaml"
    atomic_write(config_path, dump_yaml(settings))
    registration = folder / "registration.yaml"
    generate_registration(config_path, registration, env={})
    agency = SynapseServer(
        data_dir=folder / "agency", port=agency_port, app_service_config_files=[registration]
    )
    for synapse in (agency, ministry):
        synapse.data_dir.mkdir(parents=True)
        stack.callback(synapse.stop)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # 5-10 s each: side by side
        for started in [pool.submit(agency.start), pool.submit(ministry.start)]:
            started.result()

    bridge_remote = account(ministry, BRIDGE_REMOTE_LOCALPART)
    settings = read_yaml_file(config_path)  # with the tokens generate_registration wrote
    settings["remotes"] = {
        REMOTE: {
            "address": ministry.base_url,
            "server_name": ministry.server_name,
            "user_id": bridge_remote.user_id,
            "access_token": bridge_remote.token,
            "display_suffix": "(Ministère)",
            "agency_suffix": "(Agence)",
        }
    }
    atomic_write(config_path, dump_yaml(settings))
    bridge = BridgeProcess(config_path, database, folder / "bridge.log")
    stack.callback(bridge.stop)
    bridge.start()

    bot = BotProcess(folder)
    stack.callback(bot.stop)
    return Servers(
        folder,
        agency,
        ministry,
        bridge,
        bot,
        alice=account(agency, "benchalice"),
        bob=account(ministry, "benchbob"),
        bridge_remote=bridge_remote,
        bot_agency=account(agency, "benchcopier"),
        bot_remote=account(ministry, "benchcopier"),
    )


async def make_rooms(
    servers: Servers, alice: MatrixTestClient, bob: MatrixTestClient
) -> dict[str, tuple[str, str]]:
    """The linked pair (as tests/e2e/test_remote_relay.py makes it) and the bot's pair."""
    bot_mxid = servers.bridge.config.bot_mxid
    remote_room = await bob.create_room(invite=[servers.bridge_remote.user_id], name="Coord")
    agency_room = await alice.create_room(invite=[bot_mxid], name="Coordination agence")
    await alice.wait_for_membership(agency_room, bot_mxid, "join", timeout=60)
    await alice.wait_for_event(agency_room, message_from(bot_mxid), timeout=60)
    question = await alice.send_text(
        agency_room, f"!passerelle link-remote {REMOTE} {remote_room}"
    )
    answer = await alice.wait_for_event(agency_room, replies_to(question, bot_mxid), timeout=60)
    if "Linked" not in answer["content"].get("body", ""):
        raise RuntimeError(f"link-remote failed: {answer['content'].get('body')}")
    await bob.wait_for_membership(remote_room, servers.bridge_remote.user_id, "join", timeout=60)

    bot_remote_room = await bob.create_room(invite=[servers.bot_remote.user_id], name="Copie")
    bot_agency_room = await alice.create_room(invite=[servers.bot_agency.user_id], name="Copie")
    for base_url, who, room_id in (
        (servers.ministry.base_url, servers.bot_remote, bot_remote_room),
        (servers.agency.base_url, servers.bot_agency, bot_agency_room),
    ):
        async with MatrixTestClient(base_url, who.token, who.user_id) as client:
            await client.join(room_id)
    return {"bridge": (agency_room, remote_room), "bot": (bot_agency_room, bot_remote_room)}


# --- CPU --------------------------------------------------------------------------------------


@dataclass
class RelayCpuMeter(CpuMeter):
    """CpuMeter of bench/mail_to_matrix.py with the ministry's Synapse and the bot counted
    apart (no Dovecot here: its pid file does not exist, so it counts 0)."""

    ministry_pid: int | None = None
    bot_pid: int | None = None

    def _sample(self) -> dict[str, float]:
        return super()._sample() | {
            "ministry": process_cpu(self.ministry_pid),
            "bot": process_cpu(self.bot_pid),
        }

    def stop(self) -> dict[str, float]:
        used = super().stop()
        used["others"] = round(used["others"] - used["ministry"] - used["bot"], 2)
        used.pop("dovecot", None)
        used["synapse_agency"] = used.pop("synapse")
        used["synapse_ministry"] = used.pop("ministry")
        return used


# --- phases -----------------------------------------------------------------------------------


@dataclass
class Bench:
    servers: Servers
    probes: Probes
    pairs: dict[str, tuple[str, str]]
    clients: dict[str, MatrixTestClient]  # "agency" (alice), "remote" (bob)
    readers: dict[str, Reader]  # the same clients' /sync

    def route(self, relay: str, direction: str) -> tuple[MatrixTestClient, str, str, str, str]:
        """(sender, its side, its room, the other side, the room the copies land in)."""
        agency_room, remote_room = self.pairs[relay]
        if direction == "r2a":
            return self.clients["remote"], "remote", remote_room, "agency", agency_room
        return self.clients["agency"], "agency", agency_room, "remote", remote_room

    async def send(
        self, sender: MatrixTestClient, room_id: str, tag: str, count: int, pace: float
    ) -> dict[int, tuple[float, float]]:
        """`count` messages, one every `pace` s (0: back to back); seq -> (before, after)."""
        sent: dict[int, tuple[float, float]] = {}
        start = time.monotonic()
        for seq in range(count):
            if pace:
                await asyncio.sleep(max(0.0, start + seq * pace - time.monotonic()))
            begin = time.time()
            await sender.send_text(room_id, message_text(tag, seq))
            sent[seq] = (begin, time.time())
        return sent

    async def throughput(self, relay: str, direction: str, tag: str, count: int) -> dict[str, Any]:
        sender, _, source, side, target = self.route(relay, direction)
        reader = self.readers[side]
        self.probes.start(f"{direction}-{tag}", bridge=relay == "bridge")
        sent = await self.send(sender, source, tag, count, 0)
        complete = await reader.wait(target, tag, count, 60 + count * 0.5)
        cpu = self.probes.stop()
        await asyncio.sleep(0.5)  # a late duplicate would show now
        start, sends_end = sent[0][0], sent[count - 1][1]
        copies = [min(t) for t in reader.times(target, tag).values()]
        elapsed = (max(copies) - start) if copies else float("nan")
        result = {
            "relay": relay,
            "direction": DIRECTIONS[direction],
            "sends": count,
            "complete": complete,
            "send_rate_per_s": round(count / (sends_end - start), 1),
            **ms_stats("send", [after - before for before, after in sent.values()]),
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(len(copies) / elapsed, 1) if copies else 0.0,
            "last_copy_after_last_send_ms": round(1000 * (max(copies) - sends_end))
            if copies
            else None,
            **reader.check(target, tag, count),
        }
        return with_cpu(result, cpu, count)

    async def latency(
        self, relay: str, direction: str, tag: str, count: int, pace: float
    ) -> dict[str, Any]:
        sender, own_side, source, side, target = self.route(relay, direction)
        own, reader = self.readers[own_side], self.readers[side]
        self.probes.start(f"{direction}-{tag}", bridge=relay == "bridge")
        sent = await self.send(sender, source, tag, count, pace)
        complete = await reader.wait(target, tag, count, 30 + count * 0.5)
        await own.wait(source, tag, count, 10)
        cpu = self.probes.stop()
        added, to_copy, to_original = [], [], []
        for seq, (begin, _) in sent.items():
            original, copy = own.first(source, tag, seq), reader.first(target, tag, seq)
            if copy is not None:
                to_copy.append(copy - begin)
            if original is not None:
                to_original.append(original - begin)
            if original is not None and copy is not None:
                added.append(copy - original)
        result = {
            "relay": relay,
            "direction": DIRECTIONS[direction],
            "messages": count,
            "pace_s": pace,
            "complete": complete,
            **ms_stats("send_to_original_seen", to_original),
            **ms_stats("send_to_copy_seen", to_copy),
            **ms_stats("added", added),
            **reader.check(target, tag, count),
        }
        return with_cpu(result, cpu, count)


def describe(label: str, result: dict[str, Any]) -> None:
    cpu = result["cpu_ms_per_message"]
    if "sends" in result:
        print(
            f"  {label}: {result['seen']}/{result['sends']} copies in {result['elapsed_s']} s = "
            f"{result['rate_per_s']}/s (sender alone {result['send_rate_per_s']}/s, last copy "
            f"{result['last_copy_after_last_send_ms']} ms after the last send)"
        )
    else:
        print(
            f"  {label}: added latency p50 {result['added_p50_ms']} ms, p99 "
            f"{result['added_p99_ms']} ms (send -> original seen p50 "
            f"{result['send_to_original_seen_p50_ms']} ms, send -> copy seen p50 "
            f"{result['send_to_copy_seen_p50_ms']} ms)"
        )
    print(
        f"    CPU per message: bridge {cpu['bridge']} ms, agency Synapse "
        f"{cpu['synapse_agency']} ms, ministry Synapse {cpu['synapse_ministry']} ms, bot "
        f"{cpu['bot']} ms, bench {cpu['bench']} ms, other processes {cpu['others']} ms",
        flush=True,
    )
    problems = {
        k: result[k] for k in ("duplicates", "missing", "out_of_order", "unexpected") if result[k]
    }
    if problems:
        print(f"    PROBLEMS: {problems} (first missing: {result['missing_first']})")


async def run(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    agency_pid = find_pid(str(servers.agency.config_path))
    ministry_pid = find_pid(str(servers.ministry.config_path))
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    results: dict[str, Any] = {"n": args.n, "latency_messages": args.latency}
    alice_c = MatrixTestClient(servers.agency.base_url, servers.alice.token, servers.alice.user_id)
    bob_c = MatrixTestClient(servers.ministry.base_url, servers.bob.token, servers.bob.user_id)
    async with alice_c as alice, bob_c as bob:
        await alice.set_displayname("Alice Martin")
        await bob.set_displayname("Bob Durand")
        pairs = await make_rooms(servers, alice, bob)
        results["rooms"] = pairs
        (bot_agency_room, bot_remote_room) = pairs["bot"]
        await asyncio.to_thread(
            servers.bot.start,
            BotSide(servers.agency.base_url, **vars(servers.bot_agency), room_id=bot_agency_room),
            BotSide(
                servers.ministry.base_url, **vars(servers.bot_remote), room_id=bot_remote_room
            ),
        )
        bot_pid = servers.bot.proc.pid if servers.bot.proc else None
        meter = RelayCpuMeter(
            agency_pid,
            bridge_pid,
            servers.folder / "no-dovecot.pid",
            ministry_pid=ministry_pid,
            bot_pid=bot_pid,
        )
        probes = Probes(meter, Profiler(args.profile, native=args.native), agency_pid, bridge_pid)
        readers = {
            "agency": Reader(alice, [pair[0] for pair in pairs.values()]),
            "remote": Reader(bob, [pair[1] for pair in pairs.values()]),
        }
        for reader in readers.values():
            await reader.start()
        bench = Bench(servers, probes, pairs, {"agency": alice, "remote": bob}, readers)
        try:
            if args.warmup:
                # Ghost registration and joins, first connections, cold caches: paid by neither
                # side of a ratio.
                for relay in ("bridge", "bot"):
                    for direction in DIRECTIONS:
                        warm = await bench.throughput(
                            relay, direction, f"w{relay[:2]}{direction}", args.warmup
                        )
                        if not warm["complete"]:
                            raise RuntimeError(f"warm-up through the {relay} did not complete")
            await asyncio.sleep(1)

            for direction, label in DIRECTIONS.items():
                print(f"throughput {label}: {args.n} messages", flush=True)
                key = f"{direction}_throughput"
                before = await bench.throughput("bot", direction, f"{direction}bota", args.n)
                describe("bot (before)", before)
                bridge = await bench.throughput("bridge", direction, f"{direction}br", args.n)
                describe("bridge      ", bridge)
                after = await bench.throughput("bot", direction, f"{direction}botb", args.n)
                describe("bot (after) ", after)
                results[f"{key}_bot_before"], results[f"{key}_bridge"] = before, bridge
                results[f"{key}_bot_after"] = after
                results[f"{direction}_bot_rate_per_s"] = bot_rate = mean_rate(before, after)
                results[f"{direction}_ratio"] = (
                    round(bridge["rate_per_s"] / bot_rate, 3) if bot_rate else None
                )
            if args.latency:
                for direction, label in DIRECTIONS.items():
                    print(f"latency {label}: {args.latency} messages, {args.pace} s apart")
                    for relay in ("bot", "bridge"):
                        tag = f"{direction}l{relay[:2]}"
                        results[f"{direction}_latency_{relay}"] = lat = await bench.latency(
                            relay, direction, tag, args.latency, args.pace
                        )
                        describe(f"{relay:<6}", lat)
                    bridge_p50 = results[f"{direction}_latency_bridge"]["added_p50_ms"]
                    bot_p50 = results[f"{direction}_latency_bot"]["added_p50_ms"]
                    if bridge_p50 is not None and bot_p50 is not None:
                        results[f"{direction}_latency_vs_bot_ms"] = round(bridge_p50 - bot_p50, 1)
        finally:
            for reader in readers.values():
                await reader.stop()
        results["reader_limited_timelines"] = sum(r.limited for r in readers.values())
    results["bot_status"] = await asyncio.to_thread(servers.bot.stop)
    results["disturbed"] = disturbed_phases(results)
    if args.profile:
        results["profiles"] = profile_summaries(args.profile)
    return results


# --- report -----------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: dict[str, Any]) -> None:
    print()
    missed = []
    for direction, label in DIRECTIONS.items():
        bridge = results[f"{direction}_throughput_bridge"]
        ratio = results[f"{direction}_ratio"]
        before = results[f"{direction}_throughput_bot_before"]["rate_per_s"]
        after = results[f"{direction}_throughput_bot_after"]["rate_per_s"]
        print(
            f"{label}: bridge {bridge['rate_per_s']}/s, bot "
            f"{results[f'{direction}_bot_rate_per_s']}/s (before {before}, after {after})"
        )
        if ratio is not None:
            ok = ratio >= RATE_TARGET
            print(f"  bridge/bot: {ratio:.2f} (target >= {RATE_TARGET}) {verdict(ok)}")
            if not ok:
                missed.append(f"{label} rate")
        lat = results.get(f"{direction}_latency_bridge")
        bot = results.get(f"{direction}_latency_bot")
        if lat is not None and bot is not None and lat["added_p50_ms"] is not None:
            ok = lat["added_p50_ms"] <= LATENCY_TARGET_MS
            print(
                f"  added latency p50: bridge {lat['added_p50_ms']} ms (p99 {lat['added_p99_ms']}"
                f" ms), bot {bot['added_p50_ms']} ms (p99 {bot['added_p99_ms']} ms); bridge "
                f"<= {LATENCY_TARGET_MS:.0f} ms {verdict(ok)}"
            )
            if not ok:
                missed.append(f"{label} latency")
    problems = [
        f"{key}: {value[k]} {k}"
        for key, value in results.items()
        if isinstance(value, dict) and "relay" in value
        for k in ("duplicates", "missing", "out_of_order", "unexpected")
        if value[k]
    ]
    print("exactly once, in order: " + ("; ".join(problems) if problems else "ok"))
    print(f"bot: {results['bot_status']}")
    if results["disturbed"]:
        print(
            "WARNING: other processes on this machine used more than "
            f"{BUSY_CORES} cores during {', '.join(results['disturbed'])} "
            f"(cores used: {results['disturbed']}); those numbers are unreliable: run again "
            "on a quiet machine"
        )
    if missed:
        print(f"target missed for: {', '.join(missed)}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--n", type=int, default=300, help="messages per throughput phase and direction"
    )
    parser.add_argument(
        "--latency", type=int, default=50, help="paced messages per relay and direction (0: skip)"
    )
    parser.add_argument("--pace", type=float, default=0.2, help="seconds between paced messages")
    parser.add_argument(
        "--warmup", type=int, default=20, help="unmeasured messages per relay and direction"
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.n < 1 or min(args.latency, args.warmup) < 0 or args.pace < 0:
        parser.error("counts must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    code = code_version()  # before the bridge starts: the tree may change during the run
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        print(f"starting two Synapses, the bridge and the copy bot in {folder}", flush=True)
        servers = start_servers(folder, stack)
        try:
            results = asyncio.run(run(servers, args))
        except BaseException:
            print(f"--- bridge log tail ---\n{servers.bridge.log_tail(40)}", file=sys.stderr)
            if servers.bot.proc is not None:
                print(f"--- copy bot output ---\n{servers.bot.output()}", file=sys.stderr)
            raise
        log_lines = servers.bridge.log_text().splitlines()
        results["bridge_log_errors"] = sum(
            "ERROR" in line or "Traceback" in line for line in log_lines
        )
        results["bridge_log_lines"] = len(log_lines)
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
    results["code"] = code
    report(results)
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
