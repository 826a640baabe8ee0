#!/usr/bin/env python3
"""Matrix → mail capacity and latency of the bridge, as ratios to bare SMTP and to Synapse.

Starts its own Dovecot (the list's mailbox: a link needs one), an SMTP sink in a process of its
own, Synapse (with the bridge's registration and a second, probe appservice's) and
`python -m bridge run` on 127.0.0.1 with free ports and a temporary directory, measures, prints,
stops everything:

    python bench/matrix_to_mail.py [--events 1000] [--batch 100] [--latency 100] [--pace 0.2]

Two figures, against references measured in the same run:

1. capacity: N m.room.message events are PUT to the bridge's transaction endpoint in
   transactions of B, back to back, each waiting for its 200 (as Synapse does); rate = N /
   (last mail accepted by the sink - start of the first PUT). Reference: aiosmtplib sending N
   mails of the same size to the same sink, 4 at a time and a new connection per mail (as the
   bridge's outbox worker does), before and after the bridge's turn; also one at a time.
2. latency: K messages sent one at a time by a user through Synapse's client API, S seconds
   apart. Per message: send -> the event in the probe appservice's transaction (Synapse's own
   latency) and send -> the bridge's mail accepted by the sink; p50 and p99 of both.
3. Postfix (`--postfix P`, 0 skips it): the harness's Postfix accepting raw aiosmtplib, 4 at
   a time, before and after the bridge's turn (its own accept rate), and the bridge, restarted
   to send there, as in 1 (accepted = the bridge logged the mail sent); exactly once checked on
   the mail Postfix delivered (aliased to a mailbox the bridge does not watch).

The bridge's database is SQLite or, with `--database postgresql`, a fresh PostgreSQL database;
its CPU per mail in the capacity phase is `bridge_cpu_ms_per_mail` in the JSON line.

The sink notes the time it accepts each mail's DATA and the marker in its body (sequence
number), so every mail is also checked to arrive exactly once. The last line printed is one
JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import email.utils
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib

# `bench` and `tests` are not installed packages: import them from this checkout.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.mail_out_log import bridge_sent_times, queued_times, sql_per_mail  # noqa: E402
from bench.mail_out_servers import (  # noqa: E402
    APP_PREFIX,
    FROM_ADDRESS,
    Servers,
    SinkCpuMeter,
    start_servers,
)
from bench.mail_to_matrix import (  # noqa: E402
    link_room,
    marker,
    mean_rate,
)
from bench.measure import (  # noqa: E402
    BUSY_CORES,
    Probes,
    Profiler,
    add_run_options,
    code_version,
    disturbed_phases,
    find_pid,
    percentile,
    profile_summaries,
    quote,
    temp_folder,
)
from bench.pinning import read_pid, split_cores  # noqa: E402
from bench.rooms import (  # noqa: E402
    MARKER_RE,
)
from bench.smtp_sink import SinkLog, find_marker, serve_sink  # noqa: E402
from bridge.harness.synapse import MatrixTestClient  # noqa: E402

CAPACITY_TARGET = 0.8  # bridge rate / raw aiosmtplib rate
LATENCY_TARGET_MS = 20.0  # p50(send -> SMTP) - p50(send -> transaction)
OUTBOX_CONCURRENCY = 4  # OutboxWorker's default (bridge/mail/outbox.py)
DISPLAY_NAME = "Alice Martin"
MARKER_BYTES = re.compile(MARKER_RE.pattern.encode())
POSTFIX_TARGET = 0.95  # bridge rate into Postfix / Postfix's accept rate (raw aiosmtplib)
CPU_TARGET_MS = 5.0  # bridge CPU per mail out


def message_text(tag: str, seq: int) -> str:
    """What a person writes; the first line becomes the mail's Subject."""
    return (
        f"Livraison {marker(tag, seq)}\n"
        "Bonjour,\n"
        f"je confirme la livraison de {20 + seq % 30} ramettes de papier au bureau 204 avant "
        "vendredi. Merci de me renvoyer le bon de commande signé.\n"
        "Cordialement,\nAlice"
    )


