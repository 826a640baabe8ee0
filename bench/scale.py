#!/usr/bin/env python3
"""The measured budget at scale: mapping lookups, start-up, memory and IMAP connections with
10,000 links, 1,000,000 Message-ID ⇄ event mappings and 100,000 ghosts.

    python bench/scale.py [--database sqlite|postgresql] [--quick] [--keep]
                           [--mappings N] [--profile FILE]

Fills a bridge database (made by the bridge's own migrations) in two steps, a tenth of the
mappings first and then the rest, and after each step:

1. looks mappings up with the bridge's own query functions (`bridge.db.mail.lookup`: Message-ID →
   event, for threading; `lookup_event`: event → Message-ID, for replies; `bridge.db.remote`
   `by_remote_event` / `by_agency_event`: remote ⇄ agency event), 90 % known keys, 10 % unknown,
   each timed alone (p50/p99);
2. starts `python -m bridge run` on that database until /health answers with every linked
   mailbox watched (start-up to ready), reads its RSS, watches it for a while (IMAP connections
   it holds, counted in /proc, and its RSS again), stops it.

Half the links are mail links made in rooms, each with its mailbox (a Dovecot user of the
harness) in mail.mailboxes; the other half are links to rooms of one remote. The homeserver and
the remote are not running (closed ports): the bridge starts without them by design, and what
is measured is its own start-up. At the end it starts once more with every mail link also in
the config's `links:` (the other start-up path, which writes each link).

Targets: lookup p99 < 2 ms, RSS < 200 MB, start-up < 3 s, RSS not growing with the number of
mappings, IMAP connections ≤ mail.max_imap_connections. The last line is one JSON object.
Exits 0 whatever the numbers; only a failed set-up is an error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.measure import (  # noqa: E402
    code_version,
    percentile,
    temp_folder,
)
from bridge.config import DatabaseConfig  # noqa: E402
from bridge.core.ids import RoomID  # noqa: E402
from bridge.core.links import REMOTE_KIND, LinkSettings, remote_link_key  # noqa: E402
from bridge.db import links as link_db  # noqa: E402
from bridge.db import mail as mail_db  # noqa: E402
from bridge.db import remote as remote_db  # noqa: E402
from bridge.db import schema  # noqa: E402
from bridge.db.engine import Database, open_database  # noqa: E402
from bridge.harness.dovecot import DovecotServer  # noqa: E402
from bridge.harness.ports import free_port  # noqa: E402
from bridge.harness.postgres import PostgresServer  # noqa: E402
from bridge.registration import dump_yaml  # noqa: E402

TARGETS = {"lookup_p99_ms": 2.0, "rss_mb": 200.0, "startup_s": 3.0}
PASSWORD = "scale-bench-Secr3t"
REMOTE = "ministere"
REMOTE_SERVER = "ministere.localhost"
NOW_MS = 1_765_000_000_000
BATCH = 20_000


@dataclass(frozen=True)
class Sizes:
    links: int
    mappings: int
    ghosts: int
    lookups: int
    imap_connections: int
    observe: float

    @property
    def mail_links(self) -> int:
        return self.links // 2

    @property
    def remote_links(self) -> int:
        return self.links - self.mail_links

    @property
    def remote_mappings(self) -> int:
        return self.mappings // 4


FULL = Sizes(10_000, 1_000_000, 100_000, 5_000, 20, 15.0)
QUICK = Sizes(200, 20_000, 2_000, 300, 4, 2.0)


# --- keys, derived from a row number so that lookups can name rows without keeping them ------


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()[:43]


def room_id(n: int) -> str:
    return f"!{_b64(f'room{n}')[:18]}:localhost"


def mailbox(n: int) -> str:
    return f"list{n:05d}@example.test"


def message_id(n: int) -> str:
    return f"{_b64(f'mid{n}')[:24]}.{n}@mail.example.test"


def event_id(n: int) -> str:
    return f"${_b64(f'event{n}')}"


def remote_event_id(n: int) -> str:
    return f"${_b64(f'remote{n}')}"


# --- filling the database --------------------------------------------------------------------


def _rows_rooms(sizes: Sizes) -> Iterator[tuple[Any, ...]]:
    for n in range(sizes.links):
        yield (room_id(n), False, "join", False, 3, None, NOW_MS)


def _rows_links(sizes: Sizes, settings: dict[str, str]) -> Iterator[tuple[Any, ...]]:
    """Link n+1 is in room n: mail links first, then remote ones."""
    for n in range(sizes.links):
        if n < sizes.mail_links:
            kind, remote = "mail", mailbox(n)
        else:
            kind, remote = REMOTE_KIND, remote_link_key(REMOTE, room_id(n))
        yield (
            n + 1,
            f"{kind}:{remote}",
            room_id(n),
            kind,
            remote,
            settings[kind],
            False,
            None,
            NOW_MS,
        )


def _mail_link_of(n: int, sizes: Sizes) -> int:
    return n % sizes.mail_links + 1


def _remote_link_of(n: int, sizes: Sizes) -> int:
    return sizes.mail_links + n % sizes.remote_links + 1


def _rows_message_map(sizes: Sizes, start: int, stop: int) -> Iterator[tuple[Any, ...]]:
    for n in range(start, stop):
        link = _mail_link_of(n, sizes)
        root = event_id(n - n % 5)  # threads of five
        yield (link, message_id(n), room_id(link - 1), event_id(n), root, f"Objet {n}", NOW_MS + n)


def _rows_remote_map(sizes: Sizes, start: int, stop: int) -> Iterator[tuple[Any, ...]]:
    for n in range(start, stop):
        link = _remote_link_of(n, sizes)
        yield (
            link,
            remote_event_id(n),
            event_id(-1 - n),
            f"@u{n % 500}:{REMOTE_SERVER}",
            "in",
            NOW_MS + n,
        )


def _rows_ghosts(sizes: Sizes) -> Iterator[tuple[Any, ...]]:
    for n in range(sizes.ghosts):
        address = f"sender{n}@example.test"
        yield (
            f"@_passerelle_sender{n}=40example.test:localhost",
            "mail",
            address,
            f"Sender {n}",
            True,
            NOW_MS,
        )


def columns(table: str) -> list[str]:
    """The table's columns in the bridge's schema (the rows above are in that order)."""
    return [column.name for column in schema.metadata.tables[table].columns]


def _batches(rows: Iterable[tuple[Any, ...]]) -> Iterator[list[tuple[Any, ...]]]:
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


class Filler:
    """Bulk inserts through the bridge's schema: executemany on SQLite, COPY on PostgreSQL."""

    def __init__(self, url: str, libpq_url: str | None) -> None:
        self.url = url
        self.libpq_url = libpq_url

    async def insert(self, table: str, rows: Iterable[tuple[Any, ...]]) -> int:
        names = columns(table)
        count = 0
        if self.libpq_url is None:
            path = self.url.split(":///", 1)[1]
            with contextlib.closing(sqlite3.connect(path)) as conn:
                marks = ", ".join("?" * len(names))
                sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})"
                for batch in _batches(rows):
                    conn.executemany(sql, batch)
                    count += len(batch)
                conn.commit()
            return count
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.libpq_url)
        try:
            for batch in _batches(rows):
                await conn.copy_records_to_table(table, records=batch, columns=names)
                count += len(batch)
            if table == "link":  # ids were given: move the sequence past them
                await conn.execute("SELECT setval('link_id_seq', (SELECT max(id) FROM link))")
        finally:
            await conn.close()
        return count

    async def analyze(self) -> None:
        if self.libpq_url is None:
            path = self.url.split(":///", 1)[1]
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("ANALYZE")
            return
        import asyncpg

        conn = await asyncpg.connect(self.libpq_url)
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    async def autovacuum_runs(self) -> int | None:
        """How many times autovacuum and autoanalyze have run on the bridge's tables so far
        (PostgreSQL; None on SQLite): a change across a bridge start means they ran beside it."""
        if self.libpq_url is None:
            return None
        import asyncpg

        conn = await asyncpg.connect(self.libpq_url)
        try:
            value = await conn.fetchval(
                "SELECT coalesce(sum(autovacuum_count + autoanalyze_count), 0)"
                " FROM pg_stat_user_tables"
            )
            return int(value)
        finally:
            await conn.close()


