"""RemoteClient against a real external homeserver (the ministry's Synapse) and a hostile one."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from bridge.core.errors import PermanentError, TransientError
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient, SynapseServer
from bridge.remote.client import (
    RemoteAuthError,
    RemoteClient,
    RemoteProtocolError,
    RemoteRateLimited,
    RemoteRequestError,
)
from tests.conftest import MINISTRY_BRIDGE_LOCALPART, user_password

pytestmark = pytest.mark.timeout(60)


def _txn() -> str:
    return f"test-{uuid.uuid4().hex}"


def _text(body: str) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": body}


def room_filter(room_id: str) -> str:
    # No lazy_load_members: with it, Synapse 1.163's initial sync also lists the other joined
    # rooms (empty timeline, one member event in state), whatever room.rooms says.
    return json.dumps(
        {
            "room": {
                "rooms": [room_id],
                "timeline": {"limit": 20},
                "account_data": {"not_types": ["*"]},
                "ephemeral": {"not_types": ["*"]},
            },
            "presence": {"not_types": ["*"]},
            "account_data": {"not_types": ["*"]},
        }
    )


def timeline(sync: dict[str, Any], room_id: str) -> list[dict[str, Any]]:
    events = sync.get("rooms", {}).get("join", {}).get(room_id, {}).get("timeline", {})
    return list(events.get("events", []))


# --- account and rooms -----------------------------------------------------------------------


async def test_whoami(remote: RemoteClient, ministry_bridge_account: tuple[str, str]) -> None:
    assert (
        await remote.whoami()
        == ministry_bridge_account[0]
        == "@passerelle-agence:" + ("ministere.localhost")
    )


async def test_join_by_room_id_and_by_alias(
    remote: RemoteClient, person: MatrixTestClient
) -> None:
    me = await remote.whoami()
    by_id = await person.create_room(invite=[me])
    assert await remote.join(by_id) == by_id

    alias_local = f"invited-{uuid.uuid4().hex[:8]}"
    by_alias = await person.create_room(invite=[me], alias_localpart=alias_local)
    alias = f"#{alias_local}:ministere.localhost"
    assert await remote.resolve_alias(alias) == by_alias
    assert await remote.join(alias) == by_alias
    assert me in await remote.joined_members(by_alias)


async def test_join_public_room_without_invite(
    remote: RemoteClient, person: MatrixTestClient
) -> None:
    await person.set_displayname("Agent du ministère")
    alias_local = f"public-{uuid.uuid4().hex[:8]}"
    room_id = await person.create_room(public=True, alias_localpart=alias_local)
    assert await remote.join(f"#{alias_local}:ministere.localhost") == room_id
    members = await remote.joined_members(room_id)
    assert members[person.user_id] == {"display_name": "Agent du ministère", "avatar_url": None}
    assert await remote.whoami() in members

    await remote.leave(room_id)
    assert await remote.whoami() not in await person.joined_members(room_id)


async def test_join_invite_only_room_uninvited_is_forbidden(
    remote: RemoteClient, person: MatrixTestClient
) -> None:
    room_id = await person.create_room()
    with pytest.raises(RemoteRequestError) as caught:
        await remote.join(room_id)
    assert caught.value.errcode == "M_FORBIDDEN"
    assert caught.value.status == 403


async def test_unknown_alias_is_not_found(remote: RemoteClient) -> None:
    with pytest.raises(RemoteRequestError) as caught:
        await remote.resolve_alias(f"#nothing-{uuid.uuid4().hex}:ministere.localhost")
    assert caught.value.errcode == "M_NOT_FOUND"


# --- events ----------------------------------------------------------------------------------


async def test_send_twice_with_one_txn_id_is_one_event(
    remote: RemoteClient, person: MatrixTestClient, shared_room: str
) -> None:
    txn_id = _txn()
    first = await remote.send_event(shared_room, "m.room.message", _text("une fois"), txn_id)
    again = await remote.send_event(shared_room, "m.room.message", _text("une fois"), txn_id)
    assert first == again
    # The dedupe key includes the room: the same txn_id in another room is another event.
    other_room = await person.create_room(invite=[await remote.whoami()])
    await remote.join(other_room)
    elsewhere = await remote.send_event(other_room, "m.room.message", _text("une fois"), txn_id)
    assert elsewhere != first

    page = await remote.messages(shared_room, None, "b", 50, None)
    bodies = [ev.get("content", {}).get("body") for ev in page["chunk"]]
    assert bodies.count("une fois") == 1


async def test_txn_id_is_deduped_across_event_types_in_a_room(
    remote: RemoteClient, shared_room: str
) -> None:
    """Synapse also records (room, user, device, txn_id) -> event ID for a day: reusing a txn_id
    in the same room for another event type (or a redaction) silently returns the first event
    and sends nothing. The relay's transaction IDs must be unique per room, whatever the type."""
    txn_id = _txn()
    message = await remote.send_event(shared_room, "m.room.message", _text("un"), txn_id)
    reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": message, "key": "ok"}}
    assert await remote.send_event(shared_room, "m.reaction", reaction, txn_id) == message
    assert await remote.redact(shared_room, message, txn_id) == message
    page = await remote.messages(shared_room, None, "b", 50, None)
    assert [
        ev["type"] for ev in page["chunk"] if ev["type"] in ("m.reaction", "m.room.redaction")
    ] == []


