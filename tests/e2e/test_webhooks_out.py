"""Room messages reach a legacy system's real HTTP server, signed, in order, once each; a
receiver that fails is retried and a refusal is told next to the message."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bridge.config import read_yaml_file
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from bridge.webhooks.signature import SignatureError, verify_headers
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json
from tests.e2e.test_bot import replies_to
from tests.e2e.test_webhook_commands import direct_chat, key_of
from tests.e2e.test_webhooks_in import SECRET as IN_SECRET
from tests.e2e.test_webhooks_in import HookSetup, text_is
from tests.integration.test_metrics import scrape, value

OUT_KEY = os.urandom(32)
OUT_SECRET = "whsec_" + base64.b64encode(OUT_KEY).decode()


@dataclass
class Delivered:
    headers: dict[str, str]
    body: bytes
    path: str = "/hooks/matrix"

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return str(self.json["data"].get("text", ""))


@dataclass
class Receiver:
    """A legacy system's HTTP endpoint: records every request, answers as scripted by the
    message text (a list of statuses, used up in turn; "sleep" waits longer than the
    bridge's delivery timeout)."""

    port: int
    received: list[Delivered] = field(default_factory=list)
    script: dict[str, list[int | str]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/matrix?token=t0ken"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Delivered(dict(request.headers), body, request.path))
        try:
            text = json.loads(body)["data"].get("text", "")
        except (ValueError, KeyError):
            text = ""
        plan = self.script.get(text)
        answer: int | str = plan.pop(0) if plan else 200
        if answer == "sleep":
            await asyncio.sleep(3)
            answer = 200
        assert isinstance(answer, int)
        headers = {"Retry-After": "1"} if answer == 429 else {}
        return web.Response(status=answer, text="nope" if answer >= 300 else "ok", headers=headers)

    def of(self, text: str) -> list[Delivered]:
        return [d for d in self.received if d.text == text]

    async def wait_for(self, predicate: Any, timeout: float = 20) -> Delivered:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for delivered in self.received:
                if predicate(delivered):
                    return delivered
            await asyncio.sleep(0.1)
        raise AssertionError(f"no matching delivery within {timeout} s: {self.received}")


@dataclass
class OutSetup:
    bridge: BridgeProcess
    alice: MatrixTestClient
    room_id: str
    receiver: Receiver
    hooks: HookSetup  # the inbound hook "ci" posts in the same room


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(free_port())
    app = web.Application()
    app.router.add_post("/hooks/{name}", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", found.port).start()
    try:
        yield found
    finally:
        await runner.cleanup()


@pytest.fixture
async def out(
    synapse_setup: SynapseSetup,
    make_user: UserFactory,
    tmp_path: Path,
    receiver: Receiver,
) -> AsyncIterator[OutSetup]:
    bot = synapse_setup.config.bot_mxid
    alice = await make_user("alice")
    room_id = await alice.create_room(invite=[bot], name="Tickets")
    raw: dict[str, Any] = read_yaml_file(synapse_setup.config_path)
    raw["webhooks"] = {
        "hooks": {"ci": {"room": room_id, "secret": IN_SECRET}},
        "outgoing": {"tickets": {"room": room_id, "url": receiver.url, "secret": OUT_SECRET}},
        # The receiver is on loopback: it must be listed (its address, as the prefix's host).
        "egress": [f"http://127.0.0.1:{receiver.port}/hooks"],
        "delivery_timeout": 1,
        "give_up_after": 60,
    }
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    # One database kind is enough here: the outbox queries run on both in tests/integration.
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'passerelle.db'}"
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        await alice.wait_for_membership(room_id, bot, "join")
        hooks = HookSetup(bridge, alice, room_id, room_id, bridge.config.hook_ghost_mxid("ci"))
        yield OutSetup(bridge, alice, room_id, receiver, hooks)
    finally:
        bridge.stop()
    log = bridge.log_text()
    for secret in (OUT_SECRET, OUT_SECRET[6:], "t0ken"):
        assert secret not in log


def checked(delivered: Delivered, key: bytes = OUT_KEY) -> dict[str, Any]:
    """The delivery's JSON, after checking its Standard Webhooks signature."""
    headers = {k.lower(): v for k, v in delivered.headers.items()}
    assert headers["content-type"] == "application/json"
    verify_headers(key, delivered.headers, delivered.body, now=time.time(), tolerance=60)
    body: dict[str, Any] = delivered.json
    return body


async def test_messages_edits_threads_and_redactions_delivered_signed(out: OutSetup) -> None:
    alice, room = out.alice, out.room_id
    first = await alice.send_text(room, "Printer on fire")
    got = checked(await out.receiver.wait_for(lambda d: d.text == "Printer on fire"))
    assert got["type"] == "message.created"
    data = got["data"]
    assert data["hook"] == "tickets"
    assert (data["room_id"], data["event_id"], data["sender"]) == (room, first, alice.user_id)

    await alice.send_event(
        room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* Printer on fire (floor 2)",
            "m.new_content": {"msgtype": "m.text", "body": "Printer on fire (floor 2)"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": first},
        },
    )
    edit = checked(await out.receiver.wait_for(lambda d: d.text == "Printer on fire (floor 2)"))
    assert edit["type"] == "message.edited"
    assert edit["data"]["edits"] == first

    await alice.send_event(
        room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "extinguisher found",
            "m.relates_to": {"rel_type": "m.thread", "event_id": first},
        },
    )
    reply = checked(await out.receiver.wait_for(lambda d: d.text == "extinguisher found"))
    assert reply["data"]["thread"] == first

    redaction = await alice.redact(room, first)
    gone = checked(await out.receiver.wait_for(lambda d: d.json["type"] == "message.redacted"))
    assert (gone["data"]["redacts"], gone["data"]["event_id"]) == (first, redaction)

    # What the bridge itself posts is never sent back out: not the inbound hook's ghost (a
    # legacy system would hear its own messages), not a bot command or its answer.
    status, _ = await out.hooks.post("ci", {"text": "from the legacy system"})
    assert status == 202
    await alice.wait_for_event(room, text_is("from the legacy system"))
    await alice.send_text(room, "!passerelle help")
    await alice.send_text(room, "after the ghost")
    await out.receiver.wait_for(lambda d: d.text == "after the ghost")
    texts = [d.text for d in out.receiver.received]
    assert "from the legacy system" not in texts
    assert not [t for t in texts if t.startswith("!passerelle")]
    assert [d.json["type"] for d in out.receiver.received].count("message.created") == 3

    # Each delivery once, in the room's order.
    order = [
        "Printer on fire",
        "Printer on fire (floor 2)",
        "extinguisher found",
        "after the ghost",
    ]
    assert [t for t in texts if t in order] == order


async def test_failures_retried_in_order_and_refusals_told(out: OutSetup) -> None:
    alice, room, receiver = out.alice, out.room_id, out.receiver
    receiver.script["flaky"] = [500, 429, "sleep"]  # then 200
    receiver.script["refused"] = [400]
    await alice.send_text(room, "flaky")
    await alice.send_text(room, "behind flaky")
    refused = await alice.send_text(room, "refused")
    await alice.send_text(room, "after refused")
    await receiver.wait_for(lambda d: d.text == "after refused", timeout=30)

    # 500, 429, then a slow answer (longer than delivery_timeout: not delivered, retried),
    # then the 200: four attempts.
    attempts = receiver.of("flaky")
    assert len(attempts) == 4
    # The same webhook-id on every attempt (the receiver can drop a repeat), new signatures.
    assert len({d.headers["webhook-id"] for d in attempts}) == 1
    checked(attempts[-1])
    order = [d.text for d in receiver.received if d.text != "flaky"]
    assert order == ["behind flaky", "refused", "after refused"]

    notice = await alice.wait_for_event(
        room,
        lambda e: (
            e["content"].get("msgtype") == "m.notice"
            and "webhook tickets" in e["content"].get("body", "")
        ),
    )
    assert notice["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == refused
    assert "HTTP 400" in notice["content"]["body"]
    assert "nope" not in notice["content"]["body"]  # the receiver's text is not shown

    status, health = http_json(out.bridge.base_url + "/health")
    assert health["webhook_outbox"]["sent"] == 3
    assert health["webhook_outbox"]["failed"] == 1
    assert status in (200, 503)

    # /metrics: each delivery counted once by outcome, and timed.
    samples = await scrape(out.bridge.base_url)
    assert value(samples, "passerelle_items_total", direction="webhook_out", outcome="sent") == 3
    assert value(samples, "passerelle_items_total", direction="webhook_out", outcome="failed") == 1
    assert value(samples, "passerelle_relay_latency_seconds_count", direction="webhook_out") == 3
    assert ("passerelle_queue_depth", (("queue", "webhook_outbox"),)) in samples


async def test_delivery_survives_a_crash(out: OutSetup) -> None:
    receiver = out.receiver
    receiver.script["kept"] = [503] * 100
    await out.alice.send_text(out.room_id, "kept")
    await receiver.wait_for(lambda d: d.text == "kept")
    out.bridge.stop(kill=True)
    receiver.script["kept"] = []
    n = len(receiver.of("kept"))
    out.bridge.start()
    await receiver.wait_for(lambda d: len(receiver.of("kept")) > n, timeout=30)
    await asyncio.sleep(1.5)
    assert len(receiver.of("kept")) == n + 1  # delivered once after the restart, not again


async def secret_message(alice: MatrixTestClient, dm: str, bot: str, n: int) -> str:
    """The secret of the n-th (from 1) secret notice of the bot in the direct chat."""
    for _ in range(100):
        found = [
            e["content"]["body"]
            for e in await alice.messages(dm)
            if e.get("sender") == bot and "Secret: " in str(e.get("content", {}).get("body"))
        ]
        if len(found) >= n:
            body = str(found[n - 1])
            assert "It sends the messages of" in body
            return body.split("Secret: ", 1)[1].split()[0]
        await asyncio.sleep(0.2)
    raise AssertionError("no secret in the direct chat")


async def test_made_in_the_room_rotated_and_revoked(
    out: OutSetup, synapse_setup: SynapseSetup
) -> None:
    alice, room, receiver = out.alice, out.room_id, out.receiver
    bot = synapse_setup.config.bot_mxid

    async def command(text: str) -> str:
        question = await alice.send_text(room, f"!passerelle {text}")
        answer = await alice.wait_for_event(room, replies_to(question, bot))
        return str(answer["content"]["body"])

    mine = f"http://127.0.0.1:{receiver.port}/hooks/mine"
    assert await command(f"webhook out mine {mine}") == (
        f"Webhook mine created: this room's messages are sent to {mine}; the secret that "
        "signs them was sent to you in a direct chat."
    )
    refused = await command("webhook out meta http://169.254.169.254/latest/meta-data")
    assert refused.startswith("That URL is not allowed (webhooks.egress): ")
    dm = await direct_chat(alice, bot)
    first = key_of(await secret_message(alice, dm, bot, 1))

    await alice.send_text(room, "for both hooks")
    await receiver.wait_for(lambda d: d.text == "for both hooks" and d.path == "/hooks/mine")
    to_mine = [d for d in receiver.of("for both hooks") if d.path == "/hooks/mine"]
    assert checked(to_mine[0], first)["data"]["hook"] == "mine"
    to_tickets = [d for d in receiver.of("for both hooks") if d.path == "/hooks/matrix"]
    assert checked(to_tickets[0])["data"]["hook"] == "tickets"
    assert to_mine[0].headers["webhook-id"] != to_tickets[0].headers["webhook-id"]

    # Rotated: during the grace each delivery carries both signatures, each valid.
    assert "has a new secret" in await command("webhook rotate mine")
    second = key_of(await secret_message(alice, dm, bot, 2))
    await alice.send_text(room, "after rotation")
    await receiver.wait_for(lambda d: d.text == "after rotation" and d.path == "/hooks/mine")
    (rotated,) = [d for d in receiver.of("after rotation") if d.path == "/hooks/mine"]
    assert len(rotated.headers["webhook-signature"].split(" ")) == 2
    checked(rotated, first)
    checked(rotated, second)

    # Revoked while a delivery waits (its receiver answers 503): the waiting one is dropped,
    # and a hook made again with the same name does not inherit it.
    receiver.script["stuck"] = [503] * 100
    await alice.send_text(room, "stuck")
    await receiver.wait_for(lambda d: d.text == "stuck" and d.path == "/hooks/mine")
    assert "no longer sent to it" in await command("webhook revoke mine")
    receiver.script["stuck"] = []
    assert (await command(f"webhook out mine {mine}")).startswith("Webhook mine created")
    third = key_of(await secret_message(alice, dm, bot, 3))
    await alice.send_text(room, "after revoke")
    await receiver.wait_for(lambda d: d.text == "after revoke" and d.path == "/hooks/mine")
    (again,) = [d for d in receiver.of("after revoke") if d.path == "/hooks/mine"]
    checked(again, third)
    await asyncio.sleep(1.5)
    stuck = [d for d in receiver.of("stuck") if d.path == "/hooks/mine"]
    assert 1 <= len(stuck) <= 2  # the first attempt, and at most one retry before the revoke
    for d in stuck:  # none of them went to the new hook (signed with its secret)
        with pytest.raises(SignatureError):
            checked(d, third)
    assert "no longer sent to it" in await command("webhook revoke mine")
    await alice.send_text(room, "after the last revoke")
    await receiver.wait_for(lambda d: d.text == "after the last revoke")
    await asyncio.sleep(1)
    assert [d.path for d in receiver.of("after the last revoke")] == ["/hooks/matrix"]
    assert "whsec_" not in out.bridge.log_text()