async def fill_links(db: Database, filler: Filler, sizes: Sizes) -> None:
    """One link of each kind through the bridge's own save_link, whose stored settings every
    bulk-inserted link then gets; rooms and links are then inserted in bulk."""
    settings: dict[str, str] = {}
    for kind, remote, link_settings in (
        ("mail", mailbox(0), LinkSettings(allowed_senders=("example.test",))),
        (REMOTE_KIND, remote_link_key(REMOTE, room_id(1)), LinkSettings()),
    ):
        await link_db.save_link(
            db,
            room_id=RoomID(room_id(0)),
            kind=kind,
            remote=remote,
            settings=link_settings,
            source="room",
            created_by=None,
        )
    async with db.begin() as conn:
        for row in await conn.execute(text("SELECT kind, settings_json FROM link")):
            settings[row.kind] = row.settings_json
        await conn.execute(text("DELETE FROM link"))
        await conn.execute(text("DELETE FROM room"))
    await filler.insert("room", _rows_rooms(sizes))
    await filler.insert("link", _rows_links(sizes, settings))


# --- lookups ---------------------------------------------------------------------------------


async def measure_lookups(
    db: Database, sizes: Sizes, mapped: int, rng: random.Random
) -> dict[str, Any]:
    """Each kind of lookup `sizes.lookups` times, one at a time; ms per lookup."""
    remote_mapped = mapped // 4

    def pick(total: int) -> tuple[int, bool]:
        if rng.random() < 0.1:
            return total + rng.randrange(1_000_000), False  # never stored
        return rng.randrange(total), True

    results: dict[str, Any] = {}

    async def timed(name: str, call: Any, check: Any) -> None:
        times: list[float] = []
        cpu: list[float] = []
        for _ in range(sizes.lookups):
            args, known = call()
            started, cpu_started = time.perf_counter(), time.process_time()
            found = await args
            times.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_started) * 1000)
            if (found is not None) != known or (found is not None and not check(found)):
                raise RuntimeError(f"{name}: wrong answer {found!r}")
        results[name] = {
            "p50_ms": round(percentile(times, 50) or 0, 3),
            "p99_ms": round(percentile(times, 99) or 0, 3),
            # CPU of this process (and its SQLite thread) per lookup: what the load cannot change
            "cpu_p50_ms": round(percentile(cpu, 50) or 0, 3),
            "cpu_p99_ms": round(percentile(cpu, 99) or 0, 3),
        }

    def by_message_id() -> tuple[Any, bool]:
        n, known = pick(mapped)
        return mail_db.lookup(db, _mail_link_of(n, sizes), message_id(n)), known

    def by_event() -> tuple[Any, bool]:
        n, known = pick(mapped)
        return mail_db.lookup_event(db, _mail_link_of(n, sizes), event_id(n)), known

    def by_remote() -> tuple[Any, bool]:
        n, known = pick(remote_mapped)
        return remote_db.by_remote_event(db, _remote_link_of(n, sizes), remote_event_id(n)), known

    def by_agency() -> tuple[Any, bool]:
        n, known = pick(remote_mapped)
        return remote_db.by_agency_event(db, _remote_link_of(n, sizes), event_id(-1 - n)), known

    await timed("message_id_to_event", by_message_id, lambda m: m.event_id.startswith("$"))
    await timed("event_to_message_id", by_event, lambda m: "@mail.example.test" in m.message_id)
    await timed("remote_to_agency", by_remote, lambda m: m.agency_event_id.startswith("$"))
    await timed("agency_to_remote", by_agency, lambda m: m.remote_event_id.startswith("$"))
    kinds = list(results.values())
    results["p99_ms"] = max(r["p99_ms"] for r in kinds)
    results["cpu_p99_ms"] = max(r["cpu_p99_ms"] for r in kinds)
    return results