async def test_txn_id_dedupe_is_per_login(
    remote: RemoteClient,
    ministry_synapse: SynapseServer,
    http_session: aiohttp.ClientSession,
    shared_room: str,
) -> None:
    """A new login is a new device, and with it a new dedupe scope: the bridge must keep its
    token (or record event IDs) to make retries safe across a re-login."""
    token = ministry_synapse.login(
        MINISTRY_BRIDGE_LOCALPART, user_password(MINISTRY_BRIDGE_LOCALPART)
    )
    other_login = RemoteClient(
        "ministry-2", ministry_synapse.base_url, token, http_session, request_timeout=10
    )
    txn_id = _txn()
    first = await remote.send_event(shared_room, "m.room.message", _text("deux"), txn_id)
    second = await other_login.send_event(shared_room, "m.room.message", _text("deux"), txn_id)
    assert first != second


async def test_redact(remote: RemoteClient, person: MatrixTestClient, shared_room: str) -> None:
    # An ordinary member may redact only its own events.
    theirs = await person.send_text(shared_room, "pas à nous")
    with pytest.raises(RemoteRequestError) as caught:
        await remote.redact(shared_room, theirs, _txn())
    assert caught.value.errcode == "M_FORBIDDEN"

    event_id = await remote.send_event(shared_room, "m.room.message", _text("à retirer"), _txn())
    txn_id = _txn()
    redaction = await remote.redact(shared_room, event_id, txn_id, reason="erreur")
    assert await remote.redact(shared_room, event_id, txn_id, reason="erreur") == redaction

    create = await remote.get_state(shared_room, "m.room.create")
    assert create is not None
    page = await remote.messages(shared_room, None, "b", 20, None)
    by_id = {ev["event_id"]: ev for ev in page["chunk"]}
    redacted, redacting = by_id[event_id], by_id[redaction]
    assert redacted["content"] == {}
    assert redacted["unsigned"]["redacted_because"]["event_id"] == redaction
    assert redacting["type"] == "m.room.redaction"
    assert redacting["content"]["reason"] == "erreur"
    # Room versions 11 and later carry `redacts` in the content; Synapse also copies it to the
    # top level for older clients.
    assert create["room_version"] == "12"
    assert redacting["content"]["redacts"] == event_id
    assert redacting["redacts"] == event_id


async def test_sync_one_room_then_only_new_events(
    remote: RemoteClient, person: MatrixTestClient, shared_room: str
) -> None:
    noise = await person.create_room(invite=[await remote.whoami()])
    await remote.join(noise)
    await person.send_text(noise, "ailleurs")
    before = await person.send_text(shared_room, "avant")

    first = await remote.sync(None, room_filter(shared_room), 0)
    assert isinstance(first["next_batch"], str)
    assert set(first["rooms"]["join"]) == {shared_room}
    assert before in [ev["event_id"] for ev in timeline(first, shared_room)]

    after = await person.send_text(shared_room, "après")
    txn_id = _txn()
    mine = await remote.send_event(shared_room, "m.room.message", _text("de nous"), txn_id)
    second = await remote.sync(first["next_batch"], room_filter(shared_room), 5000)
    events = timeline(second, shared_room)
    while mine not in [ev["event_id"] for ev in events]:  # the two may come in two syncs
        second = await remote.sync(second["next_batch"], room_filter(shared_room), 5000)
        events += timeline(second, shared_room)
    assert [ev["event_id"] for ev in events] == [after, mine]
    # Our own events come back in /sync; the sending login sees its transaction ID on them.
    ours = events[1]
    assert ours["sender"] == await remote.whoami()
    assert ours["unsigned"]["transaction_id"] == txn_id
    assert "transaction_id" not in events[0].get("unsigned", {})


async def test_state(remote: RemoteClient, person: MatrixTestClient, shared_room: str) -> None:
    assert await remote.get_state(shared_room, "m.room.name") == {"name": "liaison"}
    assert await remote.get_state(shared_room, "m.room.topic") is None
    assert await remote.get_state(shared_room, "org.example.absent", "key/with/slash") is None
    member = await remote.get_state(shared_room, "m.room.member", person.user_id)
    assert member is not None
    assert member["membership"] == "join"
    types = {ev.get("type") for ev in await remote.room_state(shared_room)}
    assert {"m.room.create", "m.room.member", "m.room.power_levels", "m.room.name"} <= types


