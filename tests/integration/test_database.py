"""Opening the mapping database: migrations, refusals, durability settings (SQLite and PG)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.config import DatabaseConfig
from bridge.db import kv
from bridge.db.engine import DatabaseError, open_database
from bridge.harness.ports import free_port
from tests.conftest import bridge_config_dict, subprocess_env

EXPECTED_TABLES = {
    "alembic_version",
    "appservice_txn",
    "inbox_event",
    "dead_letter",
    "ghost",
    "room",
    "link",
    "kv",
}


async def _execute(url: str, *statements: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    from sqlalchemy import inspect

    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


async def test_migrations_run_at_start_and_again_harmlessly(db_url: str) -> None:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        await kv.set_value(db, "greeting", "bonjour")
        await kv.set_value(db, "greeting", "salut")
        assert await kv.get_value(db, "greeting") == "salut"
    finally:
        await db.close()
    assert await _tables(db_url) >= EXPECTED_TABLES
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        assert await kv.get_value(db, "greeting") == "salut"
    finally:
        await db.close()


async def test_a_synapse_database_is_refused(db_url: str) -> None:
    await _execute(
        db_url,
        "CREATE TABLE event_json (event_id TEXT, json TEXT)",
        "CREATE TABLE room_memberships (event_id TEXT)",
    )
    with pytest.raises(DatabaseError, match="Synapse"):
        await open_database(DatabaseConfig(url=db_url, pool_size=2))
    assert "alembic_version" not in await _tables(db_url)


async def test_someone_elses_database_is_refused(db_url: str) -> None:
    await _execute(db_url, "CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(DatabaseError, match="not Passerelle's"):
        await open_database(DatabaseConfig(url=db_url, pool_size=2))


async def test_a_schema_newer_than_the_code_is_refused(db_url: str) -> None:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    await db.close()
    await _execute(db_url, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(DatabaseError, match=r"revision 9999, newer than this Passerelle"):
        await open_database(DatabaseConfig(url=db_url, pool_size=2))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sqlite_is_durable(db_url: str) -> None:
    db = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        async with db.begin() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
    finally:
        await db.close()


async def test_unreachable_or_missing_databases_are_one_line_errors(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(DatabaseError, match="cannot open the database") as info:
        await open_database(
            DatabaseConfig(url=f"postgresql+asyncpg://nobody@127.0.0.1:{port}/x", pool_size=1)
        )
    assert "\n" not in str(info.value)
    with pytest.raises(DatabaseError, match="does not exist"):
        await open_database(
            DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/p.db", pool_size=1)
        )


def test_run_exits_11_with_one_line_when_the_database_is_foreign(tmp_path: Path) -> None:
    import sqlite3

    db_file = tmp_path / "synapse.db"
    with sqlite3.connect(db_file) as conn:
        conn.execute("CREATE TABLE event_json (event_id TEXT)")
    config = tmp_path / "config.yaml"
    from bridge.registration import atomic_write, dump_yaml

    raw = bridge_config_dict(free_port(), free_port(), f"sqlite+aiosqlite:///{db_file}")
    atomic_write(config, dump_yaml(raw))
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "-c", str(config)],
        capture_output=True,
        env=subprocess_env(),
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 11, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("passerelle: database: this database holds Synapse's tables")