async def raw_lookups(
    filler: Filler, sizes: Sizes, mapped: int, rng: random.Random
) -> dict[str, Any]:
    """The bare thing: Message-ID → event with the driver alone (sqlite3, or asyncpg), the
    same query on the same index, without SQLAlchemy, aiosqlite's thread or a transaction."""
    keys = [rng.randrange(mapped) for _ in range(sizes.lookups)]
    times: list[float] = []
    query = "SELECT event_id FROM message_map WHERE link_id = {} AND message_id = {}"
    if filler.libpq_url is None:
        path = filler.url.split(":///", 1)[1]
        with contextlib.closing(sqlite3.connect(path)) as conn:
            sql = query.format("?", "?")
            for n in keys:
                started = time.perf_counter()
                row = conn.execute(sql, (_mail_link_of(n, sizes), message_id(n))).fetchone()
                times.append((time.perf_counter() - started) * 1000)
                if row is None or row[0] != event_id(n):
                    raise RuntimeError(f"raw lookup: wrong answer {row!r}")
    else:
        import asyncpg

        pg = await asyncpg.connect(filler.libpq_url)
        try:
            sql = query.format("$1", "$2")
            for n in keys:
                started = time.perf_counter()
                row = await pg.fetchrow(sql, _mail_link_of(n, sizes), message_id(n))
                times.append((time.perf_counter() - started) * 1000)
                if row is None or row[0] != event_id(n):
                    raise RuntimeError(f"raw lookup: wrong answer {row!r}")
        finally:
            await pg.close()
    return {
        "p50_ms": round(percentile(times, 50) or 0, 3),
        "p99_ms": round(percentile(times, 99) or 0, 3),
    }