async def test_profile(remote: RemoteClient, person: MatrixTestClient) -> None:
    await person.set_displayname("Mme Dupont")
    assert await remote.get_profile(person.user_id) == {"displayname": "Mme Dupont"}
    assert await remote.get_profile("@nobody-here:ministere.localhost") == {}


# --- media -----------------------------------------------------------------------------------


async def test_upload_download_round_trip(remote: RemoteClient, person: MatrixTestClient) -> None:
    data = bytes(range(256)) * 40
    mxc = await remote.upload(data, "application/pdf", "rapport annuel.pdf")
    assert mxc.startswith("mxc://ministere.localhost/")
    assert await remote.download(mxc, max_bytes=len(data)) == (data, "application/pdf")
    assert await remote.download(mxc, max_bytes=len(data) - 1) is None
    # Media of the ministry's people too, with the bridge account's token.
    theirs = await person.upload(b"bonjour", "text/plain", "note.txt")
    assert await remote.download(theirs, max_bytes=1000) == (b"bonjour", "text/plain")


async def test_download_of_missing_media_is_refused(remote: RemoteClient) -> None:
    with pytest.raises(RemoteRequestError) as caught:
        await remote.download("mxc://ministere.localhost/doesNotExist", max_bytes=1000)
    assert caught.value.status == 404


@pytest.mark.parametrize(
    "mxc",
    [
        "mxc://a/../b",
        "mxc://server/id?x",
        "mxc://server/id/more",
        "mxc://server/",
        "mxc:///id",
        "https://example.org/image.png",
        "mxc://server/id\n",
        "",
    ],
)
async def test_hostile_mxc_is_refused_without_a_request(
    http_session: aiohttp.ClientSession, mxc: str
) -> None:
    # Nothing listens there: a request would raise TransientError, not PermanentError.
    client = RemoteClient(
        "nowhere", f"http://127.0.0.1:{free_port()}", "tok", http_session, request_timeout=2
    )
    with pytest.raises(PermanentError):
        await client.download(mxc, max_bytes=1000)


# --- failures --------------------------------------------------------------------------------


async def test_revoked_token_is_an_auth_error(
    remote: RemoteClient, ministry_synapse: SynapseServer, http_session: aiohttp.ClientSession
) -> None:
    token = ministry_synapse.login(
        MINISTRY_BRIDGE_LOCALPART, user_password(MINISTRY_BRIDGE_LOCALPART)
    )
    second = MatrixTestClient(ministry_synapse.base_url, token, await remote.whoami())
    async with second:
        await second.logout()
    revoked = RemoteClient(
        "ministry", ministry_synapse.base_url, token, http_session, request_timeout=10
    )
    with pytest.raises(RemoteAuthError) as caught:
        await revoked.whoami()
    assert (caught.value.status, caught.value.errcode) == (401, "M_UNKNOWN_TOKEN")
    assert isinstance(caught.value, PermanentError)
    assert token not in str(caught.value)
    # The bridge's own login is untouched.
    assert await remote.whoami() == second.user_id


async def test_server_down_is_transient(http_session: aiohttp.ClientSession) -> None:
    client = RemoteClient(
        "down", f"http://127.0.0.1:{free_port()}", "tok", http_session, request_timeout=2
    )
    with pytest.raises(TransientError):
        await client.whoami()
    with pytest.raises(TransientError):
        await client.sync(None, "{}", 0)


# --- a hostile homeserver --------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def hostile(
    http_session: aiohttp.ClientSession,
) -> AsyncIterator[tuple[RemoteClient, dict[str, Handler], list[web.Request]]]:
    """A RemoteClient talking to an in-process server; tests put a handler per raw path, and
    a request to any other path fails the test."""
    handlers: dict[str, Handler] = {}
    seen: list[web.Request] = []
    unexpected: list[str] = []

    async def dispatch(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        handler = handlers.get(request.rel_url.raw_path)
        if handler is None:
            unexpected.append(f"{request.method} {request.rel_url.raw_path}")
            return web.Response(status=418)
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    client = RemoteClient(
        "hostile", f"http://127.0.0.1:{port}", "secret-token", http_session, request_timeout=2
    )
    try:
        yield client, handlers, seen
    finally:
        await runner.cleanup()
    assert not unexpected, f"requests the test did not expect: {unexpected}"


def _answer(status: int, body: bytes | str, **headers: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        raw = body.encode() if isinstance(body, str) else body
        return web.Response(status=status, body=raw, headers=headers)

    return handler


WHOAMI = "/_matrix/client/v3/account/whoami"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, "<html>portal</html>", RemoteProtocolError),
        (200, "[1, 2]", RemoteProtocolError),
        (200, '{"user_id": 42}', RemoteProtocolError),
        (200, '{"user_id": NaN}', RemoteProtocolError),
        (200, "[" * 100_000 + "]" * 100_000, RemoteProtocolError),
        (500, "oops", TransientError),
        (502, "<html>bad gateway</html>", TransientError),
        (401, "", RemoteAuthError),
        (403, '{"errcode": "M_UNKNOWN_TOKEN", "error": "gone"}', RemoteAuthError),
        (403, '{"errcode": "M_FORBIDDEN", "error": "no"}', RemoteRequestError),
        (400, "not json", RemoteRequestError),
        (302, "", PermanentError),
    ],
)
async def test_hostile_answers(
    hostile: tuple[RemoteClient, dict[str, Handler], list[web.Request]],
    status: int,
    body: str,
    expected: type[Exception],
) -> None:
    client, handlers, seen = hostile
    handlers[WHOAMI] = _answer(status, body, Location="http://127.0.0.1:1/elsewhere")
    with pytest.raises(expected) as caught:
        await client.whoami()
    assert "secret-token" not in str(caught.value)
    assert [r.headers["Authorization"] for r in seen] == ["Bearer secret-token"]


