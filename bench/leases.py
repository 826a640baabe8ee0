#!/usr/bin/env python3
"""Leases (several instances on one database): what fencing costs per transaction, how fast a
dead instance's work is taken over, and what a lease round costs with thousands of units.

    python bench/leases.py [--database sqlite|postgresql|both] [--transactions 2000]
                           [--units 10000] [--trials 5] [--ttl 3] [--renew 1]

Phases, on each database, in one run:

1. fence: the same small settling write (a key-value upsert, one transaction each) N times
   bare and N times under a lease (the check inside the transaction: FOR SHARE on
   PostgreSQL, a no-op write on SQLite), interleaved in rounds of 100; ratio fenced / bare;
2. takeover: two lease keepers (two instances) share 20 units; the one holding them is
   killed (its tasks cancelled: no release, no renewal); the time until the survivor runs
   every unit, T trials; ratio to the bound ttl + renew;
3. scale: one owner taking U free leases at once (--units, 10,000 by default, as many as the
   links of a large deployment; what an instance does at start-up), then one renewal (one
   statement), one look for free leases among U names, one release of all.

The last line is one JSON object. It exits 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.measure import (  # noqa: E402
    code_version,
    percentile,
)
from bridge.config import DatabaseConfig  # noqa: E402
from bridge.core.leases import LeaseHolder, LeaseTiming  # noqa: E402
from bridge.core.tasks import TaskGroup  # noqa: E402
from bridge.db import kv  # noqa: E402
from bridge.db import leases as lease_db  # noqa: E402
from bridge.db.engine import FENCE, Database, open_database  # noqa: E402
from bridge.db.schema import lease  # noqa: E402
from bridge.harness.postgres import PostgresServer  # noqa: E402
from bridge.relay.leases import LeaseKeeper  # noqa: E402


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


async def fence_phase(db: Database, transactions: int) -> dict[str, Any]:
    holder = LeaseHolder("worker:bench", "bench", 0)
    epoch = await lease_db.acquire(db, holder.name, holder.owner, 600_000)
    assert epoch is not None
    holder = LeaseHolder(holder.name, holder.owner, epoch)
    bare: list[float] = []
    fenced: list[float] = []
    for _ in range(10):  # warm-up: connections, statement caches
        await kv.set_value(db, "bench", "warm")
    rounds = max(1, transactions // 100)
    for r in range(rounds):
        for kind, times in (("bare", bare), ("fenced", fenced)):
            token = FENCE.set(holder if kind == "fenced" else None)
            try:
                for i in range(100):
                    started = time.perf_counter()
                    await kv.set_value(db, "bench", f"{kind}-{r}-{i}")
                    times.append((time.perf_counter() - started) * 1000)
            finally:
                FENCE.reset(token)
    bare_mean = sum(bare) / len(bare)
    fenced_mean = sum(fenced) / len(fenced)
    return {
        "transactions": len(bare),
        "bare_ms": {"mean": round(bare_mean, 3), "p99": round(percentile(bare, 99) or 0, 3)},
        "fenced_ms": {
            "mean": round(fenced_mean, 3),
            "p99": round(percentile(fenced, 99) or 0, 3),
        },
        "fenced_over_bare": round(fenced_mean / bare_mean, 2),
    }


def _unit(name: str, running: set[str]) -> Any:
    """A unit of the survivor: in `running` while it runs."""

    async def work() -> None:
        running.add(name)
        try:
            await asyncio.Event().wait()
        finally:
            running.discard(name)

    return work


async def takeover_phase(url: str, trials: int, timing: LeaseTiming) -> dict[str, Any]:
    names = [f"mailbox:bench{i}@example.test" for i in range(20)]
    takeovers: list[float] = []
    for trial in range(trials):
        db_a = await open_database(DatabaseConfig(url=url, pool_size=3))
        db_b = await open_database(DatabaseConfig(url=url, pool_size=3))
        tasks_a, tasks_b = TaskGroup(), TaskGroup()
        fatal: list[str] = []
        running: set[str] = set()
        a = LeaseKeeper(
            db_a, tasks_a, owner=f"a{trial}", timing=timing, enabled=True, on_fatal=fatal.append
        )
        b = LeaseKeeper(
            db_b, tasks_b, owner=f"b{trial}", timing=timing, enabled=True, on_fatal=fatal.append
        )

        for name in names:
            a.hold(name, asyncio.Event().wait)
            b.hold(name, _unit(name, running))
        await a.start()
        tasks_a.spawn(a.run(), name="a")
        await asyncio.sleep(timing.renew_every * 1.5)  # a holds all, renewed at least once
        await b.start()
        tasks_b.spawn(b.run(), name="b")
        await asyncio.sleep(timing.renew_every * 2.5)  # they split the units
        await tasks_a.close()  # a dies: nothing released, nothing renewed
        killed = time.monotonic()
        while len(running) < len(names):
            await asyncio.sleep(0.01)
            if time.monotonic() - killed > timing.takeover_within * 3:
                raise RuntimeError("no takeover")
        takeovers.append(time.monotonic() - killed)
        await b.close()
        await tasks_b.close()
        async with db_b.begin() as conn:
            await conn.execute(lease.delete())
        await db_a.close()
        await db_b.close()
        assert not fatal, fatal
    bound = timing.takeover_within
    return {
        "trials": trials,
        "ttl_s": timing.ttl,
        "renew_s": timing.renew_every,
        "takeover_s": {
            "p50": round(percentile(takeovers, 50) or 0, 2),
            "max": round(max(takeovers), 2),
        },
        "takeover_max_over_bound": round(max(takeovers) / bound, 2),
    }


async def scale_phase(db: Database, units: int) -> dict[str, Any]:
    names = [f"mailbox:l{i:05d}@example.test" for i in range(units)]
    started = time.perf_counter()
    taken = await lease_db.acquire_many(db, names, "big", 600_000)
    acquire_s = time.perf_counter() - started
    assert len(taken) == units
    timings: dict[str, float] = {}
    for label, call in (
        ("renew_ms", lambda: lease_db.renew(db, "big", 600_000)),
        ("free_scan_ms", lambda: lease_db.free(db, names)),
        ("live_instances_ms", lambda: lease_db.live_instances(db)),
    ):
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t0) * 1000)
        timings[label] = round(sorted(samples)[2], 1)  # median of 5
    t0 = time.perf_counter()
    await lease_db.release(db, "big", names)
    timings["release_all_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return {"units": units, "acquire_all_ms": round(acquire_s * 1000, 1), **timings}


async def run_database(kind: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    server: PostgresServer | None = None
    name = ""
    folder.mkdir(parents=True)
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{folder / 'bench.db'}"
    else:
        server = PostgresServer.obtain(folder / "pg")
        name = f"passerelle_bench_{uuid.uuid4().hex[:8]}"
        url = server.create_database(name).replace("postgresql://", "postgresql+asyncpg://", 1)
    try:
        db = await open_database(DatabaseConfig(url=url, pool_size=4))
        try:
            results: dict[str, Any] = {"load_before": load()}
            results["fence"] = await fence_phase(db, args.transactions)
            print(kind, "fence", json.dumps(results["fence"]), flush=True)
            async with db.begin() as conn:
                await conn.execute(lease.delete())
        finally:
            await db.close()
        results["takeover"] = await takeover_phase(
            url, args.trials, LeaseTiming(ttl=args.ttl, renew_every=args.renew)
        )
        print(kind, "takeover", json.dumps(results["takeover"]), flush=True)
        db = await open_database(DatabaseConfig(url=url, pool_size=4))
        try:
            results["scale"] = await scale_phase(db, args.units)
        finally:
            await db.close()
        print(kind, "scale", json.dumps(results["scale"]), flush=True)
        results["load_after"] = load()
        return results
    finally:
        if server is not None:
            server.drop_database(name)
            server.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    kinds = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    with tempfile.TemporaryDirectory(prefix="passerelle-bench-leases-") as tmp:
        out: dict[str, Any] = {"bench": "leases", "code": code_version()}
        for kind in kinds:
            out[kind] = await run_database(kind, args, Path(tmp) / kind)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--units", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--renew", type=float, default=1.0)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result))
