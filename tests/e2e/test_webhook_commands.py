"""Hooks made in their room with the bot's `webhook` commands, through a real Synapse: the
secret goes to the requester's direct chat only, rotation keeps the old one for the grace."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from bridge.config import read_yaml_file
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json
from tests.e2e.test_bot import replies_to
from tests.e2e.test_webhooks_in import KEY, SECRET, HookSetup, text_is

GRACE = 4
_SECRET = re.compile(r"Secret: (whsec_[A-Za-z0-9+/=]+)")


@dataclass
class Made:
    hooks: HookSetup
    bot: str
    bob: MatrixTestClient


@pytest.fixture
async def made(
    synapse_setup: SynapseSetup, make_user: UserFactory, db_url: str, tmp_path: Path
) -> AsyncIterator[Made]:
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    bob = await make_user("bob")
    room_id = await alice.create_room(invite=[bot, bob.user_id], name="Deploys")
    await bob.join(room_id)
    raw: dict[str, Any] = read_yaml_file(synapse_setup.config_path)
    raw["webhooks"] = {
        "hooks": {"ci": {"room": room_id, "secret": SECRET}},
        "rotation_grace": GRACE,
    }
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        await alice.wait_for_membership(room_id, bot, "join")
        setup = HookSetup(bridge, alice, room_id, room_id, bridge.config.hook_ghost_mxid("ci"))
        yield Made(setup, bot, bob)
    finally:
        bridge.stop()
    log = bridge.log_text()
    assert "whsec_" not in log.replace(SECRET, ""), "a made secret was logged"


async def command(who: MatrixTestClient, made: Made, text: str) -> str:
    question = await who.send_text(made.hooks.room_id, f"!passerelle {text}")
    answer = await who.wait_for_event(made.hooks.room_id, replies_to(question, made.bot))
    return str(answer["content"]["body"])


async def direct_chat(person: MatrixTestClient, bot: str) -> str:
    """The room the bot invited the person to as a direct chat; joined."""
    for _ in range(100):
        sync = await person.request("GET", "/_matrix/client/v3/sync", params={"timeout": "0"})
        for room_id, room in sync.get("rooms", {}).get("invite", {}).items():
            for event in room.get("invite_state", {}).get("events", []):
                if (
                    event.get("type") == "m.room.member"
                    and event.get("sender") == bot
                    and event.get("content", {}).get("is_direct") is True
                ):
                    await person.join(room_id)
                    return str(room_id)
        await asyncio.sleep(0.2)
    raise AssertionError("no direct chat from the bot")


async def secret_in(person: MatrixTestClient, room_id: str, bot: str, n: int) -> tuple[str, str]:
    """The URL and secret of the n-th (from 1) secret message of the bot in the direct chat."""

    def nth(event: dict[str, Any]) -> bool:
        body = str(event.get("content", {}).get("body", ""))
        return event.get("sender") == bot and body.count("Secret:") == 1 and nth_seen(event)

    seen: list[str] = []

    def nth_seen(event: dict[str, Any]) -> bool:
        if event["event_id"] not in seen:
            seen.append(event["event_id"])
        return len(seen) >= n and seen[n - 1] == event["event_id"]

    event = await person.wait_for_event(room_id, nth)
    body = event["content"]["body"]
    url = re.search(r"URL: (\S+)", body)
    secret = _SECRET.search(body)
    assert url, body
    assert secret, body
    return url.group(1), secret.group(1)


def key_of(secret: str) -> bytes:
    return base64.b64decode(secret[len("whsec_") :])


async def test_new_rotate_revoke(made: Made, synapse_setup: SynapseSetup) -> None:
    hooks, bot = made.hooks, made.bot
    answer = await command(hooks.alice, made, "webhook new deploy")
    assert answer == (
        "Webhook deploy created; its URL and secret were sent to you in a direct chat."
    )
    dm = await direct_chat(hooks.alice, bot)
    url, secret = await secret_in(hooks.alice, dm, bot, 1)
    as_token = synapse_setup.config.appservice.as_token
    async with MatrixTestClient(synapse_setup.synapse.base_url, as_token, bot) as as_bot:
        direct = await as_bot.request(
            "GET", f"/_matrix/client/v3/user/{quote(bot)}/account_data/m.direct"
        )
    assert direct[hooks.alice.user_id] == [dm]
    assert url == hooks.bridge.config.appservice.address.rstrip("/") + "/webhooks/v1/deploy"
    status, _ = await hooks.post("deploy", {"text": "deployed v1"}, key=key_of(secret))
    assert status == 202
    event = await hooks.alice.wait_for_event(hooks.room_id, text_is("deployed v1"))
    assert event["sender"] == hooks.bridge.config.hook_ghost_mxid("deploy")

    listed = await command(hooks.alice, made, "webhook list")
    assert "• deploy — posts here — made by " + hooks.alice.user_id in listed
    assert "• ci — posts here — from the config file" in listed

    answer = await command(hooks.alice, made, "webhook rotate deploy")
    assert answer == (
        "Webhook deploy has a new secret, sent to you in a direct chat; the old one stays "
        f"valid for {GRACE} seconds."
    )
    _, new = await secret_in(hooks.alice, dm, bot, 2)
    assert new != secret
    for n, key in enumerate((secret, new)):
        status, _ = await hooks.post("deploy", {"text": f"grace {n}"}, key=key_of(key))
        assert status == 202
    await asyncio.sleep(GRACE + 1)
    status, _ = await hooks.post("deploy", {"text": "refused old"}, key=key_of(secret))
    assert status == 401
    status, _ = await hooks.post("deploy", {"text": "after grace"}, key=key_of(new))
    assert status == 202
    await hooks.alice.wait_for_event(hooks.room_id, text_is("after grace"))
    _, health = http_json(hooks.bridge.base_url + "/health")
    assert health["webhooks"]["done"] == 4, health

    answer = await command(hooks.alice, made, "webhook revoke deploy")
    assert answer.startswith("Webhook deploy revoked")
    status, _ = await hooks.post("deploy", {"text": "refused revoked"}, key=key_of(new))
    assert status == 404

    events = await hooks.alice.messages(hooks.room_id)
    assert "whsec_" not in json.dumps(events)
    assert not [e for e in events if "refused" in str(e.get("content", {}).get("body", ""))]


async def test_refused_without_power_or_with_a_configured_name(made: Made) -> None:
    hooks = made.hooks
    answer = await command(made.bob, made, "webhook new bobs")
    assert answer == "Managing webhooks needs the admin permission, or power level 50 here."
    answer = await command(hooks.alice, made, "webhook new ci")
    assert answer == "A webhook named ci already exists; choose another name."
    status, _ = await hooks.post("bobs", {"text": "refused unknown"}, key=KEY)
    assert status == 404
    status, _ = await hooks.post("ci", {"text": "config hook still works"})
    assert status == 202
    await hooks.alice.wait_for_event(hooks.room_id, text_is("config hook still works"))
    events = await hooks.alice.messages(hooks.room_id)
    assert "whsec_" not in json.dumps(events)
