"""A person meets the management bot through a real Synapse and `passerelle run`."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

from bridge.config import read_yaml_file
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json


def replies_to(event_id: str, sender: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        relates = event.get("content", {}).get("m.relates_to", {})
        return (
            event.get("sender") == sender
            and relates.get("m.in_reply_to", {}).get("event_id") == event_id
        )

    return match


def message_from(sender: str) -> Any:
    return lambda e: e.get("sender") == sender and e.get("type") == "m.room.message"


def bot_notices(events: list[dict[str, Any]], bot: str) -> list[dict[str, Any]]:
    return [
        e
        for e in events
        if e.get("sender") == bot
        and e.get("type") == "m.room.message"
        and e["content"].get("msgtype") == "m.notice"
    ]


async def open_dm(person: MatrixTestClient, bot: str) -> str:
    room_id = await person.create_room(invite=[bot], is_direct=True)
    await person.wait_for_membership(room_id, bot, "join")
    return room_id


async def start_and_open_dm(
    setup: SynapseSetup, bridge: BridgeProcess, make_user: UserFactory
) -> tuple[MatrixTestClient, str, str]:
    """The bridge running, a fresh person, and a direct chat with the bot: (alice, room, bot)."""
    bridge.start()
    bot = setup.config.bot_mxid
    alice = await make_user("alice")
    return alice, await open_dm(alice, bot), bot


async def test_help_in_a_direct_chat(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    alice, room_id, bot = await start_and_open_dm(synapse_setup, bridge_process, make_user)

    greeting = await alice.wait_for_event(room_id, message_from(bot))
    assert greeting["content"]["msgtype"] == "m.notice"
    assert "help" in greeting["content"]["body"]

    question = await alice.send_text(room_id, "help")
    answer = await alice.wait_for_event(room_id, replies_to(question, bot))
    content = answer["content"]
    assert content["msgtype"] == "m.notice"
    assert "status" in content["body"]
    assert "help" in content["body"]
    assert content["m.mentions"] == {}
    assert "<li>" in content["formatted_body"]

    status_q = await alice.send_text(room_id, "status")
    status = await alice.wait_for_event(room_id, replies_to(status_q, bot))
    code, health = http_json(bridge_process.base_url + "/health")
    assert code == 200
    assert health["homeserver"]["reachable"] is True
    assert "Homeserver: reachable" in status["content"]["body"]
    assert f"Database ({health['database']['dialect']}): ok" in status["content"]["body"]

    unknown_q = await alice.send_text(room_id, "frobnicate now")
    unknown = await alice.wait_for_event(room_id, replies_to(unknown_q, bot))
    assert "Unknown command “frobnicate”" in unknown["content"]["body"]

    # The log runs at DEBUG here, and still holds no token.
    log = bridge_process.log_text()
    assert "command 'help'" in log
    assert synapse_setup.config.appservice.as_token not in log
    assert synapse_setup.config.appservice.hs_token not in log


async def test_the_bot_never_answers_its_own_ghosts(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    bridge_process.start()
    bot = synapse_setup.config.bot_mxid
    as_token = synapse_setup.config.appservice.as_token
    alice = await make_user("alice")
    room_id = await alice.create_room(invite=[bot], name="With a ghost")
    await alice.wait_for_membership(room_id, bot, "join")
    # A ghost in the bridge's namespace, acting through the appservice token like the bridge.
    ghost_id = synapse_setup.config.ghost_mxid(f"agent{uuid.uuid4().hex[:8]}=40example.test")
    ghost = MatrixTestClient(synapse_setup.synapse.base_url, as_token, ghost_id)
    try:
        await ghost.request(
            "POST",
            "/_matrix/client/v3/register",
            json_body={
                "type": "m.login.application_service",
                "username": ghost_id[1:].split(":")[0],
                "inhibit_login": True,
            },
        )
        await alice.invite(room_id, ghost_id)
        await ghost.request(
            "POST", f"/_matrix/client/v3/join/{room_id}", params={"user_id": ghost_id}
        )
        await ghost.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{room_id}/send/m.room.message/g1",
            json_body={"msgtype": "m.text", "body": "!passerelle help"},
            params={"user_id": ghost_id},
        )
    finally:
        await ghost.close()
    probe = await alice.send_text(room_id, "!passerelle status")
    await alice.wait_for_event(room_id, replies_to(probe, bot))
    notices = bot_notices(await alice.messages(room_id), bot)
    assert len(notices) == 2  # the greeting and the answer to alice's probe


async def test_prefix_in_a_group_room_and_silence_otherwise(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    bridge_process.start()
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    bob = await make_user("bob")
    room_id = await alice.create_room(invite=[bot, bob.user_id], name="Achats")
    await alice.wait_for_membership(room_id, bot, "join")
    await bob.join(room_id)

    # Plain chatter, a notice and a bare "help" are not for the bot in a group room.
    await alice.send_text(room_id, "help")
    await bob.send_text(room_id, "!passerelle help", msgtype="m.notice")
    question = await bob.send_text(room_id, "!passerelle help")
    answer = await bob.wait_for_event(room_id, replies_to(question, bot))
    assert "!passerelle help" in answer["content"]["body"]

    # A command inside a thread is answered inside that thread.
    root = await alice.send_text(room_id, "a thread about procurement")
    in_thread = await alice.send_text(
        room_id,
        "!passerelle status",
        extra={"m.relates_to": {"rel_type": "m.thread", "event_id": root}},
    )
    threaded = await alice.wait_for_event(room_id, replies_to(in_thread, bot))
    assert threaded["content"]["m.relates_to"]["rel_type"] == "m.thread"
    assert threaded["content"]["m.relates_to"]["event_id"] == root

    notices = bot_notices(await alice.messages(room_id), bot)
    # greeting, the prefixed help, the threaded status: nothing for "help" or the notice
    assert len(notices) == 3, [n["content"]["body"][:40] for n in notices]


async def test_invites_from_people_not_permitted_are_refused(
    synapse_setup: SynapseSetup, make_user: UserFactory, tmp_path: Path, db_url: str
) -> None:
    # Same registration, but only one named admin may use the bridge.
    raw = read_yaml_file(synapse_setup.config_path)
    raw["permissions"] = {"@admin:localhost": "admin"}
    variant = tmp_path / "config.yaml"
    atomic_write(variant, dump_yaml(raw))
    bridge = BridgeProcess(variant, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        mallory = await make_user("mallory")
        room_id = await mallory.create_room(invite=[bot], is_direct=True)
        await mallory.wait_for_membership(room_id, bot, "leave")
        state = await mallory.request(
            "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{bot}"
        )
        assert "not allowed" in state.get("reason", "")

        admin = await make_user(localpart="admin")
        room_id = await open_dm(admin, bot)
        await admin.invite(room_id, mallory.user_id)
        await mallory.join(room_id)
        question = await mallory.send_text(room_id, "!passerelle help")
        answer = await mallory.wait_for_event(room_id, replies_to(question, bot))
        assert "not allowed" in answer["content"]["body"]
    finally:
        bridge.stop()
    assert "refusing invite" in bridge.log_text()


async def test_encrypted_rooms_are_refused_without_a_word_in_clear(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    bridge_process.start()
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    room_id = await alice.create_room(invite=[bot], encrypted=True, is_direct=True)
    await alice.wait_for_membership(room_id, bot, "leave")
    state = await alice.request(
        "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{bot}"
    )
    assert "encrypted" in state.get("reason", "")
    assert bot_notices(await alice.messages(room_id), bot) == []

    # A room that turns encryption on after the bot joined: the bot falls silent.
    room_id = await open_dm(alice, bot)
    await alice.wait_for_event(room_id, message_from(bot))
    await alice.send_state(room_id, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    await alice.send_text(room_id, "help")
    probe = await alice.send_text(room_id, "status")
    # The bot handles a room's events in order: once the probe is handled, "help" was too.
    await _wait_handled(bridge_process, probe)
    assert len(bot_notices(await alice.messages(room_id), bot)) == 1  # the greeting only


async def _wait_handled(bridge: BridgeProcess, event_id: str, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if f"{event_id} ignored" in bridge.log_text():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{event_id} was not handled:\n{bridge.log_tail()}")


async def test_bridge_started_after_the_message_still_answers_once(
    synapse_setup: SynapseSetup, bridge_process: BridgeProcess, make_user: UserFactory
) -> None:
    alice, room_id, bot = await start_and_open_dm(synapse_setup, bridge_process, make_user)
    bridge_process.stop()

    question = await alice.send_text(room_id, "help")
    bridge_process.start()
    await alice.wait_for_event(room_id, replies_to(question, bot), timeout=40)
    answers = [e for e in await alice.messages(room_id) if replies_to(question, bot)(e)]
    assert len(answers) == 1