def raw_mail(address: str, tag: str, seq: int) -> bytes:
    """About what the bridge composes for the same message (bridge/mail/compose.py)."""
    text = message_text(tag, seq)
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f'"{DISPLAY_NAME} via Passerelle" <{FROM_ADDRESS}>'
    msg["To"] = address
    msg["Reply-To"] = address
    msg["Subject"] = text.split("\n", 1)[0]
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain="example.test")
    msg["X-Passerelle-Loop"] = "example.test"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(text, cte="quoted-printable")
    return msg.as_bytes()


def ms_stats(prefix: str, values: Sequence[float]) -> dict[str, float | None]:
    """{prefix_p50_ms, prefix_p99_ms} of values in seconds."""
    return {
        f"{prefix}_{name}_ms": (
            round(1000 * v, 1) if (v := percentile(values, q)) is not None else None
        )
        for name, q in (("p50", 50), ("p99", 99))
    }


def with_cpu(result: dict[str, Any], cpu: dict[str, float], messages: int) -> dict[str, Any]:
    result["cpu_s"] = cpu
    result["cpu_ms_per_message"] = {
        k: round(1000 * v / messages, 2) for k, v in cpu.items() if k not in ("wall", "machine")
    }
    return result


# --- phases --------------------------------------------------------------------------------------


