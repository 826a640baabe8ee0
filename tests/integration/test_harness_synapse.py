"""Integration tests for the Synapse launcher and MatrixTestClient against a real homeserver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from bridge.harness.synapse import MatrixRequestError, MatrixTestClient, SynapseServer


@pytest.fixture(scope="module")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SynapseServer]:
    server = SynapseServer(data_dir=tmp_path_factory.mktemp("synapse"))
    try:
        started = time.monotonic()
        server.start()
        print(f"Synapse first start: {time.monotonic() - started:.1f} s")
        yield server
    finally:
        server.stop()


def _client(
    server: SynapseServer, localpart: str, password: str = "secret-pw"
) -> MatrixTestClient:
    user_id = server.register_user(localpart, password)
    token = server.login(localpart, password)
    return MatrixTestClient(server.base_url, token, user_id)


def test_config_is_locked_down(synapse: SynapseServer) -> None:
    config: dict[str, Any] = yaml.safe_load(synapse.config_path.read_text(encoding="utf-8"))
    assert config["listeners"] == [
        {
            "port": synapse.port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client"], "compress": False}],
        }
    ]
    assert config["federation_domain_whitelist"] == []
    assert config["rc_message"]["per_second"] >= 1000
    assert config["rc_login"]["failed_attempts"]["burst_count"] >= 1000
    assert (synapse.data_dir / "homeserver.db").exists()


async def test_message_survives_restart(synapse: SynapseServer) -> None:
    alice = _client(synapse, "alice")
    bob = _client(synapse, "bob")
    # Registering again is a no-op that still names the user.
    assert synapse.register_user("alice", "secret-pw") == alice.user_id == "@alice:localhost"
    try:
        room_id = await alice.create_room(invite=[bob.user_id], name="harness")
        await alice.wait_for_membership(room_id, bob.user_id, "invite")
        await bob.join(room_id)
        await alice.wait_for_membership(room_id, bob.user_id, "join")
        assert await alice.joined_members(room_id) == sorted([alice.user_id, bob.user_id])

        event_id = await alice.send_text(room_id, "bonjour", extra={"format": "plain"})
        event = await bob.wait_for_event(
            room_id, lambda e: e.get("content", {}).get("body") == "bonjour"
        )
        assert event["event_id"] == event_id
        assert event["sender"] == alice.user_id

        with pytest.raises(AssertionError, match="bonjour"):
            await bob.wait_for_event(room_id, lambda e: False, timeout=0.3)
        with pytest.raises(MatrixRequestError, match="M_FORBIDDEN") as info:
            await bob.send_event("!nowhere:localhost", "m.room.message", {"body": "x"})
        assert info.value.status == 403

        started = time.monotonic()
        await asyncio.to_thread(synapse.restart)
        print(f"Synapse restart: {time.monotonic() - started:.1f} s")

        # The same clients (and their pooled connections) keep working after a restart.
        events = await bob.messages(room_id)
        assert [e["event_id"] for e in events if e["type"] == "m.room.message"] == [event_id]
        await alice.send_text(room_id, "encore")
        await bob.wait_for_event(room_id, lambda e: e.get("content", {}).get("body") == "encore")
    finally:
        await alice.close()
        await bob.close()


async def test_kill_then_start(synapse: SynapseServer) -> None:
    port = synapse.port
    synapse.stop(kill=True)
    assert not synapse.is_running
    synapse.stop()  # idempotent
    started = time.monotonic()
    synapse.start()
    print(f"Synapse start after SIGKILL: {time.monotonic() - started:.1f} s")
    assert synapse.port == port
    async with _client(synapse, "carol") as carol:
        room_id = await carol.create_room(is_direct=True, encrypted=True)
        assert await carol.joined_members(room_id) == [carol.user_id]
