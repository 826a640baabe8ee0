"""The PostgreSQL set-up of the README's "Deploying" section, on a real server: a plain role
(what `createuser` makes: no superuser, no CREATEDB), a database it owns, and the bridge
reaching it over the Unix socket with the URL form the README gives. The migrations must run
with that role's rights alone (PostgreSQL 15 no longer lets any role create tables in the
public schema: only the database's owner may).

The test servers trust every local connection, so the README's `peer` authentication itself
(the system user `passerelle` logging in as the role of that name) is not exercised here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, inspect, text

from bridge.config import DatabaseConfig
from bridge.config.base import normalise_database_url
from bridge.db.engine import open_database
from bridge.db.schema import metadata
from bridge.harness.postgres import PostgresServer

pytestmark = pytest.mark.postgres

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def owned_database(pg_server: PostgresServer) -> Iterator[str]:
    """A new role and a database of the same name owned by it, as the README makes them."""
    name = f"passerelle_deploy_{uuid.uuid4().hex[:10]}"
    pg_server.psql(f'CREATE ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE')
    try:
        pg_server.psql(
            f'CREATE DATABASE "{name}" OWNER "{name}" ENCODING \'UTF8\' TEMPLATE template0'
        )
        try:
            yield name
        finally:
            pg_server.drop_database(name)
    finally:
        pg_server.psql(f'DROP ROLE IF EXISTS "{name}"')


def _readme_socket_url() -> str:
    found = re.search(r"url: (postgresql\+asyncpg://\S+@/\S+)", README.read_text("utf-8"))
    assert found is not None, "the README's Deploying section has no Unix-socket URL"
    return found.group(1)


async def test_the_readme_database_runs_the_migrations_as_its_owner(
    pg_server: PostgresServer, owned_database: str
) -> None:
    sockets = pg_server.psql("SHOW unix_socket_directories").strip().split(",")
    socket_dir = sockets[0].strip()
    if not socket_dir.startswith("/"):
        pytest.skip(f"this server has no Unix socket in a folder ({socket_dir!r})")
    # The README's URL, pointed at this server's socket folder, port and names.
    readme = _readme_socket_url()
    assert readme == "postgresql+asyncpg://passerelle@/passerelle?host=/run/postgresql"
    url = readme.replace("passerelle@/passerelle", f"{owned_database}@/{owned_database}")
    url = url.replace("host=/run/postgresql", f"host={socket_dir}") + f"&port={pg_server.port}"
    db = await open_database(
        DatabaseConfig(url=normalise_database_url("database.url", url), pool_size=2)
    )
    try:
        async with db.begin() as conn:
            row = await conn.execute(
                text(
                    "SELECT current_user, rolsuper, rolcreatedb, inet_server_addr() "
                    "FROM pg_roles WHERE rolname = current_user"
                )
            )
            user, superuser, createdb, server_address = row.one()

            def tables(sync: Connection) -> set[str]:
                return set(inspect(sync).get_table_names())

            found = await conn.run_sync(tables)
            owners = await conn.execute(
                text("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
            )
            table_owners = {r[0] for r in owners}
    finally:
        await db.close()
    assert (user, superuser, createdb) == (owned_database, False, False)
    assert server_address is None  # the Unix socket, not TCP
    assert set(metadata.tables) <= found
    assert "alembic_version" in found
    assert table_owners == {owned_database}
