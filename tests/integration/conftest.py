"""Fixtures shared by the integration tests: the bridge's database, a scripted aiosmtpd sink on
loopback, the ministry's homeserver through the remote client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from bridge.config import DatabaseConfig
from bridge.db.engine import Database, open_database
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.remote.client import RemoteClient
from tests.conftest import UserFactory
from tests.integration.test_smtp import ScriptedHandler, start_sink


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    """The bridge's database, migrated, on each of the databases `db_url` gives."""
    database = await open_database(DatabaseConfig(url=db_url, pool_size=2))
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def handler() -> ScriptedHandler:
    return ScriptedHandler()


@pytest.fixture
def sink(handler: ScriptedHandler) -> Iterator[int]:
    controller, port = start_sink(handler)
    try:
        yield port
    finally:
        controller.stop()


# --- the ministry's homeserver through the bridge's remote client ---------------------------


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def remote(
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    http_session: aiohttp.ClientSession,
) -> RemoteClient:
    _, token = ministry_bridge_account
    return RemoteClient(
        "ministry", ministry_synapse.base_url, token, http_session, request_timeout=10
    )


@pytest.fixture
async def person(make_ministry_user: UserFactory) -> MatrixTestClient:
    return await make_ministry_user("agent")


@pytest.fixture
async def shared_room(person: MatrixTestClient, remote: RemoteClient) -> str:
    """A private room of the ministry's person that the bridge account has joined."""
    room_id = await person.create_room(invite=[await remote.whoami()], name="liaison")
    assert await remote.join(room_id) == room_id
    return room_id
