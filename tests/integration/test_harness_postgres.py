"""Integration tests for the PostgreSQL launcher: databases created for the bridge and Synapse."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from bridge.harness.postgres import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    started = time.monotonic()
    server = PostgresServer.obtain(tmp_path_factory.mktemp("pg"))
    try:
        print(f"PostgreSQL obtained ({server.port}): {time.monotonic() - started:.3f} s")
        yield server
    finally:
        server.stop()


def unique_name() -> str:
    return f"harness_test_{uuid.uuid4().hex[:12]}"


async def test_create_connect_drop(postgres: PostgresServer) -> None:
    name = unique_name()
    url = postgres.create_database(name)
    assert url == f"postgresql://{postgres.user}@{postgres.host}:{postgres.port}/{name}"
    try:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT current_database()") == name
            await conn.execute("CREATE TABLE t (id serial PRIMARY KEY, body text NOT NULL)")
            await conn.execute("INSERT INTO t (body) VALUES ($1)", "héllo")
            assert await conn.fetchval("SELECT body FROM t") == "héllo"
        finally:
            await conn.close()
        # Re-creating gives an empty database, even with a session still open on the old one.
        holder = await asyncpg.connect(url)
        try:
            postgres.create_database(name)
        finally:
            await holder.close(timeout=5)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT to_regclass('t')") is None
        finally:
            await conn.close()
    finally:
        postgres.drop_database(name)
    assert postgres.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0\n"
    postgres.drop_database(name)  # absent: no error


async def test_synapse_database_is_c_collated_utf8(postgres: PostgresServer) -> None:
    name = unique_name()
    url = postgres.create_database(name, synapse=True)
    try:
        conn = await asyncpg.connect(url)
        try:
            row = await conn.fetchrow(
                "SELECT pg_encoding_to_char(encoding) AS enc, datcollate, datctype"
                " FROM pg_database WHERE datname = current_database()"
            )
        finally:
            await conn.close()
        assert row is not None
        assert (row["enc"], row["datcollate"], row["datctype"]) == ("UTF8", "C", "C")
    finally:
        postgres.drop_database(name)


def test_rejects_odd_database_names(postgres: PostgresServer) -> None:
    for name in ('x"; DROP DATABASE postgres; --', "", "1abc", "a" * 64):
        with pytest.raises(ValueError, match="unsupported database name"):
            postgres.create_database(name)


@pytest.mark.slow
async def test_throwaway_cluster(tmp_path: Path) -> None:
    started = time.monotonic()
    server = PostgresServer.obtain(tmp_path / "own", fresh=True)
    try:
        print(f"Throw-away cluster (initdb + start): {time.monotonic() - started:.3f} s")
        assert server.port != 5432
        url = server.create_database("own_db", synapse=True)
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT current_database()") == "own_db"
        finally:
            await conn.close()
    finally:
        server.stop()
    server.stop()  # idempotent
    with pytest.raises(RuntimeError, match="psql failed"):
        server.psql("SELECT 1")
