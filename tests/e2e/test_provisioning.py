"""The provisioning API of a running bridge, each exchange checked against its OpenAPI doc."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

from bridge.app import Bridge
from bridge.config import parse_config
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml
from bridge.web.provisioning import PREFIX, openapi_document
from tests.conftest import (
    BridgeProcess,
    InProcessBridge,
    SynapseSetup,
    UserFactory,
    bridge_config_dict,
)
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import (
    MailSetup,
    body_contains,
    bridge_config_with_mailbox,
)
from tests.e2e.test_remote_relay import REMOTE, remote_config
from tests.e2e.test_webhook_commands import key_of
from tests.e2e.test_webhooks_in import HookSetup, text_is

SECRET = "provisioning-" + "s3cr3t" * 6
ADMIN = "@admin:localhost"
# A hook of the config file, in a room no test uses: the API lists it and refuses to change it.
CONFIG_HOOK = "ci"
CONFIG_HOOK_ROOM = "!config-hook:localhost"
CONFIG_HOOK_SECRET = "whsec_" + base64.b64encode(b"config-hook-key-" * 2).decode()


@dataclass
class _Request:
    host_url: str
    path: str
    method: str
    body: bytes | None
    content_type: str
    parameters: RequestParameters = field(default_factory=RequestParameters)


@dataclass
class _Response:
    status_code: int
    content_type: str
    headers: Headers
    data: bytes | None


@dataclass
class Api:
    """An HTTP client of the API that validates what it sends and what it gets back."""

    base_url: str
    session: aiohttp.ClientSession
    spec: OpenAPI = field(default_factory=lambda: OpenAPI.from_dict(openapi_document()))

    async def call(
        self,
        method: str,
        path: str,
        *,
        user_id: str | None = ADMIN,
        token: str | None = SECRET,
        body: Any = None,
        raw: bytes | None = None,
        query: dict[str, str] | None = None,
        valid_request: bool = True,
    ) -> tuple[int, Any]:
        params = dict(query or {})
        if user_id is not None:
            params["user_id"] = user_id
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = self.base_url + PREFIX + path
        async with self.session.request(
            method, url, params=params, headers=headers, data=data
        ) as resp:
            payload = await resp.read()
            status = resp.status
            response = _Response(
                status, resp.content_type, Headers(list(resp.headers.items())), payload
            )
        request = _Request(
            host_url=self.base_url,
            path=urlsplit(url).path,
            method=method.lower(),
            body=data,
            content_type="application/json" if data is not None else "",
            parameters=RequestParameters(
                query=ImmutableMultiDict(params), header=Headers(list(headers.items()))
            ),
        )
        if valid_request:
            self.spec.validate_request(request)
        else:
            with pytest.raises(Exception):  # noqa: B017, PT011 - any validation error
                self.spec.validate_request(request)
        self.spec.validate_response(request, response)
        return status, json.loads(payload)


async def test_off_without_a_secret(offline_bridge: InProcessBridge) -> None:
    async with aiohttp.ClientSession() as session:
        for path in ("/openapi.json", "/status", "/links"):
            async with session.get(
                offline_bridge.base_url + PREFIX + path,
                params={"user_id": ADMIN},
                headers={"Authorization": f"Bearer {SECRET}"},
            ) as resp:
                assert resp.status == 404
                assert (await resp.json())["errcode"] == "M_UNRECOGNIZED"


@dataclass
class Provisioned:
    api: Api
    bridge: BridgeProcess
    dovecot: DovecotServer
    address: str
    alice: MatrixTestClient
    bob: MatrixTestClient
    room_id: str
    bot: str


@pytest.fixture
async def provisioned(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[Provisioned]:
    """A bridge with a mailbox and the API on (secret in a file); Alice's room with the bot."""
    address = dovecot.add_user(f"list{uuid.uuid4().hex[:8]}", "list-password")
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    (tmp_path / "provisioning.secret").write_text(SECRET + "\n", encoding="utf-8")
    raw["provisioning"] = {"shared_secret_file": "provisioning.secret"}
    raw.setdefault("webhooks", {})["hooks"] = {
        CONFIG_HOOK: {"room": CONFIG_HOOK_ROOM, "secret": CONFIG_HOOK_SECRET}
    }
    # Outbound hooks may POST to one listed loopback address only; "localhost" matches a
    # prefix but resolves to an address that is not listed.
    raw["webhooks"]["egress"] = ["http://127.0.0.2:9/in", "http://localhost:9/"]
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice = await make_user("alice")
        bob = await make_user("bob")
        room_id = await alice.create_room(invite=[bot], name="Achats")
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        async with aiohttp.ClientSession() as session:
            yield Provisioned(
                Api(bridge.base_url, session), bridge, dovecot, address, alice, bob, room_id, bot
            )
    finally:
        bridge.stop()


