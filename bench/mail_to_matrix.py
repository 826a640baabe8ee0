#!/usr/bin/env python3
"""Mail → Matrix throughput and latency of the bridge, as ratios to plain Matrix sends.

Starts its own Dovecot, Synapse (with the bridge's registration) and `python -m bridge run` on
127.0.0.1 with free ports and a temporary directory, measures, prints, stops everything:

    python bench/mail_to_matrix.py [--mails 1000] [--links 10] [--per-link 100]

Phases, all in one run against the same servers:

1. one room: a client sends N bodies one at a time (plain rate), then N mails are APPENDed to
   a linked mailbox and relayed by the bridge (relay rate, latency per mail, order, once-only);
2. L rooms: L concurrent senders, M bodies each, to their own rooms (plain aggregate rate), then
   L linked mailboxes get M mails each, APPENDed concurrently (relay aggregate rate);
3. a few mails APPENDed one at a time on an otherwise idle bridge (latency without a queue);
4. sender authentication (bench/auth_phase.py): one room per verdict path (nothing to check,
   the trusted MTA's results, the bridge's own DKIM check against the bench's DNS), their
   halves interleaved; relay rate with the check against without, and the check's CPU alone.

Rates: plain = sends / wall-clock time of the sends; relay = mails / (origin_server_ts of the
last relayed event - start of the first APPEND). Mails carry no Date header, so the bridge sends
no `?ts=` and origin_server_ts is Synapse's receive time. Latency = origin_server_ts - end of
that mail's APPEND. The last line printed is one JSON object with every number.

The plain client's rooms have the bot in them (and a third member), as the bridged rooms do:
Synapse pushes every event of such a room to the bridge, plain or relayed, so both sides pay
for it (--bare-reference: rooms without the bot, the reference of runs before this option).
--synapse-db postgresql runs Synapse on PostgreSQL (the machine's server, or a throw-away one).

Where the time goes: --diagnose adds a plain phase into a room with the bot if the reference
has none, or without it if the reference has it (what the bot's presence costs), logs the
bridge's homeserver requests to split its time per mail into send round trip and its own work,
and times the relay's database steps alone; --profile DIR attaches py-spy (if installed) to
the bridge and Synapse during the bridge phases. Both perturb what they measure: take the
ratios from a plain run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

# `tests` is not an installed package: import the test harness from this checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import auth_phase  # noqa: E402
from bench.imap_notice import notice_watch  # noqa: E402
from bench.mail_in_servers import (  # noqa: E402
    ALLOW,
    AUTHSERV_ID,
    PASSWORD,
    Servers,
    start_servers,
)
from bench.measure import (  # noqa: E402
    BUSY_CORES,
    CpuMeter,
    Probes,
    Profiler,
    add_run_options,
    code_version,
    disturbed_phases,
    find_pid,
    percentile,
    profile_summaries,
    retry_until,
    temp_folder,
)
from bench.relay_diagnosis import diagnose_log, relay_steps  # noqa: E402
from bench.rooms import (  # noqa: E402
    SyncWatcher,
    check_room,
    is_ghost,
    is_link_notice,
    room_history,
)
from bridge.harness.dovecot import DovecotServer  # noqa: E402
from bridge.harness.synapse import MatrixTestClient  # noqa: E402
from tests.conftest import http_json  # noqa: E402
from tests.e2e.test_bot import message_from, replies_to  # noqa: E402

T = TypeVar("T")
Mailer = Callable[[str, str, int], bytes]  # (mailbox address, marker tag, seq) -> raw mail

SENDER = "Agent Dupont <agent.dupont@achats.gouv.fr>"
MTA_RESULTS = f"{AUTHSERV_ID}; dkim=pass header.d={ALLOW}; dmarc=pass header.from={ALLOW}"
# Issue 12: relay/plain in one room, and across rooms (a plain client per room, in parallel).
TARGET_1 = 0.95
TARGET_N = 0.9
HTML_FORMAT = "org.matrix.custom.html"


# --- small helpers ----------------------------------------------------------------------------


def marker(tag: str, seq: int) -> str:
    return f"BENCH-{tag}-{seq:05d}"


def mail_text(tag: str, seq: int) -> tuple[str, str]:
    """(subject, text) of mail `seq`; the plain phases send the same words."""
    return (
        f"Commande {seq}",
        f"Bonjour,\nmerci de traiter la demande {marker(tag, seq)} avant vendredi.\n",
    )


def make_mail(
    address: str, tag: str, seq: int, *, sender: str = SENDER, results: str | None = MTA_RESULTS
) -> bytes:
    """A plain-text mail without a Date header, with a unique Message-ID, authenticated by the
    trusted MTA's Authentication-Results (links require their senders authenticated) unless
    `results` is None."""
    subject, text = mail_text(tag, seq)
    msg = EmailMessage()
    if results is not None:
        msg["Authentication-Results"] = results
    msg["From"] = sender
    msg["To"] = address
    msg["Subject"] = subject
    msg["Message-ID"] = f"<bench-{tag}-{seq}-{uuid.uuid4().hex}@example.test>"
    msg.set_content(text)
    return msg.as_bytes()


def plain_content(tag: str, seq: int) -> dict[str, Any]:
    """Roughly what the bridge posts for the same mail (subject lead, text, HTML)."""
    subject, text = mail_text(tag, seq)
    lines = "<br>".join(text.strip().split("\n"))
    return {
        "format": HTML_FORMAT,
        "formatted_body": f"<p><strong>{subject}</strong></p><p>{lines}</p>",
        "m.mentions": {},
    }


# --- Matrix side ------------------------------------------------------------------------------


async def ghost_client(base_url: str, as_token: str, user_id: str) -> MatrixTestClient:
    """One of the appservice's ghosts, registered, sending as the bridge does (its token and
    `?user_id=`) but with no bridge: Synapse's cost of a ghost's message alone."""
    client = MatrixTestClient(base_url, as_token, user_id)
    localpart = user_id[1:].split(":", 1)[0]
    body = {"type": "m.login.application_service", "username": localpart}
    await client.request("POST", "/_matrix/client/v3/register", json_body=body)
    client.query = {"user_id": user_id}
    return client


async def link_room(servers: Servers, alice: MatrixTestClient, address: str, name: str) -> str:
    """A room created by alice, the bot invited and joined, `address` linked; the bridge's
    watcher has made its first pass over the mailbox (so the link's baseline is set)."""
    bot = servers.bot
    room_id = await alice.create_room(invite=[bot], name=name)
    await alice.wait_for_membership(room_id, bot, "join", timeout=60)
    await alice.wait_for_event(room_id, message_from(bot), timeout=60)
    question = await alice.send_text(room_id, f"!passerelle link {address} allow {ALLOW}")
    answer = await alice.wait_for_event(room_id, replies_to(question, bot), timeout=60)
    if "Linked" not in answer["content"].get("body", ""):
        raise RuntimeError(f"link {address} failed: {answer['content'].get('body')}")
    await watched(servers, address)
    return room_id


async def watched(servers: Servers, address: str) -> None:
    """Once the bridge's watcher of `address` has made its first pass over the mailbox."""

    async def watching() -> bool | None:
        _, health = await asyncio.to_thread(http_json, servers.bridge.base_url + "/health")
        state = ((health or {}).get("mailboxes") or {}).get(address) or {}
        return True if state.get("reachable") else None

    await retry_until(watching, 60, f"the bridge to watch {address}")


# --- phases -----------------------------------------------------------------------------------


async def plain_phase(
    alice: MatrixTestClient,
    rooms: dict[str, str],
    count: int,
    probes: Probes,
    name: str,
    senders: dict[str, MatrixTestClient] | None = None,
) -> dict[str, Any]:
    """Each room (tag -> room ID) gets `count` sends one at a time; rooms run concurrently.
    The sender is alice, or the room's client in `senders` (alice watches all the same)."""
    watcher = SyncWatcher(alice, {room_id: tag for tag, room_id in rooms.items()})
    await watcher.begin()
    send_ms: list[float] = []
    senders = senders or {}

    async def one_room(tag: str, room_id: str) -> None:
        client = senders.get(tag, alice)
        for seq in range(count):
            subject, text = mail_text(tag, seq)
            begin = time.monotonic()
            await client.send_text(
                room_id, f"{subject}\n\n{text.strip()}", extra=plain_content(tag, seq)
            )
            send_ms.append((time.monotonic() - begin) * 1000)

    # The watcher syncs while the messages are sent, as it does in the bridge phases.
    probes.start(name, bridge=False)
    watching = asyncio.create_task(watcher.wait(count, 120 + count * len(rooms) * 0.3))
    start = time.monotonic()
    await asyncio.gather(*(one_room(tag, room_id) for tag, room_id in rooms.items()))
    elapsed = time.monotonic() - start
    complete = await watching
    cpu = probes.stop()
    total = count * len(rooms)
    problems = 0
    for tag, room_id in rooms.items():
        sender_id = senders.get(tag, alice).user_id
        check = check_room(await room_history(alice, room_id), tag, count, sender_id.__eq__, "")
        problems += len(check.missing) + check.duplicates + check.out_of_order
    return {
        "rooms": len(rooms),
        "sends": total,
        "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(total / elapsed, 2),
        "send_p50_ms": round(percentile(send_ms, 50) or 0, 1),
        "send_p99_ms": round(percentile(send_ms, 99) or 0, 1),
        "all_seen": complete and problems == 0,
        "appservice_transactions": probes.transactions,
        "cpu_s": cpu,
        "cpu_ms_per_message": {
            k: round(1000 * v / total, 1) for k, v in cpu.items() if k not in ("wall",)
        },
    }


async def append_mails(
    dovecot: DovecotServer, address: str, mails: list[bytes], pace: float = 0.0
) -> dict[int, tuple[float, float]]:
    """APPEND `mails` over one IMAP session; seq -> (start, end) in Unix seconds."""
    times: dict[int, tuple[float, float]] = {}
    async with dovecot.session(address, PASSWORD, folder=None) as client:
        for seq, raw in enumerate(mails):
            if pace and seq:
                await asyncio.sleep(pace)
            begin = time.time()
            response = await client.append(raw, mailbox='"INBOX"')
            if response.result != "OK":
                raise RuntimeError(f"APPEND to {address} failed: {response.lines!r}")
            times[seq] = (begin, time.time())
    return times


async def bridge_phase(
    servers: Servers,
    alice: MatrixTestClient,
    rooms: dict[str, tuple[str, str]],
    count: int,
    probes: Probes,
    name: str,
    pace: float = 0.0,
    make: Mailer = make_mail,
) -> dict[str, Any]:
    """Each linked room (tag -> (address, room ID)) gets `count` mails (from `make`) APPENDed
    to its mailbox, all mailboxes concurrently; wait until every mail is in its room, then
    check them. The mails are made before the phase starts (signing one costs milliseconds)."""
    watcher = SyncWatcher(alice, {room_id: tag for tag, (_, room_id) in rooms.items()})
    await watcher.begin()
    total = count * len(rooms)
    mails = {
        tag: [make(address, tag, seq) for seq in range(count)]
        for tag, (address, _) in rooms.items()
    }
    addresses = [address for address, _ in rooms.values()]
    async with notice_watch(servers.dovecot, addresses, PASSWORD) as announced:
        probes.start(name, bridge=True)
        appended = await asyncio.gather(
            *(
                append_mails(servers.dovecot, address, mails[tag], pace)
                for tag, (address, _) in rooms.items()
            )
        )
        append_end = max(end for times in appended for _, end in times.values())
        complete = await watcher.wait(count, 120 + total * 0.3)
        cpu = probes.stop()

    first_start = min(begin for times in appended for begin, _ in times.values())
    append_elapsed = append_end - first_start
    latencies: list[float] = []
    last_ts = 0
    first_ts = math.inf
    duplicates = out_of_order = unexpected = 0
    missing: dict[str, list[int]] = {}
    notices: list[str] = []
    verdicts: Counter[str] = Counter()
    for (tag, (_, room_id)), times in zip(rooms.items(), appended, strict=True):
        check = check_room(await room_history(alice, room_id), tag, count, is_ghost, servers.bot)
        verdicts += check.verdicts
        duplicates += check.duplicates
        out_of_order += check.out_of_order
        unexpected += check.unexpected
        notices += [n for n in check.notices if not is_link_notice(n)]
        if check.missing:
            missing[tag] = check.missing
        for seq, ts in check.ts.items():
            latencies.append(ts - times[seq][1] * 1000)
            last_ts = max(last_ts, ts)
            first_ts = min(first_ts, ts)
    relayed = total - sum(len(m) for m in missing.values())
    elapsed = (last_ts / 1000 - first_start) if relayed else float("nan")
    # From the first event on: without the fixed delay before the bridge hears of new mail.
    steady = (last_ts - first_ts) / 1000 if relayed > 1 else 0.0
    # From Dovecot's first announcement of new mail to an IMAP client in IDLE (an observer
    # beside the bridge's session): what no IMAP client can see sooner (bench/imap_notice.py).
    noticed = announced.earliest()
    from_notice = (last_ts / 1000 - noticed) if relayed and noticed else float("nan")
    notice_delays = [
        1000 * (announced.first[address] - times[0][1])
        for address, times in zip(addresses, appended, strict=True)
        if address in announced.first and 0 in times
    ]
    return {
        "rooms": len(rooms),
        "mails": total,
        "relayed": relayed,
        "complete": complete and not missing,
        "append_s": round(append_elapsed, 2),
        "append_rate_per_s": round(total / append_elapsed, 1) if append_elapsed > 0 else None,
        "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(relayed / elapsed, 2) if relayed else 0.0,
        "steady_s": round(steady, 3),
        "from_notice_s": round(from_notice, 3),
        "rate_from_notice_per_s": round(relayed / from_notice, 2) if from_notice > 0 else 0.0,
        "notice_delay_ms": [round(d) for d in notice_delays],
        "steady_rate_per_s": round((relayed - 1) / steady, 2) if steady > 0 else 0.0,
        "latency_p50_ms": round(percentile(latencies, 50) or 0),
        "latency_p99_ms": round(percentile(latencies, 99) or 0),
        "latency_min_ms": round(min(latencies)) if latencies else None,
        "latency_max_ms": round(max(latencies)) if latencies else None,
        "duplicates": duplicates,
        "missing": sum(len(m) for m in missing.values()),
        "missing_first": {tag: seqs[:10] for tag, seqs in missing.items()},
        "out_of_order": out_of_order,
        "unexpected_ghost_events": unexpected,
        "bot_notices": notices[:5],
        "verdicts": dict(verdicts),
        "appservice_transactions": probes.transactions,
        "cpu_s": cpu,
        "cpu_ms_per_message": {
            k: round(1000 * v / total, 1) for k, v in cpu.items() if k not in ("wall",)
        },
    }


def rooms_label(count: int) -> str:
    return f"{count} room" if count == 1 else f"{count} rooms"


def mean_rate(before: dict[str, Any], after: dict[str, Any]) -> float:
    """Sends per second over both plain runs together."""
    sends: int = before["sends"] + after["sends"]
    elapsed: float = before["elapsed_s"] + after["elapsed_s"]
    return round(sends / elapsed, 2)


# --- report -----------------------------------------------------------------------------------


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio >= target else "MISSED"


def describe(label: str, result: dict[str, Any]) -> None:
    cpu = result["cpu_ms_per_message"]
    per = (
        f"CPU per message: synapse {cpu['synapse']} ms, bridge {cpu['bridge']} ms, "
        f"dovecot {cpu['dovecot']} ms, postgres {cpu['postgres']} ms, bench {cpu['bench']} ms, "
        f"other processes {cpu['others']} ms, steal {cpu.get('steal', 0.0)} ms"
    )
    if txns := result.get("appservice_transactions"):
        per += f"; {txns['count']:.0f} appservice transactions to the bridge"
    if "sends" in result:
        print(
            f"{label}: {result['sends']} sends in {result['elapsed_s']} s = "
            f"{result['rate_per_s']}/s (send p50 {result['send_p50_ms']} ms, "
            f"p99 {result['send_p99_ms']} ms); {per}"
        )
    else:
        print(
            f"{label}: {result['relayed']}/{result['mails']} mails relayed in "
            f"{result['elapsed_s']} s = {result['rate_per_s']}/s (APPEND {result['append_s']} s);"
            f" latency p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms; "
            f"{per}"
        )
        problems = {
            k: result[k]
            for k in ("duplicates", "missing", "out_of_order", "unexpected_ghost_events")
            if result[k]
        }
        if problems or result["bot_notices"]:
            print(f"  PROBLEMS: {problems} {result['missing_first']} {result['bot_notices']}")


async def run(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    synapse_pid = find_pid(str(servers.synapse.config_path))
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    probes = Probes(
        CpuMeter(synapse_pid, bridge_pid, servers.dovecot.run_dir / "master.pid"),
        Profiler(args.profile, native=args.native),
        synapse_pid,
        bridge_pid,
        metrics_url=f"{servers.bridge.config.appservice.address}/metrics",
    )
    results: dict[str, Any] = {"mails": args.mails, "links": args.links, "per_link": args.per_link}
    synapse = servers.synapse
    bob_id = await asyncio.to_thread(synapse.register_user, "benchbob", "pw-benchbob")
    bob_token = await asyncio.to_thread(synapse.login, "benchbob", "pw-benchbob")
    async with (
        MatrixTestClient(synapse.base_url, servers.alice_token, servers.alice_id) as alice,
        MatrixTestClient(synapse.base_url, bob_token, bob_id) as bob,
    ):
        # Rooms first, so that creating them is not measured. The plain sends run before and
        # after the bridge's turn, each into fresh rooms, and their mean is the reference: a
        # machine whose load drifts during the run then weighs on both sides alike.
        # The reference rooms have the bot in them, as a bridged room does (unless
        # --bare-reference): Synapse then pushes every event to the bridge, which stores it
        # and finds it is no command, as it does for the ghosts' events in a linked room.
        async def reference_room(name: str, with_bot: bool) -> str:
            """A room of alice's; with the bot, also a third member, so that the bot does not
            take the room for a direct chat, where every message is a command."""
            if not with_bot:
                return await alice.create_room(name=name)
            room_id = await alice.create_room(invite=[servers.bot, bob_id], name=name)
            await bob.join(room_id)
            await alice.wait_for_membership(room_id, servers.bot, "join", timeout=60)
            return room_id

        fair = not args.bare_reference
        plain_one = {
            f"p{side}": await reference_room(f"plain {side}", fair) for side in ("a", "b")
        }
        plain_many = {
            side: {
                f"q{side}{i:02d}": await reference_room(f"plain {side} {i}", fair)
                for i in range(args.links)
            }
            for side in ("a", "b")
        }
        results["reference_rooms"] = "with the bot" if fair else "without the bot"
        ghost_rooms: dict[str, str] = {}
        ghost: MatrixTestClient | None = None
        if args.ghost_reference:
            # One ghost in every room, as the relay's one sender is; alice and the bot too.
            ghost_id = servers.bridge.config.ghost_mxid("benchreference")
            as_token = servers.bridge.config.appservice.as_token
            ghost = await ghost_client(synapse.base_url, as_token, ghost_id)
            for i in range(args.links):
                room_id = await alice.create_room(
                    invite=[servers.bot, ghost_id], name=f"ghost reference {i}"
                )
                await ghost.join(room_id)
                await alice.wait_for_membership(room_id, servers.bot, "join", timeout=60)
                ghost_rooms[f"g{i:02d}"] = room_id
        linked_one = {
            "s": (servers.single, await link_room(servers, alice, servers.single, "one"))
        }
        linked_many = dict(
            zip(
                [f"m{i:02d}" for i in range(args.links)],
                await asyncio.gather(
                    *(
                        link_room(servers, alice, address, f"linked {i}")
                        for i, address in enumerate(servers.multi)
                    )
                ),
                strict=True,
            )
        )
        linked_many_rooms = {
            tag: (address, room_id)
            for (tag, room_id), address in zip(linked_many.items(), servers.multi, strict=True)
        }
        auth_rooms: dict[str, tuple[str, str]] = {}
        if servers.auth is not None:
            off = auth_rooms["off"] = (servers.auth.mailboxes["off"], servers.auth.off_room)
            await alice.wait_for_membership(off[1], servers.bot, "join", timeout=60)
            await watched(servers, off[0])
            for kind in ("mta", "on"):
                address = servers.auth.mailboxes[kind]
                auth_rooms[kind] = (address, await link_room(servers, alice, address, kind))
        if args.warmup:
            # A fresh Synapse answers its first few hundred sends more slowly (cold caches):
            # not something either side of the ratio should pay for.
            warm = await alice.create_room(name="warm-up")
            for seq in range(args.warmup):
                await alice.send_text(warm, f"warm-up {seq}")
        if args.warmup_mails:
            # The plain client is a member of its rooms before it sends; the sender's ghost
            # joins a linked room with its first mail there (an invite and a join: 0.5-0.7 s
            # under load, measured). Those first mails go now, unmeasured, so that both sides
            # are measured as members (`--warmup-mails 0`: the ghosts join inside the phases).
            warm_rooms = {
                f"w{tag}": linked for tag, linked in (linked_one | linked_many_rooms).items()
            }
            results["warmup_mails"] = await bridge_phase(
                servers, alice, warm_rooms, args.warmup_mails, probes, "warm-up-mails"
            )
        await asyncio.sleep(2)  # let the link-time traffic settle

        print(f"phase 1: one room, {args.mails} messages", flush=True)
        results["plain_1_before"] = plain_a = await plain_phase(
            alice, {"pa": plain_one["pa"]}, args.mails, probes, "plain-one-before"
        )
        describe("  plain (before)", plain_a)
        if args.diagnose:
            # The same sends into a room without the bot (the reference rooms have it, unless
            # --bare-reference): what the bot's presence costs a plain client.
            other = await reference_room("other reference", not fair)
            await asyncio.sleep(2)
            results["plain_1_other_room"] = other_rate = await plain_phase(
                alice, {"o": other}, args.mails, probes, "plain-one-other-room"
            )
            describe(f"  plain, bot {'not ' if fair else ''}in the room", other_rate)
        window = time.time()
        results["bridge_1"] = relay = await bridge_phase(
            servers, alice, linked_one, args.mails, probes, "one"
        )
        describe("  bridge        ", relay)
        if args.diagnose:
            results["diagnosis_1"] = diag = diagnose_log(
                servers.bridge.log_text(), window, time.time()
            )
            print(f"  bridge log: {json.dumps(diag)}")
        results["plain_1_after"] = plain_b = await plain_phase(
            alice, {"pb": plain_one["pb"]}, args.mails, probes, "plain-one-after"
        )
        describe("  plain (after) ", plain_b)

        print(f"phase 2: {rooms_label(args.links)} x {args.per_link} messages", flush=True)
        results["plain_n_before"] = plain_na = await plain_phase(
            alice, plain_many["a"], args.per_link, probes, "plain-many-before"
        )
        describe("  plain (before)", plain_na)
        results["bridge_n"] = relay_n = await bridge_phase(
            servers, alice, linked_many_rooms, args.per_link, probes, "many"
        )
        describe("  bridge        ", relay_n)
        results["plain_n_after"] = plain_nb = await plain_phase(
            alice, plain_many["b"], args.per_link, probes, "plain-many-after"
        )
        describe("  plain (after) ", plain_nb)
        if ghost is not None:
            async with ghost:
                results["plain_n_ghost"] = as_ghost = await plain_phase(
                    alice, ghost_rooms, args.per_link, probes, "plain-many-ghost",
                    senders=dict.fromkeys(ghost_rooms, ghost),
                )  # fmt: skip
            describe("  a ghost, no bridge", as_ghost)

        if args.paced:
            print(f"phase 3: {args.paced} mails one at a time, {args.pace} s apart", flush=True)
            idle_room = {"i": (servers.single, linked_one["s"][1])}
            results["bridge_idle"] = idle = await bridge_phase(
                servers, alice, idle_room, args.paced, probes, "idle", args.pace
            )
            describe("  bridge        ", idle)

        if servers.auth is not None:
            print(
                f"phase 4: sender authentication, {args.auth_mails} mails per path "
                f"({', '.join(auth_phase.ORDER)}, halves)",
                flush=True,
            )

            async def phase(
                name: str, rooms: dict[str, tuple[str, str]], count: int, make: Mailer
            ) -> dict[str, Any]:
                return await bridge_phase(servers, alice, rooms, count, probes, name, make=make)

            results["auth"] = await auth_phase.run(
                phase,
                auth_rooms,
                servers.auth,
                make_mail,
                authserv_id=AUTHSERV_ID,
                mta_results=MTA_RESULTS,
                sender=SENDER.rpartition("<")[2].rstrip(">"),
                count=args.auth_mails,
                calls=args.check_calls,
            )

    results["plain_1_rate_per_s"] = plain_1 = mean_rate(plain_a, plain_b)
    results["plain_n_rate_per_s"] = plain_n = mean_rate(plain_na, plain_nb)
    results["ratio_1"] = round(relay["rate_per_s"] / plain_1, 3)
    results["ratio_n"] = round(relay_n["rate_per_s"] / plain_n, 3)
    # The same, the relay's clock started when Dovecot announced the first mail (not sooner
    # visible to any IMAP client) instead of at the first APPEND.
    for key, relayed, plain in (("1", relay, plain_1), ("n", relay_n, plain_n)):
        results[f"ratio_{key}_from_notice"] = round(relayed["rate_from_notice_per_s"] / plain, 3)
    if "plain_n_ghost" in results:
        results["ratio_n_to_ghost"] = round(
            relay_n["rate_per_s"] / results["plain_n_ghost"]["rate_per_s"], 3
        )
    results["disturbed"] = disturbed_phases(results)
    if "auth" in results:
        results["disturbed"] |= disturbed_phases(results["auth"]["phases"])
        results.update(auth_phase.headline(results["auth"]))
    if args.diagnose:
        results["relay_steps_alone_ms"] = steps = await relay_steps(
            servers.folder / "steps", servers.bridge.config.mail, make_mail, ALLOW
        )
        print(f"relay steps alone (ms per mail): {json.dumps(steps)}")
    if args.profile:
        results["profiles"] = profile_summaries(args.profile)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mails", type=int, default=1000, help="mails in the one-room phase")
    parser.add_argument("--links", type=int, default=10, help="linked rooms in phase 2")
    parser.add_argument("--per-link", type=int, default=100, help="mails per room in phase 2")
    parser.add_argument(
        "--paced", type=int, default=20, help="mails sent one at a time in phase 3 (0: skip)"
    )
    parser.add_argument(
        "--warmup", type=int, default=300, help="unmeasured sends first, to warm Synapse up"
    )
    parser.add_argument("--pace", type=float, default=1.0, help="seconds between paced mails")
    parser.add_argument(
        "--warmup-mails",
        type=int,
        default=1,
        help="unmeasured mails per linked room first, so that the sender's ghost is in each "
        "room before the measured phases, as the plain client is in its rooms (0: none)",
    )
    parser.add_argument(
        "--auth-mails",
        type=int,
        default=300,
        help="mails per path in the sender authentication phase (phase 4; 0: skip)",
    )
    parser.add_argument(
        "--check-calls",
        type=int,
        default=1000,
        help="SenderAuthenticator.check calls timed in-process per path (phase 4)",
    )
    parser.add_argument(
        "--synapse-db",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="Synapse's database: SQLite, or PostgreSQL (the machine's server if it answers on "
        "127.0.0.1:5432, else a throw-away cluster)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the bridge's database (PostgreSQL: the machine's server, or a throw-away cluster)",
    )
    parser.add_argument(
        "--bare-reference",
        action="store_true",
        help="the plain client posts into rooms without the bot (the bridged rooms have it: "
        "not a fair reference, kept to compare with earlier runs)",
    )
    add_run_options(parser)
    parser.add_argument(
        "--ghost-reference",
        action="store_true",
        help="phase 2 also sends as one of the appservice's ghosts with no bridge (its token "
        "and ?user_id=): what Synapse alone makes of a ghost's messages",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="log the bridge's homeserver requests (DEBUG) and split its time per mail into "
        "send round trip and the rest (slows the bridge a little: not for the ratios)",
    )
    args = parser.parse_args(argv)
    counts = (args.mails, args.links, args.per_link, args.check_calls)
    if min(counts) < 1 or min(args.paced, args.warmup, args.auth_mails, args.warmup_mails) < 0:
        parser.error("counts must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    load_before = os.getloadavg()
    code = code_version()  # before the bridge starts: the tree may change during the run
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        print(f"starting Dovecot, Synapse and the bridge in {folder}", flush=True)
        servers = start_servers(
            folder,
            args.links,
            stack,
            diagnose=args.diagnose,
            auth=args.auth_mails > 0,
            synapse_db=args.synapse_db,
            database=args.database,
        )
        try:
            results = asyncio.run(run(servers, args))
        except BaseException:
            print(f"--- bridge log tail ---\n{servers.bridge.log_tail(40)}", file=sys.stderr)
            raise
        errors = sum(
            "ERROR" in line or "Traceback" in line
            for line in servers.bridge.log_text().splitlines()
        )
        results["bridge_log_errors"] = errors
    results["total_s"] = round(time.monotonic() - started, 1)
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    results["synapse_db"], results["database"] = args.synapse_db, args.database
    results["code"] = code

    ratio_1, ratio_n = results["ratio_1"], results["ratio_n"]
    print()
    print(
        f"plain reference: 1 room {results['plain_1_rate_per_s']}/s, {rooms_label(args.links)} "
        f"{results['plain_n_rate_per_s']}/s (mean of before and after); relay: 1 room "
        f"{results['bridge_1']['rate_per_s']}/s, {rooms_label(args.links)} "
        f"{results['bridge_n']['rate_per_s']}/s"
    )
    print(
        f"relay/plain (1 room): {ratio_1:.2f} (target >= {TARGET_1}) {verdict(ratio_1, TARGET_1)}"
    )
    print(
        f"relay/plain ({rooms_label(args.links)}): {ratio_n:.2f} (target >= {TARGET_N}) "
        f"{verdict(ratio_n, TARGET_N)}"
    )
    delays = [d for key in ("bridge_1", "bridge_n") for d in results[key]["notice_delay_ms"]]
    print(
        f"from Dovecot's first announcement of new mail (its IDLE notice came "
        f"{min(delays, default=0)}-{max(delays, default=0)} ms after the first APPEND): "
        f"relay/plain {results['ratio_1_from_notice']:.2f} (1 room), "
        f"{results['ratio_n_from_notice']:.2f} ({rooms_label(args.links)})"
    )
    if "ratio_n_to_ghost" in results:
        print(
            f"relay / a ghost sending with no bridge ({rooms_label(args.links)}, "
            f"{results['plain_n_ghost']['rate_per_s']}/s): {results['ratio_n_to_ghost']:.2f}"
        )
    for key, label in (("bridge_1", "1 room"), ("bridge_n", rooms_label(args.links))):
        r = results[key]
        print(
            f"latency APPEND -> event ({label}, bulk): p50 {r['latency_p50_ms']} ms, "
            f"p99 {r['latency_p99_ms']} ms"
        )
    if "bridge_idle" in results:
        r = results["bridge_idle"]
        print(
            f"latency APPEND -> event (idle bridge, {r['mails']} mails): "
            f"p50 {r['latency_p50_ms']} ms, p99 {r['latency_p99_ms']} ms"
        )
    problems = [
        f"{key}: {results[key][k]} {k}"
        for key in ("bridge_1", "bridge_n", "bridge_idle")
        if key in results
        for k in ("duplicates", "missing", "out_of_order")
        if results[key][k]
    ]
    if "auth" in results:
        auth_phase.describe(results["auth"])
        problems += [
            f"auth {kind}: {path['problems']} duplicated, missing or out of order"
            for kind, path in results["auth"]["paths"].items()
            if path["problems"]
        ]
    print("order and once-only: " + ("; ".join(problems) if problems else "ok"))
    if results["disturbed"]:
        print(
            "WARNING: other processes on this machine used more than "
            f"{BUSY_CORES} cores during {', '.join(results['disturbed'])} "
            f"(cores used: {results['disturbed']}); those numbers are unreliable: run again "
            "on a quiet machine"
        )
    missed = [
        name
        for name, r, target in (("1 room", ratio_1, TARGET_1), ("many rooms", ratio_n, TARGET_N))
        if r < target
    ]
    if missed:
        print(f"target missed for: {', '.join(missed)}")
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
