#!/usr/bin/env python3
"""History backfill rate of the bridge, as a ratio to a plain client's sequential sends.

Starts its own Dovecot, Synapse (with the bridge's registration) and `python -m bridge run` on
127.0.0.1 with free ports and a temporary directory (bench/mail_to_matrix.py's servers),
measures, prints, stops everything:

    python bench/backfill.py [--mails 10000]

1. N mails (dated, one hour apart, a reply every third) are APPENDed to a mailbox, and the
   mailbox is linked to a room: the link starts after them. Not timed.
2. plain: a client sends the same bodies (N, at most 2,000 unless --plain) one at a time into
   a room the bot is in (so Synapse pushes them to the bridge, as it does the backfilled ones),
   before and after the backfill in fresh rooms; the reference is the mean of both rates (a
   drifting load weighs on both). With --bare, also into a room without the bot (nothing
   pushed): a second, harsher ratio.
3. backfill: `!passerelle backfill ADDRESS` in the linked room; the rate is N / (the final
   notice's origin_server_ts - the command's). Backfilled events carry the mails' own dates
   (`?ts=`), so only the bot's events time the run. Every mail must arrive once, in order.

The last line printed is one JSON object with every number, the load average before and after,
and the CPU seconds of each process during each phase (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from email.utils import format_datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mail_in_servers import Servers, start_servers  # noqa: E402
from bench.mail_to_matrix import (  # noqa: E402
    append_mails,
    link_room,
    make_mail,
    plain_phase,
)
from bench.measure import (  # noqa: E402
    CpuMeter,
    Probes,
    Profiler,
    add_run_options,
    code_version,
    disturbed_phases,
    find_pid,
    quote,
    retry_until,
    temp_folder,
)
from bench.rooms import (  # noqa: E402
    check_room,
    is_ghost,
    room_history,
)
from bridge.harness.synapse import MatrixTestClient  # noqa: E402
from tests.e2e.test_bot import replies_to  # noqa: E402

TARGET = 0.8
TAG = "h"
FIRST = dt.datetime(2020, 1, 6, 8, 0, tzinfo=dt.UTC)


def history_mail(address: str, seq: int) -> bytes:
    """make_mail's mail with a Date, one hour after the one before, and Message-ID
    history-SEQ; every third answers the one before it (threads form as the history is
    imported, oldest first)."""
    raw = make_mail(address, TAG, seq)
    raw = re.sub(rb"Message-ID: <[^>]+>", b"Message-ID: <history-%d@example.test>" % seq, raw)
    head = b"Date: " + format_datetime(FIRST + dt.timedelta(hours=seq)).encode() + b"\n"
    if seq % 3 == 1:
        parent = b"<history-%d@example.test>" % (seq - 1)
        head += b"In-Reply-To: " + parent + b"\nReferences: " + parent + b"\n"
    return head + raw


async def plain_rate(
    servers: Servers,
    alice: MatrixTestClient,
    count: int,
    probes: Probes,
    side: str,
    *,
    with_bot: bool = True,
) -> dict[str, Any]:
    if with_bot:
        room_id = await alice.create_room(invite=[servers.bot], name=f"plain {side}")
        await alice.wait_for_membership(room_id, servers.bot, "join", timeout=60)
    else:
        room_id = await alice.create_room(name=f"plain {side}, no bot")
    return await plain_phase(alice, {f"p{side}": room_id}, count, probes, f"plain-{side}")


async def backfill_phase(
    servers: Servers, alice: MatrixTestClient, room_id: str, count: int, probes: Probes
) -> dict[str, Any]:
    bot = servers.bot
    probes.start("backfill", bridge=True)
    question = await alice.send_text(room_id, f"!passerelle backfill {servers.single}")
    answer = await alice.wait_for_event(room_id, replies_to(question, bot), timeout=60)
    if "Importing the history" not in answer["content"].get("body", ""):
        raise RuntimeError(f"backfill refused: {answer['content'].get('body')}")

    async def final() -> dict[str, Any] | None:
        for event in reversed(await alice.messages(room_id, limit=20)):
            body = str((event.get("content") or {}).get("body", ""))
            relates = (event.get("content") or {}).get("m.relates_to")
            if event.get("sender") == bot and relates is None and "imported:" in body:
                return event
            if event.get("sender") == bot and "stopped:" in body:
                raise RuntimeError(body)
        return None

    done = await retry_until(final, 120 + count * 0.5, "the backfill's final notice", 1.0)
    cpu = probes.stop()
    asked = await alice.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(question)}"
    )
    elapsed = (int(done["origin_server_ts"]) - int(asked["origin_server_ts"])) / 1000
    # Printed before the history is read back: on a loaded machine that read can time out.
    print(f"backfill: {count} mails in {elapsed:.1f} s, {count / elapsed:.2f}/s", flush=True)
    for attempt in range(5):
        try:
            events = await room_history(alice, room_id)
            break
        except TimeoutError:
            if attempt == 4:
                raise
            print("reading the room's history timed out; again", flush=True)
    check = check_room(events, TAG, count, is_ghost, bot)
    return {
        "mails": count,
        "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(count / elapsed, 2),
        "summary": done["content"]["body"],
        "duplicates": check.duplicates,
        "missing": len(check.missing),
        "out_of_order": check.out_of_order,
        "cpu_s": cpu,
        "cpu_ms_per_mail": {
            k: round(1000 * v / count, 1) for k, v in cpu.items() if k not in ("wall",)
        },
    }


async def run(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    synapse_pid = find_pid(str(servers.synapse.config_path))
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    probes = Probes(
        CpuMeter(synapse_pid, bridge_pid, servers.dovecot.run_dir / "master.pid"),
        Profiler(args.profile, native=args.native),
        synapse_pid,
        bridge_pid,
    )
    results: dict[str, Any] = {"mails": args.mails, "load_before": os.getloadavg()}
    print(f"APPENDing {args.mails} mails", flush=True)
    mails = [history_mail(servers.single, seq) for seq in range(args.mails)]
    begin = time.monotonic()
    await append_mails(servers.dovecot, servers.single, mails)
    results["append_s"] = round(time.monotonic() - begin, 1)
    async with MatrixTestClient(
        servers.synapse.base_url, servers.alice_token, servers.alice_id
    ) as alice:
        room_id = await link_room(servers, alice, servers.single, "history")
        if args.warmup:
            warm = await alice.create_room(name="warm-up")
            for seq in range(args.warmup):
                await alice.send_text(warm, f"warm-up {seq}")
        print("plain sends (before)", flush=True)
        results["plain_before"] = await plain_rate(servers, alice, args.plain, probes, "a")
        print(f"plain: {results['plain_before']['rate_per_s']}/s", flush=True)
        print("backfill", flush=True)
        results["backfill"] = await backfill_phase(servers, alice, room_id, args.mails, probes)
        print("plain sends (after)", flush=True)
        results["plain_after"] = await plain_rate(servers, alice, args.plain, probes, "b")
        if args.bare:
            print("plain sends (a room without the bot)", flush=True)
            results["plain_bare"] = await plain_rate(
                servers, alice, args.plain, probes, "c", with_bot=False
            )
    plain = (results["plain_before"]["rate_per_s"] + results["plain_after"]["rate_per_s"]) / 2
    results["plain_rate_per_s"] = round(plain, 2)
    results["backfill_rate_per_s"] = results["backfill"]["rate_per_s"]
    results["ratio"] = round(results["backfill_rate_per_s"] / plain, 3)
    results["target"] = TARGET
    if "plain_bare" in results:
        bare = results["plain_bare"]["rate_per_s"]
        results["ratio_bare"] = round(results["backfill_rate_per_s"] / bare, 3)
    results["load_after"] = os.getloadavg()
    results["disturbed"] = disturbed_phases(results)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mails", type=int, default=10000, help="mails in the folder")
    parser.add_argument(
        "--warmup", type=int, default=300, help="unmeasured sends first, to warm Synapse up"
    )
    parser.add_argument(
        "--plain",
        type=int,
        default=None,
        help="sends in each plain phase (default: as many as --mails, at most 2,000: a rate "
        "needs no more)",
    )
    parser.add_argument(
        "--bare",
        action="store_true",
        help="also time the plain sends into a room without the bot (Synapse then pushes "
        "nothing to the bridge): a second, harsher reference",
    )
    for option, whose in (("--database", "the bridge's"), ("--synapse-db", "Synapse's")):
        parser.add_argument(
            option,
            choices=("sqlite", "postgresql"),
            default="sqlite",
            help=f"{whose} database (PostgreSQL: the machine's server, or a throw-away cluster)",
        )
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.mails < 1 or args.mails > 99999 or args.warmup < 0:
        parser.error("--mails must be 1 to 99999, --warmup positive")
    if args.plain is None:
        args.plain = min(args.mails, 2000)
    if args.plain < 1:
        parser.error("--plain must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    code = code_version()
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        print(f"starting Dovecot, Synapse and the bridge in {folder}", flush=True)
        servers = start_servers(
            folder, 0, stack, synapse_db=args.synapse_db, database=args.database
        )
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
    results["database"], results["synapse_db"] = args.database, args.synapse_db
    b = results["backfill"]
    print()
    print(
        f"plain client: {results['plain_rate_per_s']}/s (mean of before and after); "
        f"backfill: {b['rate_per_s']}/s ({b['mails']} mails in {b['elapsed_s']} s)"
    )
    verdict = "met" if results["ratio"] >= TARGET else "MISSED"
    print(f"backfill/plain: {results['ratio']:.2f} (target >= {TARGET}) {verdict}")
    if "ratio_bare" in results:
        print(
            f"against sends into a room without the bot ({results['plain_bare']['rate_per_s']}"
            f"/s): {results['ratio_bare']:.2f}"
        )
    problems = [f"{b[k]} {k}" for k in ("duplicates", "missing", "out_of_order") if b[k]]
    print("order and once-only: " + ("; ".join(problems) if problems else "ok"))
    print(f"bridge CPU per mail: {b['cpu_ms_per_mail'].get('bridge')} ms")
    load = results["load_before"], results["load_after"]
    print(f"load average before {load[0]}, after {load[1]}")
    if results["disturbed"]:
        print(f"disturbed phases (others' CPU share of a core): {results['disturbed']}")
    print(json.dumps(results, sort_keys=True))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