async def test_authentication_and_user(provisioned: Provisioned) -> None:
    api = provisioned.api
    status, document = await api.call("GET", "/openapi.json", user_id=None, token=None)
    assert status == 200
    assert document == openapi_document()

    status, body = await api.call("GET", "/status", token=None, valid_request=False)
    assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")
    status, body = await api.call("GET", "/status", token="x" * 40)
    assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    status, body = await api.call("GET", "/status", user_id=None, valid_request=False)
    assert (status, body["errcode"]) == (400, "M_MISSING_PARAM")
    status, body = await api.call("GET", "/status", user_id="alice", valid_request=False)
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    # Only localhost users may use this bridge.
    status, body = await api.call("GET", "/status", user_id="@eve:elsewhere.example")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")

    status, report = await api.call("GET", "/status", user_id=provisioned.alice.user_id)
    assert status == 200
    assert report["homeserver"]["reachable"] is True
    assert "queue" in report

    # Every link: admins only; a user asks for a room they manage.
    status, body = await api.call("GET", "/links", user_id=provisioned.bob.user_id)
    assert status == 403
    status, body = await api.call(
        "GET", "/links", user_id=provisioned.bob.user_id, query={"room_id": provisioned.room_id}
    )
    assert status == 403
    status, body = await api.call("GET", "/links")
    assert (status, body) == (200, {"links": []})
    log = provisioned.bridge.log_text()
    assert SECRET not in log