@dataclass
class Bench:
    servers: Servers
    sink_log: SinkLog
    probes: Probes
    room_id: str = ""

    async def raw(self, tag: str, count: int, concurrency: int) -> dict[str, Any]:
        """aiosmtplib alone: `count` mails, `concurrency` at a time, a connection per mail."""
        address = self.servers.list_address
        mails = iter([raw_mail(address, tag, seq) for seq in range(count)])
        helo = await asyncio.to_thread(socket.getfqdn)

        async def worker() -> None:
            for raw in mails:  # one iterator shared by the workers
                await aiosmtplib.send(
                    raw,
                    sender=FROM_ADDRESS,
                    recipients=[address],
                    hostname="127.0.0.1",
                    port=self.servers.sink.port,
                    local_hostname=helo,
                    start_tls=False,
                    timeout=30,
                )

        self.probes.start(f"raw-{tag}", bridge=False)
        start = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        complete = await self.sink_log.wait(tag, count, 60)
        cpu = self.probes.stop()
        check = self.sink_log.check(tag, count)
        last = max((max(t) for t in self.sink_log.times(tag).values()), default=start)
        elapsed = last - start
        result = {
            "concurrency": concurrency,
            "sends": count,
            "complete": complete,
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(count / elapsed, 1) if elapsed > 0 else None,
            **check,
        }
        return with_cpu(result, cpu, count)

    async def capacity(
        self, run: str, count: int, batch: int, *, postfix: bool = False, tag: str = ""
    ) -> dict[str, Any]:
        """`count` events PUT straight to the bridge in transactions of `batch`, back to back.

        Accepted: when the sink accepted each mail (its log); with `postfix`, when the bridge
        logged it sent (Postfix answered 250 to its DATA), and exactly once is checked on what
        Postfix delivered to the archive mailbox."""
        tag = tag or ("pfx" if postfix else "cap")
        phase = "postfix-bridge" if postfix else "capacity"
        now = int(time.time() * 1000)
        events = [
            {
                "type": "m.room.message",
                "room_id": self.room_id,
                "sender": self.servers.alice_id,
                "event_id": f"$bench-{run}-{seq}",
                "origin_server_ts": now + seq,
                "content": {"msgtype": "m.text", "body": message_text(tag, seq)},
                "unsigned": {"age": 5},
            }
            for seq in range(count)
        ]
        url = f"{self.servers.bridge.base_url}{APP_PREFIX}/transactions/"
        token = self.servers.bridge.config.appservice.hs_token
        put_s: list[float] = []
        timeout = 120 + count * 0.5
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
            self.probes.start(phase, bridge=True)
            start = time.time()
            for number, first in enumerate(range(0, count, batch)):
                begin = time.time()
                body = {"events": events[first : first + batch]}
                async with http.put(url + quote(f"bench-{run}-{number}"), json=body) as response:
                    answer = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"transaction refused: {response.status} {answer!r}")
                put_s.append(time.time() - begin)
            stored = time.time()
            if postfix:
                complete = await self.wait_sent(run, count, timeout)
            else:
                complete = await self.sink_log.wait(tag, count, timeout)
            cpu = self.probes.stop()
        if postfix:
            sent = bridge_sent_times(self.servers.bridge.log_text().splitlines(), run)
            accepted = list(sent.values())
            check = await self.delivered(tag, count)
        else:
            await asyncio.sleep(1)  # a late duplicate would show now
            check = self.sink_log.check(tag, count)
            accepted = [min(t) for t in self.sink_log.times(tag).values()]
        elapsed = (max(accepted) - start) if accepted else float("nan")
        result = {
            "window": (start, max(accepted, default=start)),
            "events": count,
            "batch": batch,
            "transactions": len(put_s),
            "complete": complete,
            "puts_s": round(stored - start, 3),
            **ms_stats("put", put_s),
            "first_accepted_ms": round(1000 * (min(accepted) - start)) if accepted else None,
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(len(accepted) / elapsed, 1) if accepted else 0.0,
            **check,
        }
        return with_cpu(result, cpu, count)

    async def wait_sent(self, run: str, count: int, timeout: float) -> bool:
        """Until the bridge logged `count` mails of this run sent; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.servers.bridge.log_text().splitlines()
            if len(bridge_sent_times(lines, run)) >= count:
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)

    async def delivered(self, tag: str, count: int, timeout: float = 120) -> dict[str, Any]:
        """Exactly once, on what Postfix delivered (LMTP) to the archive mailbox: every
        sequence number of 0..count-1 once. Waits for the deliveries (not timed)."""
        maildir = self.servers.dovecot.maildir(self.servers.archive_address)
        deadline = time.monotonic() + timeout
        seen: dict[int, int] = {}
        sizes: list[int] = []
        read: set[str] = set()
        while True:
            for folder in ("new", "cur"):
                for path in (maildir / folder).iterdir():
                    name = path.name.split(":", 1)[0]
                    if name in read:
                        continue
                    read.add(name)
                    content = path.read_bytes()
                    found_tag, seq = find_marker(content)
                    if found_tag == tag:
                        seen[seq] = seen.get(seq, 0) + 1
                        sizes.append(len(content))
            if len(seen) >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # a late duplicate would show now
        missing = [seq for seq in range(count) if seq not in seen]
        return {
            "accepted": sum(seen.values()),
            "duplicates": sum(n - 1 for n in seen.values()),
            "missing": len(missing),
            "missing_first": missing[:10],
            "unexpected": sum(1 for seq in seen if not 0 <= seq < count),
            "mean_size": round(sum(sizes) / len(sizes)) if sizes else None,
        }

    async def raw_postfix(self, tag: str, count: int, concurrency: int) -> dict[str, Any]:
        """aiosmtplib alone into Postfix: `count` mails, `concurrency` at a time, a connection
        per mail. Accepted: when Postfix answered the DATA (the client's own clock)."""
        postfix = self.servers.postfix
        assert postfix is not None
        address = self.servers.list_address
        mails = iter([(seq, raw_mail(address, tag, seq)) for seq in range(count)])
        helo = await asyncio.to_thread(socket.getfqdn)
        accepted: list[float] = []

        async def worker() -> None:
            for _, raw in mails:  # one iterator shared by the workers
                await aiosmtplib.send(
                    raw,
                    sender=FROM_ADDRESS,
                    recipients=[address],
                    hostname="127.0.0.1",
                    port=postfix.smtp_port,
                    local_hostname=helo,
                    start_tls=False,
                    timeout=30,
                )
                accepted.append(time.time())

        self.probes.start(f"postfix-raw-{tag}", bridge=False)
        start = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = self.probes.stop()
        elapsed = max(accepted) - start
        check = await self.delivered(tag, count)
        result = {
            "concurrency": concurrency,
            "sends": count,
            "elapsed_s": round(elapsed, 3),
            "rate_per_s": round(count / elapsed, 1) if elapsed > 0 else None,
            **check,
        }
        return with_cpu(result, cpu, count)

    async def send_paced(
        self, alice: MatrixTestClient, tag: str, count: int, pace: float
    ) -> dict[int, tuple[float, float, str]]:
        """`count` messages through Synapse, one every `pace` seconds (or back to back when a
        send takes longer); seq -> (before the PUT, after its answer, event ID)."""
        sent: dict[int, tuple[float, float, str]] = {}
        start = time.monotonic()
        for seq in range(count):
            await asyncio.sleep(max(0.0, start + seq * pace - time.monotonic()))
            begin = time.time()
            event_id = await alice.send_text(self.room_id, message_text(tag, seq))
            sent[seq] = (begin, time.time(), event_id)
        return sent

    async def latency(self, alice: MatrixTestClient, count: int, pace: float) -> dict[str, Any]:
        """Per message sent through Synapse: when the probe got it, when the sink did."""
        tag = "lat"
        self.probes.start("latency", bridge=True)
        sent = await self.send_paced(alice, tag, count, pace)
        complete = await self.sink_log.wait(tag, count, 60)
        deadline = time.monotonic() + 30
        probe = self.servers.probe
        while sum(k[0] == tag for k in probe.arrived) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        cpu = self.probes.stop()
        check = self.sink_log.check(tag, count)
        accepted = self.sink_log.times(tag)
        queued = queued_times(self.servers.bridge.log_text().splitlines())
        send, txn, smtp, own, to_outbox, from_outbox = [], [], [], [], [], []
        for seq, (begin, end, event_id) in sent.items():
            send.append(end - begin)
            pushed = probe.arrived.get((tag, seq))
            mailed = min(accepted[seq]) if seq in accepted else None
            stored = queued.get(event_id)
            if pushed is not None:
                txn.append(pushed - begin)
            if mailed is not None:
                smtp.append(mailed - begin)
            if pushed is not None and mailed is not None:
                own.append(mailed - pushed)
            if pushed is not None and stored is not None:
                to_outbox.append(stored - pushed)
            if stored is not None and mailed is not None:
                from_outbox.append(mailed - stored)
        result: dict[str, Any] = {
            "messages": count,
            "pace_s": pace,
            "complete": complete,
            "pushed_to_probe": len(txn),
            **ms_stats("send", send),
            **ms_stats("txn", txn),
            **ms_stats("smtp", smtp),
            **ms_stats("smtp_after_txn", own),
            # The bridge's log has millisecond stamps: a split to the millisecond, no better.
            **ms_stats("txn_to_queued", to_outbox),
            **ms_stats("queued_to_smtp", from_outbox),
            **check,
        }
        if result["smtp_p50_ms"] is not None and result["txn_p50_ms"] is not None:
            result["p50_difference_ms"] = round(result["smtp_p50_ms"] - result["txn_p50_ms"], 1)
        return with_cpu(result, cpu, count)


def describe(result: dict[str, Any]) -> None:
    cpu = result["cpu_ms_per_message"]
    print(
        f"    CPU per message: synapse {cpu['synapse']} ms, bridge {cpu['bridge']} ms, "
        f"sink {cpu['sink']} ms, dovecot {cpu['dovecot']} ms, postgres {cpu['postgres']} ms, "
        f"bench {cpu['bench']} ms, other processes {cpu['others']} ms",
        flush=True,
    )
    problems = {k: result[k] for k in ("duplicates", "missing", "unexpected") if result.get(k)}
    if problems:
        print(f"  PROBLEMS: {problems} (first missing: {result.get('missing_first')})")


async def run(servers: Servers, args: argparse.Namespace) -> dict[str, Any]:
    synapse_pid = find_pid(str(servers.synapse.config_path))
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    sink_pid = servers.sink.proc.pid if servers.sink.proc else None
    meter = SinkCpuMeter(
        synapse_pid,
        bridge_pid,
        servers.dovecot.run_dir / "master.pid",
        sink_pid=sink_pid,
        postfix_pid_file=servers.postfix.pid_path if servers.postfix else None,
    )
    probes = Probes(meter, Profiler(args.profile, native=args.native), synapse_pid, bridge_pid)
    bench = Bench(servers, SinkLog(servers.sink.log_path), probes)
    results: dict[str, Any] = {
        "events": args.events,
        "batch": args.batch,
        "database": args.database,
    }
    await servers.probe.start()
    try:
        async with MatrixTestClient(
            servers.synapse.base_url, servers.alice_token, servers.alice_id
        ) as alice:
            await alice.set_displayname(DISPLAY_NAME)
            bench.room_id = await link_room(servers, alice, servers.list_address, "Achats")
            if args.warmup:
                # Cold caches (Synapse's, the bridge's first SMTP connections) are paid by
                # neither side of a ratio.
                await bench.send_paced(alice, "warm", args.warmup, 0)
                if not await bench.sink_log.wait("warm", args.warmup, 60 + args.warmup):
                    raise RuntimeError("the warm-up messages did not all reach the SMTP sink")
            await asyncio.sleep(2)

            print(f"capacity: {args.events} mails", flush=True)
            results["raw_before"] = before = await bench.raw("rawa", args.events, 4)
            print(f"  raw aiosmtplib, 4 at a time (before): {before['rate_per_s']}/s")
            describe(before)
            results["raw_sequential"] = one = await bench.raw("rawseq", args.events, 1)
            print(f"  raw aiosmtplib, one at a time:        {one['rate_per_s']}/s")
            describe(one)
            await asyncio.sleep(1)
            run_id = uuid.uuid4().hex[:8]
            results["bridge"] = bridge = await bench.capacity(run_id, args.events, args.batch)
            print(
                f"  bridge: {bridge['events']} events in {bridge['transactions']} transactions "
                f"(all answered after {bridge['puts_s']} s, PUT p50 {bridge['put_p50_ms']} ms), "
                f"{bridge['accepted']} mails accepted in {bridge['elapsed_s']} s = "
                f"{bridge['rate_per_s']}/s"
            )
            describe(bridge)
            results["raw_after"] = after = await bench.raw("rawb", args.events, 4)
            print(f"  raw aiosmtplib, 4 at a time (after):  {after['rate_per_s']}/s")
            describe(after)

            if args.latency:
                await asyncio.sleep(2)
                print(f"latency: {args.latency} messages, {args.pace} s apart", flush=True)
                results["latency"] = lat = await bench.latency(alice, args.latency, args.pace)
                print(
                    f"  send -> transaction p50 {lat['txn_p50_ms']} ms, p99 {lat['txn_p99_ms']} "
                    f"ms; send -> SMTP p50 {lat['smtp_p50_ms']} ms, p99 {lat['smtp_p99_ms']} ms"
                )
                describe(lat)

            if args.postfix:
                results["postfix"] = pfx = await postfix_phase(bench, args)
                if pfx["raw_rate_per_s"]:
                    pfx["capacity_over_postfix"] = round(
                        results["bridge"]["rate_per_s"] / pfx["raw_rate_per_s"], 3
                    )
    finally:
        await servers.probe.stop()

    results["raw_rate_per_s"] = raw_rate = mean_rate(before, after)
    results["ratio"] = round(bridge["rate_per_s"] / raw_rate, 3) if raw_rate else None
    results["bridge_cpu_ms_per_mail"] = bridge["cpu_ms_per_message"]["bridge"]
    results["disturbed"] = disturbed_phases(results)
    if "postfix" in results:
        disturbed = disturbed_phases(results["postfix"])
        results["disturbed"] |= {f"postfix_{key}": v for key, v in disturbed.items()}
    bench.sink_log.refresh()
    results["sink_unmarked"] = sum(len(v) for v in bench.sink_log.times("?").values())
    if args.profile:
        results["profiles"] = profile_summaries(args.profile)
    return results


async def postfix_phase(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    """The same capacity phase against the harness's Postfix: its own accept rate (raw
    aiosmtplib, before and after) and the bridge's, restarted to send there."""
    servers = bench.servers
    postfix = servers.postfix
    assert postfix is not None
    count = args.postfix
    print(f"postfix: {count} mails", flush=True)
    await asyncio.to_thread(servers.restart_bridge, postfix.smtp_port)
    bridge_pid = servers.bridge.proc.pid if servers.bridge.proc else None
    bench.probes.bridge_pid = bench.probes.meter.bridge_pid = bridge_pid
    cores: contextlib.AbstractContextManager[dict[str, list[int]] | None] = (
        contextlib.nullcontext()
    )
    if args.split_cores:
        assert servers.sink.proc is not None
        mta = [read_pid(postfix.pid_path), read_pid(servers.dovecot.run_dir / "master.pid")]
        rest = [os.getpid(), servers.sink.proc.pid, bench.probes.meter.synapse_pid]
        cores = split_cores(mta, [pid for pid in [*rest, bridge_pid] if pid is not None])
    with cores as split:
        # Warm-up, unmeasured: the restarted bridge's first mails, Postfix's first connections.
        warm_run = uuid.uuid4().hex[:8]
        await bench.capacity(warm_run, min(50, count), args.batch, postfix=True, tag="pfxw")
        result: dict[str, Any] = {"mails": count}
        result["raw_before"] = before = await bench.raw_postfix("pfxa", count, OUTBOX_CONCURRENCY)
        print(f"  raw aiosmtplib into Postfix, 4 at a time (before): {before['rate_per_s']}/s")
        describe(before)
        await asyncio.sleep(1)
        result["bridge"] = bridge = await bench.capacity(
            uuid.uuid4().hex[:8], count, args.batch, postfix=True
        )
        print(
            f"  bridge into Postfix: {bridge['accepted']} mails delivered, sent in "
            f"{bridge['elapsed_s']} s = {bridge['rate_per_s']}/s"
        )
        describe(bridge)
        result["raw_after"] = after = await bench.raw_postfix("pfxb", count, OUTBOX_CONCURRENCY)
        print(f"  raw aiosmtplib into Postfix, 4 at a time (after):  {after['rate_per_s']}/s")
        describe(after)
    result["raw_rate_per_s"] = raw_rate = mean_rate(before, after)
    result["ratio"] = round(bridge["rate_per_s"] / raw_rate, 3) if raw_rate else None
    result["bridge_cpu_ms_per_mail"] = bridge["cpu_ms_per_message"]["bridge"]
    if split is not None:
        # Each side on cores of its own, as on machines of their own: how busy the mail
        # servers' core was in each turn (1.0: the MTA is the limit).
        result["split_cores"] = split
        result["mta_core_busy"] = {
            turn: round((r["cpu_s"]["postfix"] + r["cpu_s"]["dovecot"]) / r["cpu_s"]["wall"], 2)
            for turn, r in (("raw_before", before), ("bridge", bridge), ("raw_after", after))
        }
    # What the machine allows: at the CPU every process spent per mail in the bridge's turn
    # (the bridge, Postfix, Dovecot's LMTP, ...), all its cores busy would give this rate.
    machine_cpu_s = bridge["cpu_s"]["machine"]
    if machine_cpu_s > 0 and raw_rate:
        ceiling = (os.cpu_count() or 1) * bridge["accepted"] / machine_cpu_s
        result["cpu_ceiling_per_s"] = round(ceiling, 1)
        result["cpu_ceiling_ratio"] = round(ceiling / raw_rate, 3)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=1000, help="events in the capacity phase")
    parser.add_argument("--batch", type=int, default=100, help="events per transaction")
    parser.add_argument(
        "--latency", type=int, default=100, help="messages in the latency phase (0: skip)"
    )
    parser.add_argument(
        "--pace", type=float, default=0.2, help="seconds between two latency messages"
    )
    parser.add_argument(
        "--warmup", type=int, default=50, help="unmeasured messages through Synapse first"
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the bridge's database (PostgreSQL: the machine's, or a throw-away cluster)",
    )
    parser.add_argument(
        "--postfix",
        type=int,
        default=None,
        help="mails in the Postfix phase (default: as many as --events; 0: skip)",
    )
    parser.add_argument(
        "--split-cores",
        action="store_true",
        help="in the Postfix phase, Postfix and Dovecot on the last core and the rest (the "
        "bridge or the raw client, Synapse, PostgreSQL) on the others: the MTA as on a machine "
        "of its own",
    )
    add_run_options(parser)
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="log the bridge's SQL and count its transactions and statements per mail in the "
        "capacity phase (slows the bridge: not for the ratios)",
    )
    parser.add_argument("--serve-sink", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink is None and (
        args.events < 1 or args.batch < 1 or min(args.latency, args.warmup) < 0 or args.pace < 0
    ):
        parser.error("counts must be positive")
    if args.postfix is None:
        args.postfix = args.events
    if args.postfix < 0:
        parser.error("counts must be positive")
    if args.profile is not None:
        args.profile = args.profile.resolve()
    return args


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    bridge, ratio = results["bridge"], results["ratio"]
    print()
    print(
        f"capacity: bridge {bridge['rate_per_s']} mails/s ({args.events} events in transactions "
        f"of {args.batch}); raw aiosmtplib 4 at a time {results['raw_rate_per_s']}/s (before "
        f"{results['raw_before']['rate_per_s']}, after {results['raw_after']['rate_per_s']}), "
        f"one at a time {results['raw_sequential']['rate_per_s']}/s"
    )
    missed = []
    if ratio is not None:
        ok = ratio >= CAPACITY_TARGET
        print(f"bridge/raw: {ratio:.2f} (target >= {CAPACITY_TARGET}) {verdict(ok)}")
        if not ok:
            missed.append("capacity")
    cpu = results["bridge_cpu_ms_per_mail"]
    print(
        f"bridge CPU per mail (capacity, {results['database']}): {cpu} ms "
        f"(target <= {CPU_TARGET_MS:.0f} ms) {verdict(cpu <= CPU_TARGET_MS)}"
    )
    if cpu > CPU_TARGET_MS:
        missed.append("cpu")
    pfx = results.get("postfix")
    if pfx is not None:
        print(
            f"postfix: bridge {pfx['bridge']['rate_per_s']} mails/s; raw aiosmtplib 4 at a time "
            f"{pfx['raw_rate_per_s']}/s (before {pfx['raw_before']['rate_per_s']}, after "
            f"{pfx['raw_after']['rate_per_s']}); bridge CPU per mail "
            f"{pfx['bridge_cpu_ms_per_mail']} ms"
        )
        if pfx["ratio"] is not None:
            ok = pfx["ratio"] >= POSTFIX_TARGET
            print(f"bridge/Postfix: {pfx['ratio']:.2f} (target >= {POSTFIX_TARGET}) {verdict(ok)}")
            if not ok:
                missed.append("postfix")
        if "mta_core_busy" in pfx:
            print(
                f"  split cores {pfx['split_cores']}: the mail servers' core busy "
                + ", ".join(f"{v:.2f} ({k})" for k, v in pfx["mta_core_busy"].items())
            )
        if "cpu_ceiling_ratio" in pfx:
            print(
                f"  at the CPU all processes spent per mail in the bridge's turn, "
                f"{os.cpu_count()} cores allow {pfx['cpu_ceiling_per_s']}/s "
                f"({pfx['cpu_ceiling_ratio']:.2f} of raw Postfix)"
            )
        if pfx.get("capacity_over_postfix") is not None:
            print(
                f"  bridge capacity (to the sink) / raw Postfix: "
                f"{pfx['capacity_over_postfix']:.2f} (the bridge alone outpaces Postfix when > 1)"
            )
    lat = results.get("latency")
    if lat is not None:
        print(
            f"latency send -> transaction (Synapse, probe appservice): p50 {lat['txn_p50_ms']} "
            f"ms, p99 {lat['txn_p99_ms']} ms"
        )
        print(
            f"latency send -> SMTP accepted (bridge): p50 {lat['smtp_p50_ms']} ms, "
            f"p99 {lat['smtp_p99_ms']} ms (after the transaction: p50 "
            f"{lat['smtp_after_txn_p50_ms']} ms, p99 {lat['smtp_after_txn_p99_ms']} ms)"
        )
        print(
            f"  of which transaction -> in the outbox p50 {lat['txn_to_queued_p50_ms']} ms, "
            f"queued -> SMTP accepted p50 {lat['queued_to_smtp_p50_ms']} ms"
        )
        difference = lat.get("p50_difference_ms")
        if difference is not None:
            ok = difference <= LATENCY_TARGET_MS
            print(
                f"p50 difference: {difference:+.1f} ms (target <= +{LATENCY_TARGET_MS:.0f} ms) "
                f"{verdict(ok)}"
            )
            if not ok:
                missed.append("latency")
    phases = {"bridge": results["bridge"], "latency": results.get("latency")}
    if pfx is not None:
        phases |= {f"postfix {k}": pfx[k] for k in ("raw_before", "bridge", "raw_after")}
    problems = [
        f"{key}: {phase[k]} {k}"
        for key, phase in phases.items()
        if phase is not None
        for k in ("duplicates", "missing", "unexpected")
        if phase[k]
    ]
    print("exactly once: " + ("; ".join(problems) if problems else "ok"))
    if results["disturbed"]:
        print(
            "WARNING: other processes on this machine used more than "
            f"{BUSY_CORES} cores during {', '.join(results['disturbed'])} "
            f"(cores used: {results['disturbed']}); those numbers are unreliable: run again "
            "on a quiet machine"
        )
    if missed:
        print(f"target missed for: {', '.join(missed)}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sink is not None:  # the sink's old command line
        serve_sink(int(args.serve_sink[0]), Path(args.serve_sink[1]))
        return 0
    started = time.monotonic()
    code = code_version()  # before the bridge starts: the tree may change during the run
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        print(
            f"starting Dovecot, the SMTP sink, Postfix, Synapse and the bridge ({args.database}) "
            f"in {folder}",
            flush=True,
        )
        servers = start_servers(
            folder,
            stack,
            diagnose=args.diagnose,
            database=args.database,
            postfix=args.postfix > 0,
        )
        try:
            results = asyncio.run(run(servers, args))
        except BaseException:
            print(f"--- bridge log tail ---\n{servers.bridge.log_tail(40)}", file=sys.stderr)
            raise
        log_lines = servers.bridge.log_text().splitlines()
        if args.diagnose:
            results["sql_per_mail"] = sql = sql_per_mail(log_lines, results["bridge"], args.events)
            print(f"bridge SQL per mail (capacity phase): {json.dumps(sql)}")
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
    report(results, args)
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
