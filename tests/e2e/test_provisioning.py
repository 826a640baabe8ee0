"""The provisioning API of a running bridge, each exchange checked against its OpenAPI doc."""

from __future__ import annotations

import json
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

from bridge.harness.dovecot import DovecotServer
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.registration import atomic_write, dump_yaml
from bridge.web.provisioning import PREFIX, openapi_document
from tests.conftest import BridgeProcess, InProcessBridge, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from
from tests.e2e.test_mail_to_matrix import (
    MailSetup,
    body_contains,
    bridge_config_with_mailbox,
)
from tests.e2e.test_remote_relay import REMOTE, remote_config

SECRET = "provisioning-" + "s3cr3t" * 6
ADMIN = "@admin:localhost"


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
    status, listed = await api.call("GET", "/links", query={"room_id": room_id})
    assert status == 200
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
