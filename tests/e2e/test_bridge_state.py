"""Linked rooms carry `m.bridge` and `uk.half-shot.bridge` state (MSC2346) for each link, set
when it is made (command or config file) and emptied when it is removed (issue 11)."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bridge.harness.dovecot import DovecotServer
from bridge.harness.synapse import MatrixRequestError, MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import PASSWORD, bridge_config_with_mailbox
from tests.e2e.test_remote_relay import REMOTE, Linked

TYPES = ("m.bridge", "uk.half-shot.bridge")


async def bridge_state(
    client: MatrixTestClient, room_id: str, event_type: str, state_key: str
) -> dict[str, Any] | None:
    """The content of the state event, None if the room never had it."""
    try:
        return await client.request(
            "GET",
            f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}/"
            f"{quote(state_key, safe='')}",
        )
    except MatrixRequestError as e:
        if e.status == 404:
            return None
        raise


async def give_bot_power(client: MatrixTestClient, room_id: str, bot: str) -> None:
    levels = await client.request(
        "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels"
    )
    levels.setdefault("users", {})[bot] = 50
    await client.send_state(room_id, "m.room.power_levels", levels)


async def ask(client: MatrixTestClient, room_id: str, bot: str, text: str) -> str:
    question = await client.send_text(room_id, text)
    answer = await client.wait_for_event(room_id, replies_to(question, bot))
    return str(answer["content"]["body"])


async def wait_for_state(
    client: MatrixTestClient, room_id: str, event_type: str, state_key: str
) -> dict[str, Any]:
    for _ in range(100):
        content = await bridge_state(client, room_id, event_type, state_key)
        if content:
            return content
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {event_type} state {state_key} in {room_id}")


async def test_a_mail_link_is_shown_and_unshown(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    address = dovecot.add_user(f"etat{uuid.uuid4().hex[:8]}", PASSWORD)
    config_path = tmp_path / "config.yaml"
    atomic_write(
        config_path, dump_yaml(bridge_config_with_mailbox(synapse_setup, dovecot, address))
    )
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice = await make_user("alice")
        room_id = await alice.create_room(invite=[bot], name="Achats")
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        await give_bot_power(alice, room_id, bot)
        answer = await ask(alice, room_id, bot, f"!passerelle link {address} allow achats.gouv.fr")
        assert "Linked" in answer, answer
        key = f"passerelle:{address}"
        for event_type in TYPES:
            state = await bridge_state(alice, room_id, event_type, key)
            assert state is not None, event_type
            assert state["bridgebot"] == bot
            assert state["creator"] == alice.user_id
            assert state["protocol"]["id"] == "email"
            assert state["network"]["id"] == address.rpartition("@")[2]
            assert state["channel"]["id"] == address
            assert state["channel"]["external_url"] == f"mailto:{address}"
        answer = await ask(alice, room_id, bot, f"!passerelle unlink {address}")
        assert "Unlinked" in answer, answer
        for event_type in TYPES:
            assert await bridge_state(alice, room_id, event_type, key) == {}, event_type
    finally:
        bridge.stop()


async def test_a_config_link_is_shown_at_start_up(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    """An unmarked link of the config file too: before, only marked ones were shown."""
    address = dovecot.add_user(f"cfg{uuid.uuid4().hex[:8]}", PASSWORD)
    alice = await make_user("alice")
    bot = synapse_setup.config.bot_mxid
    room_id = await alice.create_room(invite=[bot], name="Pinned by the admin")
    await give_bot_power(alice, room_id, bot)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["links"] = [{"room": room_id, "address": address, "allowed_senders": ["achats.gouv.fr"]}]
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        for event_type in TYPES:
            state = await wait_for_state(alice, room_id, event_type, f"passerelle:{address}")
            assert state["channel"]["id"] == address
            assert state["bridgebot"] == bot
            assert "creator" not in state
    finally:
        bridge.stop()


async def test_a_remote_link_is_shown_and_unshown(
    linked: Linked, ministry_synapse: SynapseServer
) -> None:
    # The bot joined with power level 0 and could not set the state: given the power, linking
    # again shows it.
    await give_bot_power(linked.alice, linked.agency_room, linked.bot)
    relink = f"{REMOTE} {linked.remote_room}"
    room, bot = linked.agency_room, linked.bot
    assert "Unlinked" in await ask(linked.alice, room, bot, f"!passerelle unlink-remote {relink}")
    assert "Linked" in await ask(linked.alice, room, bot, f"!passerelle link-remote {relink}")
    key = f"passerelle:{REMOTE}/{linked.remote_room}"
    for event_type in TYPES:
        state = await bridge_state(linked.alice, room, event_type, key)
        assert state is not None, event_type
        assert state["bridgebot"] == bot
        assert state["creator"] == linked.alice.user_id
        assert state["protocol"]["id"] == "matrix"
        assert state["network"] == {
            "id": ministry_synapse.server_name,
            "displayname": REMOTE,
        }
        assert state["channel"]["id"] == linked.remote_room
        assert state["channel"]["external_url"].startswith("https://matrix.to/#/")
    assert "Unlinked" in await ask(linked.alice, room, bot, f"!passerelle unlink-remote {relink}")
    for event_type in TYPES:
        assert await bridge_state(linked.alice, room, event_type, key) == {}, event_type