@pytest.mark.both_databases
async def test_link_relay_unlink(provisioned: Provisioned) -> None:
    api, alice, room_id = provisioned.api, provisioned.alice, provisioned.room_id
    request = {"room_id": room_id, "address": provisioned.address}

    # Bad bodies and bad values.
    status, body = await api.call("POST", "/links/mail", raw=b"{", valid_request=False)
    assert (status, body["errcode"]) == (400, "M_NOT_JSON")
    status, body = await api.call(
        "POST", "/links/mail", body={**request, "colour": "blue"}, valid_request=False
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await api.call(
        "POST", "/links/mail", body={"address": provisioned.address}, valid_request=False
    )
    assert (status, body["errcode"]) == (400, "M_INVALID_PARAM")
    status, body = await api.call(
        "POST", "/links/mail", body={**request, "address": "unknown@achats.gouv.fr"}
    )
    assert status == 400
    assert "mail.mailboxes" in body["error"]
    status, body = await api.call(
        "POST", "/links/mail", body={**request, "allowed_senders": ["*"]}
    )
    assert status == 400

    # Bob has power level 0 in Alice's room.
    status, body = await api.call(
        "POST", "/links/mail", body=request, user_id=provisioned.bob.user_id
    )
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert "power level 50" in body["error"]

    status, link = await api.call(
        "POST",
        "/links/mail",
        body={**request, "allowed_senders": ["achats.gouv.fr"], "thread_mode": "flat"},
        user_id=alice.user_id,
    )
    assert status == 201, link
    assert link["address"] == provisioned.address
    assert link["room_id"] == room_id
    assert (link["kind"], link["source"], link["paused"]) == ("mail", "bot", False)
    assert link["settings"]["allowed_senders"] == ["achats.gouv.fr"]
    assert link["settings"]["thread_mode"] == "flat"

    # It relays mail like a link made with the bot's command.
    setup = MailSetup(
        provisioned.bridge,
        provisioned.dovecot,
        provisioned.address,
        provisioned.address.partition("@")[0],
        alice,
        room_id,
        provisioned.bot,
    )
    await setup.deliver(setup.mail("Papier", "il faut du papier via l'API")[1])
    posted = await setup.posted(body_contains("il faut du papier via l'API"))
    assert posted["sender"].startswith("@passerelle_agent.dupont")

    # The same list in another room: a conflict.
    other = await alice.create_room(invite=[provisioned.bot], name="Autre")
    await alice.wait_for_membership(other, provisioned.bot, "join")
    status, body = await api.call(
        "POST", "/links/mail", body={**request, "room_id": other}, user_id=alice.user_id
    )
    assert status == 409
    assert "already linked" in body["error"]

    status, listed = await api.call(
        "GET", "/links", user_id=alice.user_id, query={"room_id": room_id}
    )
    assert status == 200
    assert listed["links"] == [link]

    path = "/links/mail/" + quote(provisioned.address)
    status, body = await api.call("DELETE", "/links/mail/nobody%40achats.gouv.fr")
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    status, body = await api.call("DELETE", path, user_id=provisioned.bob.user_id)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = await api.call("DELETE", path, user_id=alice.user_id)
    assert status == 200
    assert body["removed"] == link
    assert body["dropped_messages"] == 0
    status, body = await api.call("GET", "/links")
    assert (status, body) == (200, {"links": []})


async def test_admin_links_a_room_the_bot_is_not_in(provisioned: Provisioned) -> None:
    api, alice = provisioned.api, provisioned.alice
    room_id = await alice.create_room(name="Sans le bot")
    status, link = await api.call(
        "POST", "/links/mail", body={"room_id": room_id, "address": provisioned.address}
    )
    assert status == 201, link
    assert link["paused"] is True  # waits for the bot's invite
    await alice.invite(room_id, provisioned.bot)
    await alice.wait_for_membership(room_id, provisioned.bot, "join")
    # The link resumes when the bridge handles the bot's join, a moment after it is seen.
    for _ in range(50):
        status, listed = await api.call("GET", "/links", query={"room_id": room_id})
        assert status == 200
        if listed["links"][0]["paused"] is False:
            break
        await asyncio.sleep(0.2)
    assert listed["links"][0]["paused"] is False


async def test_remote_link_relay_unlink(
    synapse_setup: SynapseSetup,
    ministry_synapse: SynapseServer,
    ministry_bridge_account: tuple[str, str],
    make_user: UserFactory,
    make_ministry_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    raw = remote_config(synapse_setup, ministry_synapse, ministry_bridge_account)
    raw["provisioning"] = {"shared_secret": SECRET}
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice, bob = await make_user("alice"), await make_ministry_user("bob")
        remote_room = await bob.create_room(invite=[ministry_bridge_account[0]], name="Coord")
        closed = await bob.create_room(name="Fermée")
        agency_room = await alice.create_room(invite=[bot], name="Coordination agence")
        await alice.wait_for_membership(agency_room, bot, "join")
        async with aiohttp.ClientSession() as session:
            api = Api(bridge.base_url, session)
            request = {"room_id": agency_room, "remote": REMOTE, "remote_room": closed}
            status, body = await api.call("POST", "/links/remote", body=request)
            assert status == 502, body
            assert "invite" in body["error"]
            status, body = await api.call(
                "POST", "/links/remote", body={**request, "remote": "ailleurs"}
            )
            assert status == 400
            status, body = await api.call(
                "POST",
                "/links/remote",
                body={**request, "remote_room": remote_room},
                user_id=alice.user_id,
            )
            assert status == 201, body
            assert body["remote"] == REMOTE
            assert body["remote_room"] == remote_room
            link = body

            await bob.send_text(remote_room, "Bonjour via l'API")
            await alice.wait_for_event(
                agency_room, lambda e: "Bonjour via l'API" in str(e["content"].get("body"))
            )

            status, listed = await api.call("GET", "/links")
            assert listed["links"] == [link]
            path = f"/links/remote/{REMOTE}/{quote(remote_room)}"
            status, body = await api.call("DELETE", path, user_id=alice.user_id)
            assert status == 200, body
            assert body["removed"] == link
            status, body = await api.call("DELETE", path)
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    finally:
        bridge.stop()


def no_secret_in(text: str, *secrets: str) -> bool:
    """Neither a secret nor its key (the base64 after whsec_) is in the text."""
    return not any(s in text or s.removeprefix("whsec_") in text for s in secrets)


async def test_webhook_made_used_rotated_revoked(provisioned: Provisioned) -> None:
    api, alice, room_id, bridge = (
        provisioned.api,
        provisioned.alice,
        provisioned.room_id,
        provisioned.bridge,
    )
    hooks = HookSetup(bridge, alice, room_id, room_id, bridge.config.hook_ghost_mxid("deploy"))

    status, made = await api.call(
        "POST", "/webhooks", body={"room_id": room_id, "name": "deploy"}, user_id=alice.user_id
    )
    assert status == 201, made
    url = bridge.config.appservice.address.rstrip("/") + "/webhooks/v1/deploy"
    assert made == {
        "name": "deploy",
        "room_id": room_id,
        "url": url,
        "direction": "inbound",
        "secret": made["secret"],
    }
    secret = made["secret"]
    status, _ = await hooks.post("deploy", {"text": "deployed via the API"}, key=key_of(secret))
    assert status == 202
    event = await alice.wait_for_event(room_id, text_is("deployed via the API"))
    assert event["sender"] == hooks.ghost

    # Listed without the secret, by the room's moderator and by an admin; the room's command
    # sees the same hooks.
    status, listed = await api.call(
        "GET", "/webhooks", user_id=alice.user_id, query={"room_id": room_id}
    )
    assert status == 200
    [hook] = listed["webhooks"]
    assert hook == {
        "name": "deploy",
        "room_id": room_id,
        "url": url,
        "direction": "inbound",
        "source": "room",
        "created_by": alice.user_id,
        "created_at": hook["created_at"],
    }
    assert abs(hook["created_at"] - time.time() * 1000) < 60_000
    status, everything = await api.call("GET", "/webhooks")
    assert status == 200
    assert [(h["name"], h["source"]) for h in everything["webhooks"]] == [
        (CONFIG_HOOK, "config"),
        ("deploy", "room"),
    ]
    assert everything["webhooks"][0] == {
        "name": CONFIG_HOOK,
        "room_id": CONFIG_HOOK_ROOM,
        "url": bridge.config.appservice.address.rstrip("/") + f"/webhooks/v1/{CONFIG_HOOK}",
        "direction": "inbound",
        "source": "config",
    }
    assert "whsec_" not in json.dumps([listed, everything])
    question = await alice.send_text(room_id, "!passerelle webhook list")
    answer = await alice.wait_for_event(room_id, replies_to(question, provisioned.bot))
    assert f"• deploy — posts here — made by {alice.user_id}" in answer["content"]["body"]

    # Rotated: the old and the new secret both work during the grace.
    status, rotated = await api.call("POST", "/webhooks/deploy/rotate", user_id=alice.user_id)
    assert status == 200, rotated
    new = rotated["secret"]
    assert new != secret
    assert (rotated["name"], rotated["url"]) == ("deploy", url)
    grace_end = rotated["previous_valid_until"]
    assert grace_end > (time.time() + bridge.config.webhooks.rotation_grace - 60) * 1000
    for n, key in enumerate((secret, new)):
        status, _ = await hooks.post("deploy", {"text": f"grace {n}"}, key=key_of(key))
        assert status == 202
    status, _ = await hooks.post("deploy", {"text": "refused key"}, key=b"k" * 32)
    assert status == 401
    await alice.wait_for_event(room_id, text_is("grace 1"))
    status, listed = await api.call(
        "GET", "/webhooks", user_id=alice.user_id, query={"room_id": room_id}
    )
    assert listed["webhooks"][0]["rotating_until"] == grace_end
    assert no_secret_in(json.dumps(listed), secret, new)

    status, body = await api.call("DELETE", "/webhooks/deploy", user_id=alice.user_id)
    assert status == 200, body
    assert body == {"removed": listed["webhooks"][0]}
    status, _ = await hooks.post("deploy", {"text": "refused revoked"}, key=key_of(new))
    assert status == 404
    status, body = await api.call("DELETE", "/webhooks/deploy", user_id=alice.user_id)
    assert (status, body["errcode"]) == (404, "M_NOT_FOUND")

    events = await alice.messages(room_id)
    assert "whsec_" not in json.dumps(events)
    assert not [e for e in events if "refused" in str(e.get("content", {}).get("body", ""))]
    log = bridge.log_text()  # the bridge logs at DEBUG
    assert f"{alice.user_id} made webhook deploy for {room_id}" in log
    assert "rotated the secret of webhook deploy" in log
    assert no_secret_in(log, secret, new, CONFIG_HOOK_SECRET)


async def test_webhook_refusals(provisioned: Provisioned) -> None:
    api, alice, room_id = provisioned.api, provisioned.alice, provisioned.room_id
    bob = provisioned.bob.user_id
    request = {"room_id": room_id, "name": "dup"}

    for method, path in [("GET", "/webhooks"), ("POST", "/webhooks/dup/rotate")]:
        status, body = await api.call(method, path, token="x" * 40)
        assert (status, body["errcode"]) == (401, "M_UNKNOWN_TOKEN")
    status, body = await api.call(
        "POST", "/webhooks", body=request, token=None, valid_request=False
    )
    assert (status, body["errcode"]) == (401, "M_MISSING_TOKEN")

    # Bob has power level 0 in Alice's room, and is no admin.
    status, body = await api.call("POST", "/webhooks", body=request, user_id=bob)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    assert body["error"] == "Managing webhooks needs the admin permission, or power level 50 here."
    status, body = await api.call("GET", "/webhooks", user_id=bob, query={"room_id": room_id})
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    status, body = await api.call("GET", "/webhooks", user_id=bob)
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")

    for name in ("Deploy", "no_underscore", "x" * 33, ""):
        status, body = await api.call("POST", "/webhooks", body={**request, "name": name})
        assert (status, body["errcode"]) == (400, "M_INVALID_PARAM"), name
        assert body["error"] == "A webhook's name is 1 to 32 of a-z, 0-9 and '-'."
    status, body = await api.call(
        "POST", "/webhooks", body={**request, "name": 7}, valid_request=False
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")
    status, body = await api.call(
        "POST", "/webhooks", body={**request, "secret": "whsec_x"}, valid_request=False
    )
    assert (status, body["errcode"]) == (400, "M_BAD_JSON")

    status, made = await api.call("POST", "/webhooks", body=request, user_id=alice.user_id)
    assert status == 201, made
    for name in ("dup", CONFIG_HOOK):
        status, body = await api.call("POST", "/webhooks", body={**request, "name": name})
        assert status == 409, body
        assert body["error"] == f"A webhook named {name} already exists; choose another name."

    # A hook of the config is changed in the config only.
    for method, path in [("DELETE", f"/webhooks/{CONFIG_HOOK}"), ("POST", "/webhooks/ci/rotate")]:
        status, body = await api.call(method, path)
        assert status == 409, body
        assert body["error"] == "Webhook ci is in the config file; change it there."
    # Unknown, or in a room Bob may not manage: the same 404.
    for user in (ADMIN, bob):
        for method, path in [("DELETE", "/webhooks/nope"), ("POST", "/webhooks/nope/rotate")]:
            status, body = await api.call(method, path, user_id=user)
            assert (status, body["errcode"]) == (404, "M_NOT_FOUND")
    for method, path in [("DELETE", "/webhooks/dup"), ("POST", "/webhooks/dup/rotate")]:
        status, body = await api.call(method, path, user_id=bob)
        assert (status, body) == (404, {"errcode": "M_NOT_FOUND", "error": "No such webhook"})

    # Nothing refused changed anything: dup is as made, and works with its first secret.
    status, listed = await api.call("GET", "/webhooks", query={"room_id": room_id})
    assert [(h["name"], "rotating_until" in h) for h in listed["webhooks"]] == [("dup", False)]
    hooks = HookSetup(provisioned.bridge, alice, room_id, room_id, "")
    status, _ = await hooks.post("dup", {"text": "still here"}, key=key_of(made["secret"]))
    assert status == 202
    await alice.wait_for_event(room_id, text_is("still here"))

    # A room the bot may not join (yet): the hook is made, its messages wait for the bot.
    closed = await alice.create_room(name="Sans le bot")
    status, waiting = await api.call("POST", "/webhooks", body={"room_id": closed, "name": "w"})
    assert status == 201, waiting
    assert "webhook w: the bot is not in" in provisioned.bridge.log_text()


async def test_webhook_secrets_never_logged(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every log record of the API's webhook actions, down to DEBUG, in this process."""
    caplog.set_level(logging.DEBUG)
    port = free_port()
    raw = bridge_config_dict(free_port(), port, db_url, provisioning={"shared_secret": SECRET})
    config = parse_config(raw, env={})
    bridge = Bridge(config)
    await bridge.start()
    room_id = "!logged:localhost"
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(f"http://127.0.0.1:{port}", session)
            # An admin needs no power level: this works with the homeserver down.
            status, made = await api.call(
                "POST", "/webhooks", body={"room_id": room_id, "name": "logged"}
            )
            assert status == 201, made
            status, rotated = await api.call("POST", "/webhooks/logged/rotate")
            assert status == 200, rotated
            status, listed = await api.call("GET", "/webhooks", query={"room_id": room_id})
            assert [hook["name"] for hook in listed["webhooks"]] == ["logged"]
            status, _ = await api.call("DELETE", "/webhooks/logged")
            assert status == 200
    finally:
        await bridge.stop()
    secrets = (made["secret"], rotated["secret"])
    logged = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.args!r}" for r in caplog.records
    )
    assert no_secret_in(logged + caplog.text, *secrets)
    actions = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("passerelle.") and r.levelno == logging.INFO
    ]
    for action in (
        f"{ADMIN} made webhook logged for {room_id}",
        f"{ADMIN} rotated the secret of webhook logged",
        f"provisioning: {ADMIN} listed the webhooks of {room_id}",
        f"{ADMIN} revoked webhook logged of {room_id}",
    ):
        assert action in actions, actions


# The API's database work is the inbound hooks' (tested on both kinds above): SQLite is enough.
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_outbound_webhook_made_listed_and_refused_targets(provisioned: Provisioned) -> None:
    api, alice, room_id = provisioned.api, provisioned.alice, provisioned.room_id
    request = {"room_id": room_id, "name": "tickets", "url": "http://127.0.0.2:9/in/x?token=abc"}
    status, made = await api.call("POST", "/webhooks", body=request, user_id=alice.user_id)
    assert status == 201, made
    assert made == {
        "name": "tickets",
        "room_id": room_id,
        "url": "http://127.0.0.2:9/in/x?…",  # the token is not shown again
        "direction": "outbound",
        "secret": made["secret"],
    }
    refusals = {
        "meta": ("http://169.254.169.254/latest/meta-data", "not under any URL prefix"),
        "lo": ("http://localhost:9/x", "which is loopback"),
        "user": ("http://a@127.0.0.2:9/in", "user name or password"),
        "up": ("http://127.0.0.2:9/in/%2e%2e/admin", "not allowed"),
    }
    for name, (url, reason) in refusals.items():
        body = {"room_id": room_id, "name": name, "url": url}
        status, answer = await api.call("POST", "/webhooks", body=body, user_id=alice.user_id)
        assert (status, answer["errcode"]) == (400, "M_INVALID_PARAM"), (url, answer)
        assert answer["error"].startswith("That URL is not allowed (webhooks.egress): ")
        assert reason in answer["error"], answer
    status, answer = await api.call(
        "POST", "/webhooks", body={**request, "url": 7}, valid_request=False
    )
    assert (status, answer["errcode"]) == (400, "M_BAD_JSON")

    status, listed = await api.call("GET", "/webhooks", query={"room_id": room_id})
    assert [(h["name"], h["direction"], h["url"]) for h in listed["webhooks"]] == [
        ("tickets", "outbound", "http://127.0.0.2:9/in/x?…")
    ]
    question = await alice.send_text(room_id, "!passerelle webhook list")
    answer = await alice.wait_for_event(room_id, replies_to(question, provisioned.bot))
    assert (
        "• tickets — receives this room's messages at http://127.0.0.2:9/in/x?… — made by"
        in answer["content"]["body"]
    )
    assert "token" not in json.dumps([listed, answer])
    status, body = await api.call("DELETE", "/webhooks/tickets", user_id=alice.user_id)
    assert (status, body["removed"]["direction"]) == (200, "outbound")
    # The receiver's token is not written to the log (it logs at DEBUG).
    assert "token=abc" not in provisioned.bridge.log_text()
