"""The running bridge with leases on (in this process, its homeserver unreachable): every
worker under its lease, /health showing them, a lost worker lease stopping the instance."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import update

from bridge.app import Bridge, LeaseLostError, run_until_signalled
from bridge.config import DatabaseConfig, parse_config
from bridge.db import leases as lease_db
from bridge.db.engine import open_database
from bridge.db.schema import lease
from bridge.harness.ports import free_port
from tests.conftest import bridge_config_dict, http_json

WORKERS = {
    "worker:dispatcher",
    "worker:mail-relay",
    "worker:webhooks-relay",
    "worker:webhooks-sender",
}
INSTANCE = {"leases": True, "id": "solo", "lease_ttl": 3, "lease_renew": 1}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_workers_run_under_leases_and_a_clean_stop_hands_them_back(db_url: str) -> None:
    port = free_port()
    config = parse_config(bridge_config_dict(free_port(), port, db_url, instance=INSTANCE), env={})
    bridge = Bridge(config)
    await bridge.start()
    try:
        assert set(bridge.leases.held()) == WORKERS  # no SMTP, no remote: no outbox, no sync
        status, body = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/health")
        assert status == 200
        assert body["instance"] == {"id": "solo", "leases": sorted(WORKERS)}
        rows = {row.name: row for row in await lease_db.all_leases(bridge.db)}
        assert set(rows) == WORKERS | {"instance:solo"}
        assert all(row.owner == "solo" and row.epoch == 1 for row in rows.values())
        await bridge.stop()
        db = await open_database(DatabaseConfig(url=db_url, pool_size=1))
        try:
            assert await lease_db.free(db, WORKERS | {"instance:solo"}) == WORKERS | {
                "instance:solo"
            }
            # Started again with the same ID: its leases come back at once, a new epoch each.
            again = Bridge(config)
            await again.start()
            try:
                rows = {row.name: row for row in await lease_db.all_leases(again.db)}
                assert {rows[name].epoch for name in WORKERS} == {2}
            finally:
                await again.stop()
        finally:
            await db.close()
    finally:
        await bridge.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_worker_lease_taken_away_stops_the_instance(db_url: str) -> None:
    port = free_port()
    config = parse_config(bridge_config_dict(free_port(), port, db_url, instance=INSTANCE), env={})
    running = asyncio.create_task(run_until_signalled(config))
    for _ in range(100):  # listening: migrated, leases taken
        try:
            await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/health", 1)
            break
        except OSError:
            await asyncio.sleep(0.1)
    db = await open_database(DatabaseConfig(url=db_url, pool_size=1))
    try:
        # Another instance took it (this one was paused past the expiry, say).
        async with db.begin() as conn:
            await conn.execute(
                update(lease)
                .where(lease.c.name == "worker:dispatcher")
                .values(owner="other", epoch=lease.c.epoch + 1)
            )
        with pytest.raises(LeaseLostError, match="worker:dispatcher"):
            await asyncio.wait_for(running, 10)
        # It handed back what it still held, not what it lost.
        rows = {row.name: row for row in await lease_db.all_leases(db)}
        assert rows["worker:dispatcher"].owner == "other"
        assert rows["worker:dispatcher"].expires_in_ms > 0
        assert await lease_db.free(db, WORKERS - {"worker:dispatcher"}) == WORKERS - {
            "worker:dispatcher"
        }
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await db.close()