async def test_rate_limit_carries_retry_after(
    hostile: tuple[RemoteClient, dict[str, Handler], list[web.Request]],
) -> None:
    client, handlers, _ = hostile
    handlers[WHOAMI] = _answer(429, '{"errcode": "M_LIMIT_EXCEEDED", "retry_after_ms": 1500}')
    with pytest.raises(RemoteRateLimited) as caught:
        await client.whoami()
    assert caught.value.retry_after_ms == 1500

    handlers[WHOAMI] = _answer(429, "", **{"Retry-After": "7"})
    with pytest.raises(RemoteRateLimited) as caught:
        await client.whoami()
    assert caught.value.retry_after_ms == 7000

    handlers[WHOAMI] = _answer(429, '{"retry_after_ms": 99999999999}')
    with pytest.raises(RemoteRateLimited) as caught:
        await client.whoami()
    assert caught.value.retry_after_ms == 3_600_000


async def test_oversized_answer_is_refused(
    hostile: tuple[RemoteClient, dict[str, Handler], list[web.Request]],
) -> None:
    client, handlers, _ = hostile
    padding = "x" * (1024 * 1024)
    handlers[WHOAMI] = _answer(200, json.dumps({"user_id": "@a:b", "pad": padding}))
    with pytest.raises(RemoteProtocolError):
        await client.whoami()

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"user_id": "@a:b", "pad": "')
        for _ in range(20):
            await response.write(b"y" * 65536)
        return response

    handlers[WHOAMI] = chunked
    with pytest.raises(RemoteProtocolError):
        await client.whoami()


async def test_paths_are_quoted_and_sync_waits_for_its_long_poll(
    hostile: tuple[RemoteClient, dict[str, Handler], list[web.Request]],
) -> None:
    client, handlers, seen = hostile
    room, event = "!r/../x:srv", "$ev/ent+="
    path = "/_matrix/client/v3/rooms/%21r%2F..%2Fx%3Asrv/redact/%24ev%2Fent%2B%3D/t%201"
    handlers[path] = _answer(200, '{"event_id": "$redaction"}')
    assert await client.redact(room, event, "t 1") == "$redaction"
    assert (
        seen[-1].match_info["tail"] == "_matrix/client/v3/rooms/!r/../x:srv/redact/$ev/ent+=/t 1"
    )

    async def slow_sync(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.5)  # longer than request_timeout, shorter than it + timeout
        return web.json_response({"next_batch": "s2", "rooms": {}})

    handlers["/_matrix/client/v3/sync"] = slow_sync
    result = await client.sync("s1", '{"room": {}}', 1500)
    assert result["next_batch"] == "s2"
    assert dict(seen[-1].query) == {"filter": '{"room": {}}', "timeout": "1500", "since": "s1"}

    handlers["/_matrix/client/v3/sync"] = _answer(200, '{"rooms": {}}')
    with pytest.raises(RemoteProtocolError):
        await client.sync(None, "{}", 0)


async def test_join_passes_the_server_of_an_alias_or_room_id(
    hostile: tuple[RemoteClient, dict[str, Handler], list[web.Request]],
) -> None:
    client, handlers, seen = hostile
    for target in ("#a:ministere.example:8448", "!old:ministere.example", "!v12roomid"):
        path = f"/_matrix/client/v3/join/{quote(target, safe='')}"
        handlers[path] = _answer(200, '{"room_id": "!joined"}')
        assert await client.join(target) == "!joined"
    assert [dict(r.query) for r in seen] == [
        {"server_name": "ministere.example:8448", "via": "ministere.example:8448"},
        {"server_name": "ministere.example", "via": "ministere.example"},
        {},
    ]