def config_parse_cpu_s(config_path: Path) -> float:
    """CPU to read and check the config file the bridge starts with (same code, here)."""
    from bridge.config import load_config

    started = time.process_time()
    load_config(config_path, env={})
    return round(time.process_time() - started, 2)


# --- the bridge process ----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def tcp_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to 127.0.0.1:``port``.

    Counted by socket inode: /proc/net/tcp is read in pages, not as one snapshot, and lists a
    socket twice when its table changes during the read (it does, with hundreds of polls).
    """
    inodes = set()
    with contextlib.suppress(FileNotFoundError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    established = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            established.add(inode)
    return len(established)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def _log_time(log_path: Path, spawned: float, needle: str) -> float | None:
    """Seconds from the spawn to the first log line holding ``needle`` (local-time stamps)."""
    import datetime

    for line in log_path.read_text(errors="replace").splitlines():
        if needle in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            return round(stamp.timestamp() - spawned, 3)
    return None


def health(url: str) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, None


def run_bridge(
    config_path: Path,
    log_path: Path,
    sizes: Sizes,
    dovecot_port: int,
    port: int,
    observe: float,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Start the bridge, wait until every mailbox is watched, observe, stop; what was seen.
    With `profile`, the bridge runs under cProfile, which writes there when it stops."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSERELLE_")}
    env["PYTHONPATH"] = str(ROOT)
    url = f"http://127.0.0.1:{port}/health"
    with log_path.open("ab") as log:
        started, spawned = time.monotonic(), time.time()
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        proc = subprocess.Popen(
            [sys.executable, *profiler, "-m", "bridge", "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
        )
    try:
        listening = ready = None
        while time.monotonic() - started < 900:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-30:]
                raise RuntimeError(f"bridge exited {proc.returncode}:\n" + "\n".join(tail))
            with contextlib.suppress(OSError):
                code, body = health(url)
                listening = listening or time.monotonic() - started
                if code == 200 and len(body.get("mailboxes", {})) >= sizes.mail_links:
                    ready = time.monotonic() - started
                    break
            time.sleep(0.05)
        if ready is None:
            raise RuntimeError("the bridge was not ready within 900 s")
        rss_ready = rss_mb(proc.pid)
        cpu_ready = cpu_seconds(proc.pid)
        first_log = _log_time(log_path, spawned, "database ready")
        peak_connections = 0
        end = time.monotonic() + observe
        while time.monotonic() < end:
            peak_connections = max(peak_connections, tcp_connections(proc.pid, dovecot_port))
            time.sleep(0.1)
        _, body = health(url)
        boxes = body.get("mailboxes", {})
        checked = sum(1 for b in boxes.values() if b.get("last_ok_at") is not None)
        rss_after = rss_mb(proc.pid)
        return {
            "startup_s": round(ready, 3),
            # CPU the process used until ready: what the start-up costs whatever the load
            "startup_cpu_s": cpu_ready,
            # spawn → "database ready": interpreter, imports, config (the rest is the bridge)
            "imports_config_s": first_log,
            "listening_s": round(listening or 0, 3),
            "rss_mb": rss_ready,
            "rss_after_observe_mb": rss_after,
            "imap_connections": peak_connections,
            "mailboxes_checked": checked,
            "observe_s": observe,
            "cpu_s": cpu_seconds(proc.pid),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_config(
    path: Path, url: str, sizes: Sizes, dovecot: DovecotServer, port: int, config_links: bool
) -> None:
    closed = free_port()  # nobody listens there: homeserver and remote are down
    mailboxes = {
        mailbox(n): {
            "host": dovecot.host,
            "port": dovecot.imap_port,
            "tls": "none",
            "user": mailbox(n),
            "password": PASSWORD,
        }
        for n in range(sizes.mail_links)
    }
    config: dict[str, Any] = {
        "homeserver": {"address": f"http://127.0.0.1:{closed}", "domain": "localhost"},
        "appservice": {
            "address": f"http://127.0.0.1:{port}",
            "hostname": "127.0.0.1",
            "port": port,
            "as_token": "as-" + uuid.uuid4().hex + uuid.uuid4().hex,
            "hs_token": "hs-" + uuid.uuid4().hex + uuid.uuid4().hex,
        },
        "database": {"url": url},
        "permissions": {"localhost": "user"},
        "logging": {"level": "INFO"},
        "mail": {"mailboxes": mailboxes, "max_imap_connections": sizes.imap_connections},
        "remotes": {
            REMOTE: {
                "address": f"http://127.0.0.1:{closed}",
                "server_name": REMOTE_SERVER,
                "user_id": f"@passerelle-agence:{REMOTE_SERVER}",
                "access_token": "bench-" + uuid.uuid4().hex,
            }
        },
    }
    if config_links:
        config["links"] = [
            {"room": room_id(n), "address": mailbox(n), "allowed_senders": ["example.test"]}
            for n in range(sizes.mail_links)
        ]
    path.write_text(dump_yaml(config))


# --- the run ---------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, folder: Path, stack: contextlib.ExitStack
) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    if args.mappings is not None:
        sizes = dataclasses.replace(sizes, mappings=args.mappings)
    rng = random.Random(12)
    dovecot = DovecotServer(folder / "dovecot")
    dovecot.start()
    stack.callback(dovecot.stop)
    started = time.monotonic()
    for n in range(sizes.mail_links):
        dovecot.add_user(mailbox(n).split("@")[0], PASSWORD)
    users_s = time.monotonic() - started

    libpq_url = None
    if args.database == "postgresql":
        server = PostgresServer.obtain(folder / "pg")
        stack.callback(server.stop)
        name = f"passerelle_scale_{uuid.uuid4().hex[:8]}"
        libpq_url = server.create_database(name)
        stack.callback(server.drop_database, name)
        url = libpq_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    else:
        url = f"sqlite+aiosqlite:///{folder / 'passerelle.db'}"
    filler = Filler(url, libpq_url)

    db = await open_database(DatabaseConfig(url=url, pool_size=5))
    fill: dict[str, float] = {}
    try:
        t = time.monotonic()
        await fill_links(db, filler, sizes)
        await filler.insert("ghost", _rows_ghosts(sizes))
        fill["links_ghosts_s"] = time.monotonic() - t
    finally:
        await db.close()

    port = free_port()
    config_path = folder / "config.yaml"
    write_config(config_path, url, sizes, dovecot, port, config_links=False)
    steps: dict[str, Any] = {}
    small = sizes.mappings // 10
    for label, start, stop in (("small", 0, small), ("full", small, sizes.mappings)):
        t = time.monotonic()
        await filler.insert("message_map", _rows_message_map(sizes, start, stop))
        await filler.insert("remote_event_map", _rows_remote_map(sizes, start // 4, stop // 4))
        await filler.analyze()
        fill[f"mappings_{label}_s"] = time.monotonic() - t
        db = await open_database(DatabaseConfig(url=url, pool_size=5))
        try:
            lookups = await measure_lookups(db, sizes, stop, rng)
        finally:
            await db.close()
        lookups["raw_message_id_to_event"] = raw = await raw_lookups(filler, sizes, stop, rng)
        lookups["ratio_p50_to_raw"] = round(
            lookups["message_id_to_event"]["p50_ms"] / max(raw["p50_ms"], 0.001), 1
        )
        autovacuum_before = await filler.autovacuum_runs()
        bridge = run_bridge(
            config_path, folder / f"bridge-{label}.log", sizes, dovecot.imap_port, port,
            sizes.observe, args.profile if label == "full" else None,
        )  # fmt: skip
        if autovacuum_before is not None:
            after = await filler.autovacuum_runs()
            bridge["autovacuum_runs_beside"] = (after or 0) - autovacuum_before
        steps[label] = {"mappings": stop, "lookups": lookups, "bridge": bridge}
        print(f"{label}: {stop:,} mappings: {json.dumps(steps[label])}", flush=True)

    parse_cpu = config_parse_cpu_s(config_path)
    write_config(config_path, url, sizes, dovecot, port, config_links=True)
    parse_cpu_links = config_parse_cpu_s(config_path)
    # The first start with the links in the config rewrites each (made in rooms until now);
    # the next ones find them as written.
    config_links = [
        run_bridge(
            config_path, folder / f"bridge-config-{n}.log", sizes, dovecot.imap_port, port, 1.0
        )
        for n in (1, 2)
    ]
    print(f"config links: {json.dumps(config_links)}", flush=True)

    full, small_step = steps["full"], steps["small"]
    result: dict[str, Any] = {
        "bench": "scale",
        "database": args.database,
        "quick": args.quick,
        "links": sizes.links,
        "mail_links": sizes.mail_links,
        "mappings": sizes.mappings,
        "remote_mappings": sizes.remote_mappings,
        "ghosts": sizes.ghosts,
        "lookup_p50_ms": max(
            v["p50_ms"]
            for k, v in full["lookups"].items()
            if isinstance(v, dict) and not k.startswith("raw_")
        ),
        "lookup_cpu_p99_ms": full["lookups"]["cpu_p99_ms"],
        "lookup_p99_ms": full["lookups"]["p99_ms"],
        "lookup_p99_ms_small": small_step["lookups"]["p99_ms"],
        "lookups": full["lookups"],
        "rss_mb": full["bridge"]["rss_mb"],
        "rss_after_observe_mb": full["bridge"]["rss_after_observe_mb"],
        "rss_mb_small": small_step["bridge"]["rss_mb"],
        "rss_growth_mb": round(full["bridge"]["rss_mb"] - small_step["bridge"]["rss_mb"], 1),
        "startup_s": full["bridge"]["startup_s"],
        "startup_s_small": small_step["bridge"]["startup_s"],
        "startup_config_links_first_s": config_links[0]["startup_s"],
        "startup_config_links_s": config_links[1]["startup_s"],
        "startup_config_links_cpu_s": config_links[1]["startup_cpu_s"],
        "config_parse_cpu_s": parse_cpu,
        "config_parse_cpu_s_with_links": parse_cpu_links,
        "lookup_raw_p50_ms": full["lookups"]["raw_message_id_to_event"]["p50_ms"],
        "lookup_raw_p99_ms": full["lookups"]["raw_message_id_to_event"]["p99_ms"],
        "lookup_ratio_p50_to_raw": full["lookups"]["ratio_p50_to_raw"],
        "listening_s": full["bridge"]["listening_s"],
        "startup_cpu_s": full["bridge"]["startup_cpu_s"],
        "imports_config_s": full["bridge"]["imports_config_s"],
        "imap_connections": max(s["bridge"]["imap_connections"] for s in (full, small_step)),
        "max_imap_connections": sizes.imap_connections,
        "mailboxes_checked": full["bridge"]["mailboxes_checked"],
        "observe_s": sizes.observe,
        "bridge_cpu_s": full["bridge"]["cpu_s"],
        "fill_s": {k: round(v, 1) for k, v in fill.items()},
        "dovecot_users_s": round(users_s, 1),
        "load": os.getloadavg()[0],
        "code": code_version(),
    }
    misses = [k for k, limit in TARGETS.items() if result[k] >= limit]
    if result["imap_connections"] > sizes.imap_connections:
        misses.append("imap_connections")
    if result["rss_growth_mb"] > max(10.0, 0.1 * result["rss_mb_small"]):
        misses.append("rss_growth_mb")
    result["targets_missed"] = misses
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--quick", action="store_true", help="small sizes, same code path")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--mappings", type=int, help="another number of mappings (to profile the start-up fast)"
    )
    parser.add_argument(
        "--profile", type=Path, help="run the full step's bridge under cProfile, into this file"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    with temp_folder(args.keep) as folder, contextlib.ExitStack() as stack:
        result = asyncio.run(run(args, folder, stack))
    result["load_before"] = [round(v, 2) for v in load_before]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
