"""Nothing lost, nothing twice: restarts of the bridge and of Synapse, replayed transactions."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from typing import Any

import aiohttp
import pytest

from bridge.harness.synapse import MatrixTestClient
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json
from tests.e2e.test_bot import open_dm, replies_to, start_and_open_dm


async def answers_to(client: MatrixTestClient, room_id: str, event_id: str, bot: str) -> int:
    return sum(
        1 for e in await client.messages(room_id, limit=500) if replies_to(event_id, bot)(e)
    )


async def push_transaction(
    bridge: BridgeProcess, txn_id: str, events: list[dict[str, Any]]
) -> int:
    token = bridge.config.appservice.hs_token
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"{bridge.base_url}/_matrix/app/v1/transactions/{txn_id}",
            json={"events": events},
            headers={"Authorization": f"Bearer {token}"},
        ) as resp,
    ):
        assert await resp.json() == {}
        return resp.status


@pytest.mark.both_databases
async def test_replayed_transaction_after_bridge_restart_is_not_handled_twice(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    alice, room_id, bot = await start_and_open_dm(synapse_setup, bridge_process, make_user)
    question = await alice.send_text(room_id, "help")
    await alice.wait_for_event(room_id, replies_to(question, bot))

    bridge_process.stop()
    bridge_process.start()
    # The event exactly as the homeserver pushed it, under the txnId a restarted Synapse on
    # SQLite would reuse, and under a fresh one.
    quoted = urllib.parse.quote(room_id)
    event = await alice.request("GET", f"/_matrix/client/v3/rooms/{quoted}/event/{question}")
    assert await push_transaction(bridge_process, "1", [event]) == 200
    assert await push_transaction(bridge_process, uuid.uuid4().hex, [event]) == 200

    # The bot handles a room's events in order: once the probe is answered, the replays
    # were handled (as duplicates) too.
    probe = await alice.send_text(room_id, "status")
    await alice.wait_for_event(room_id, replies_to(probe, bot))
    assert await answers_to(alice, room_id, question, bot) == 1


@pytest.mark.both_databases
async def test_synapse_killed_while_the_bridge_runs_loses_no_event(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    bridge_process.start()
    synapse = synapse_setup.synapse
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    room_id = await open_dm(alice, bot)
    questions = [await alice.send_text(room_id, "help") for _ in range(5)]
    synapse.stop(kill=True)
    try:
        # The bridge notices, says so on /health, and keeps its HTTP API up meanwhile.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            _, health = http_json(bridge_process.base_url + "/health")
            if not health["homeserver"]["reachable"]:
                break
            await asyncio.sleep(0.2)
        assert health["status"] == "degraded", health
    finally:
        await asyncio.to_thread(synapse.start)

    # Synapse may have accepted a question but died before pushing it to us: the bridge reads
    # the room back once Synapse returns, so every question is still answered, once.
    for question in questions:
        await alice.wait_for_event(room_id, replies_to(question, bot), timeout=60)
    late = await alice.send_text(room_id, "status")
    await alice.wait_for_event(room_id, replies_to(late, bot), timeout=60)
    for question in questions:
        assert await answers_to(alice, room_id, question, bot) == 1


@pytest.mark.both_databases
async def test_bridge_started_before_synapse_connects_when_it_comes(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    synapse = synapse_setup.synapse
    synapse.stop()
    try:
        bridge_process.start(wait_homeserver=False)
        code, health = http_json(bridge_process.base_url + "/health")
        assert code == 200
        assert health["status"] == "degraded"
        assert health["homeserver"]["last_error"]
    finally:
        await asyncio.to_thread(synapse.start)
    deadline = time.monotonic() + 40
    while not http_json(bridge_process.base_url + "/health")[1]["homeserver"]["reachable"]:
        assert time.monotonic() < deadline, bridge_process.log_tail()
        await asyncio.sleep(0.2)
    assert "retrying in" in bridge_process.log_text()

    alice = await make_user("alice")
    room_id = await open_dm(alice, synapse_setup.config.bot_mxid)
    question = await alice.send_text(room_id, "help")
    await alice.wait_for_event(room_id, replies_to(question, synapse_setup.config.bot_mxid))
