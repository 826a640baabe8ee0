"""Signed webhook requests reach a real Synapse room through a real bridge, once each."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from bridge.config import read_yaml_file
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from bridge.webhooks.signature import sign
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json
from tests.e2e.test_bot import message_from
from tests.integration.test_metrics import scrape, value

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
MAX_BODY = 4096


@dataclass
class HookSetup:
    bridge: BridgeProcess
    alice: MatrixTestClient
    room_id: str  # the bot is in it: hook "ci"
    late_room_id: str  # the bot is not (yet): hook "late"
    ghost: str

    def url(self, name: str) -> str:
        return f"{self.bridge.base_url}/webhooks/v1/{name}"

    async def post(
        self,
        name: str,
        payload: Any,
        *,
        webhook_id: str | None = None,
        timestamp: int | None = None,
        key: bytes = KEY,
        signature: str | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        webhook_id = webhook_id or f"msg_{uuid.uuid4().hex}"
        ts = int(time.time()) if timestamp is None else timestamp
        headers = {
            "content-type": content_type,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": signature or sign(key, webhook_id, ts, body),
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(self.url(name), data=body, headers=headers) as response,
        ):
            return response.status, await response.json(content_type=None)


def text_is(text: str) -> Any:
    return lambda e: e.get("type") == "m.room.message" and e["content"].get("body") == text


@pytest.fixture
async def hooks(
    synapse_setup: SynapseSetup, make_user: UserFactory, db_url: str, tmp_path: Path
) -> AsyncIterator[HookSetup]:
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    room_id = await alice.create_room(invite=[bot], name="CI")
    late_room_id = await alice.create_room(name="Not yet")
    (tmp_path / "late.whsec").write_text(SECRET + "\n", encoding="utf-8")
    raw: dict[str, Any] = read_yaml_file(synapse_setup.config_path)
    raw["webhooks"] = {
        "hooks": {
            "ci": {"room": room_id, "secret": SECRET},
            "late": {"room": late_room_id, "secret_file": "late.whsec"},
        },
        "max_body_size": MAX_BODY,
    }
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        await alice.wait_for_membership(room_id, bot, "join")
        yield HookSetup(bridge, alice, room_id, late_room_id, bridge.config.hook_ghost_mxid("ci"))
    finally:
        bridge.stop()
    assert SECRET not in bridge.log_text()
    assert SECRET[6:] not in bridge.log_text()


async def test_signed_hook_posted_by_its_ghost_threads_and_replays(hooks: HookSetup) -> None:
    status, answer = await hooks.post(
        "ci",
        {
            "text": "Build 7 failed @room",
            "html": "<b>Build 7</b> failed <script>alert(1)</script>"
            '<a href="https://matrix.to/#/@alice:x">Alice</a>',
            "sender": "Jenkins",
        },
        webhook_id="msg_build7",
    )
    assert (status, answer) == (202, {"accepted": True})
    event = await hooks.alice.wait_for_event(hooks.room_id, text_is("Build 7 failed @room"))
    assert event["sender"] == hooks.ghost
    content = event["content"]
    assert content["m.mentions"] == {}
    assert content["formatted_body"] == "<b>Build 7</b> failed Alice"
    profile = await hooks.alice.request(
        "GET", f"/_matrix/client/v3/profile/{quote(hooks.ghost)}/displayname"
    )
    assert profile["displayname"] == "Jenkins (via webhook ci)"

    # The same webhook-id again (a redelivery): answered, not posted twice.
    status, answer = await hooks.post(
        "ci", {"text": "Build 7 failed @room"}, webhook_id="msg_build7"
    )
    assert (status, answer) == (200, {"duplicate": True})

    # Thread keys: the first message starts the thread, the next ones go in it.
    for n in range(3):
        status, _ = await hooks.post("ci", {"text": f"deploy step {n}", "thread": "deploy-42"})
        assert status == 202
    root = await hooks.alice.wait_for_event(hooks.room_id, text_is("deploy step 0"))
    for n in (1, 2):
        step = await hooks.alice.wait_for_event(hooks.room_id, text_is(f"deploy step {n}"))
        relates = step["content"]["m.relates_to"]
        assert relates["rel_type"] == "m.thread"
        assert relates["event_id"] == root["event_id"]
    assert "m.relates_to" not in root["content"]

    await asyncio.sleep(1)
    events = await hooks.alice.messages(hooks.room_id)
    assert len([e for e in events if text_is("Build 7 failed @room")(e)]) == 1
    profile = await hooks.alice.request(
        "GET", f"/_matrix/client/v3/profile/{quote(hooks.ghost)}/displayname"
    )
    assert profile["displayname"] == "ci (webhook)"

    # /metrics: each posted request counted once and timed (accepted → posted); the inbox
    # gauge is there (refreshed in the background).
    samples = await scrape(hooks.bridge.base_url)
    assert value(samples, "passerelle_items_total", direction="webhook_in", outcome="posted") == 4
    assert value(samples, "passerelle_relay_latency_seconds_count", direction="webhook_in") == 4
    assert ("passerelle_queue_depth", (("queue", "webhook_inbox"),)) in samples


async def test_refused_requests(hooks: HookSetup) -> None:
    now = int(time.time())

    async def expect(status: int, errcode: str, *args: Any, **kw: Any) -> None:
        got, answer = await hooks.post(*args, **kw)
        assert (got, answer.get("errcode")) == (status, errcode), (args, kw, answer)
        assert isinstance(answer.get("error"), str)

    await expect(401, "M_UNAUTHORIZED", "ci", {"text": "refused stale"}, timestamp=now - 3600)
    await expect(401, "M_UNAUTHORIZED", "ci", {"text": "refused key"}, key=b"k" * 32)
    await expect(401, "M_UNAUTHORIZED", "ci", {"text": "refused sig"}, signature="v1,AAAA")
    await expect(404, "M_NOT_FOUND", "nope", {"text": "refused unknown"})
    await expect(413, "M_TOO_LARGE", "ci", {"text": "refused " + "x" * MAX_BODY})
    await expect(400, "M_NOT_JSON", "ci", {"text": "refused ctype"}, content_type="text/plain")
    await expect(400, "M_BAD_JSON", "ci", b"refused not json")
    await expect(400, "M_BAD_JSON", "ci", {"text": "refused", "extra": 1})
    await expect(400, "M_BAD_JSON", "ci", {"text": ""})
    await expect(400, "M_BAD_JSON", "ci", ["refused list"])

    # Key rotation: an old and a new signature side by side; one valid is enough.
    body = json.dumps({"text": "rotated"}).encode()
    webhook_id = "msg_rotated"
    both = f"{sign(b'o' * 32, webhook_id, now, body)} {sign(KEY, webhook_id, now, body)}"
    status, _ = await hooks.post("ci", body, webhook_id=webhook_id, timestamp=now, signature=both)
    assert status == 202
    await hooks.alice.wait_for_event(hooks.room_id, text_is("rotated"))
    events = await hooks.alice.messages(hooks.room_id)
    assert not [e for e in events if "refused" in str(e.get("content", {}).get("body", ""))]


async def test_hook_waits_for_the_bot_to_join(
    hooks: HookSetup, synapse_setup: SynapseSetup
) -> None:
    status, _ = await hooks.post("late", {"text": "kept until the bot is here"})
    assert status == 202
    await asyncio.sleep(2)
    assert "webhook late waits" in hooks.bridge.log_text()
    # Another hook's room is not held back meanwhile.
    status, _ = await hooks.post("ci", {"text": "not held back"})
    assert status == 202
    await hooks.alice.wait_for_event(hooks.room_id, text_is("not held back"))
    bot = synapse_setup.config.bot_mxid
    await hooks.alice.invite(hooks.late_room_id, bot)
    event = await hooks.alice.wait_for_event(
        hooks.late_room_id, text_is("kept until the bot is here"), timeout=30
    )
    assert event["sender"] == hooks.bridge.config.hook_ghost_mxid("late")
    status, health = http_json(hooks.bridge.base_url + "/health")
    assert health["webhooks"]["done"] == 2, health
    assert health["webhooks"]["waiting_rooms"] == []
    assert message_from(event["sender"])(event)


@pytest.mark.both_databases
async def test_homeserver_down_then_each_posted_once_in_order(
    hooks: HookSetup, synapse_setup: SynapseSetup
) -> None:
    synapse = synapse_setup.synapse
    synapse.stop()
    try:
        for n in range(3):
            status, answer = await hooks.post("ci", {"text": f"outage {n}"})
            assert (status, answer) == (202, {"accepted": True})
        await asyncio.sleep(2)  # the relay tries, and waits for the homeserver
        # Killed while it waits: the kept requests survive in the database.
        hooks.bridge.stop(kill=True)
    finally:
        await asyncio.to_thread(synapse.start)
    hooks.bridge.start()
    await hooks.alice.wait_for_event(hooks.room_id, text_is("outage 2"), timeout=60)
    await asyncio.sleep(1)
    bodies = [
        e["content"]["body"]
        for e in await hooks.alice.messages(hooks.room_id)
        if e.get("sender") == hooks.ghost and e.get("type") == "m.room.message"
    ]
    assert bodies == [f"outage {n}" for n in range(3)]
