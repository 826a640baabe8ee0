"""A hostile ministry user against the real ministry Synapse: what its /sync hands the bridge."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from bridge.core.remote_in import RemoteMessage, RemotePolicy, plan_remote_event
from bridge.harness.ports import free_port
from bridge.harness.synapse import MatrixTestClient
from bridge.remote.client import RemoteClient
from tests.integration.test_remote_client import room_filter, timeline

pytestmark = pytest.mark.timeout(90)


async def send_raw(
    session: aiohttp.ClientSession, person: MatrixTestClient, room_id: str, body: bytes
) -> tuple[int, str]:
    """PUT a message whose JSON is written by hand (json.dumps refuses to nest this deep)."""
    url = (
        f"{person.base_url}/_matrix/client/v3/rooms/{quote(room_id, safe='')}"
        f"/send/m.room.message/hostile-{uuid.uuid4().hex}"
    )
    headers = {"Authorization": f"Bearer {person.access_token}"}
    async with session.put(url, data=body, headers=headers) as resp:
        return resp.status, (await resp.text())[:300]


def nested(depth: int) -> bytes:
    return (
        b'{"msgtype": "m.text", "body": "deep '
        + str(depth).encode()
        + b'", "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}"
    )


async def test_deeply_nested_content_against_the_real_synapse(
    person: MatrixTestClient,
    remote: RemoteClient,
    shared_room: str,
    http_session: aiohttp.ClientSession,
) -> None:
    """Synapse (1.163) refuses 900 and 2000 levels itself; the deepest event it accepts still
    comes through the bridge's /sync and plan_remote_event."""
    assert (await send_raw(http_session, person, shared_room, nested(900)))[0] == 400
    assert (await send_raw(http_session, person, shared_room, nested(2000)))[0] == 400
    low, high = 1, 900  # accepted, refused
    while high - low > 1:
        middle = (low + high) // 2
        status, answer = await send_raw(http_session, person, shared_room, nested(middle))
        assert status in (200, 400), answer
        low, high = (middle, high) if status == 200 else (low, middle)
    status, _ = await send_raw(http_session, person, shared_room, nested(low))
    assert status == 200
    await person.send_text(shared_room, f"after {low} levels")
    sync = await remote.sync(None, room_filter(shared_room), 0)
    events = timeline(sync, shared_room)
    assert f"after {low} levels" in [e.get("content", {}).get("body") for e in events]
    policy = RemotePolicy("ministry", await remote.whoami(), frozenset({"ministere.localhost"}))
    deepest = [e for e in events if e.get("content", {}).get("body") == f"deep {low}"]
    assert deepest
    found = plan_remote_event(deepest[-1], policy)
    assert isinstance(found, RemoteMessage)
    assert found.content == {"msgtype": "m.text", "body": f"deep {low}"}
    print(f"deepest event content Synapse accepts: {low} levels of lists")


# --- a server that does not limit nesting (another implementation, an older Synapse) ----------


@pytest.fixture
async def deep_sync_server(
    request: pytest.FixtureRequest, http_session: aiohttp.ClientSession
) -> AsyncIterator[RemoteClient]:
    """A homeserver whose /sync carries one event nested `request.param` deep."""
    depth: int = request.param
    room_id = "!room:deep.example.org"
    event = (
        b'{"type": "m.room.message", "event_id": "$deep", "sender": "@eve:deep.example.org",'
        b' "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "deep", "x": '
        + b"[" * depth
        + b"]" * depth
        + b"}}"
    )
    body = (
        b'{"next_batch": "s2", "rooms": {"join": {"'
        + room_id.encode()
        + b'": {"timeline": {"events": ['
        + event
        + b"]}}}}}"
    )

    async def sync(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/_matrix/client/v3/sync", sync)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield RemoteClient(
            "deep", f"http://127.0.0.1:{port}", "token", http_session, request_timeout=5
        )
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("deep_sync_server", [900], indirect=True)
async def test_a_900_deep_event_comes_through(deep_sync_server: RemoteClient) -> None:
    sync = await deep_sync_server.sync("s1", "{}", 0)
    events = timeline(sync, "!room:deep.example.org")
    json.dumps(events)  # as the sync loop stores it
    policy = RemotePolicy("deep", "@bridge:deep.example.org", frozenset({"deep.example.org"}))
    found = plan_remote_event(events[0], policy)
    assert isinstance(found, RemoteMessage)
    assert found.content == {"msgtype": "m.text", "body": "deep"}


@pytest.mark.parametrize("deep_sync_server", [2000, 30_000], indirect=True)
async def test_a_very_deep_event_does_not_stall_sync(deep_sync_server: RemoteClient) -> None:
    """Regression: past Python's recursion limit the whole /sync answer was refused, and the
    loop asked for the same answer forever (one remote event stalled the link). The too-deep
    value is now null; the event and the answer around it come through."""
    sync = await deep_sync_server.sync("s1", "{}", 0)
    assert sync["next_batch"] == "s2"
    events = timeline(sync, "!room:deep.example.org")
    json.dumps(events)  # as the sync loop stores it
    policy = RemotePolicy("deep", "@bridge:deep.example.org", frozenset({"deep.example.org"}))
    found = plan_remote_event(events[0], policy)
    assert isinstance(found, RemoteMessage)
    assert found.content == {"msgtype": "m.text", "body": "deep"}


async def test_huge_hostile_message_comes_out_clean(
    person: MatrixTestClient, remote: RemoteClient, shared_room: str
) -> None:
    body = "x" * 60_000
    html = (
        "<script>alert(1)</script><img src=x onerror=alert(2)>"
        '<a href="javascript:alert(3)">click</a><b onmouseover="alert(4)">bold</b>'
    ) * 20  # with the 60,000 characters, just under Synapse's 64 KiB per event
    await person.send_text(
        shared_room, body, extra={"format": "org.matrix.custom.html", "formatted_body": html}
    )
    sync = await remote.sync(None, room_filter(shared_room), 0)
    events = [e for e in timeline(sync, shared_room) if e.get("type") == "m.room.message"]
    assert len(events) == 1
    policy = RemotePolicy("ministry", await remote.whoami(), frozenset({"ministere.localhost"}))
    found = plan_remote_event(events[0], policy)
    assert isinstance(found, RemoteMessage), found
    assert found.content["body"] == body
    safe = found.content["formatted_body"]
    assert "<script" not in safe.lower()
    assert "javascript:" not in safe.lower()
    assert "onerror" not in safe.lower()
    assert "onmouseover" not in safe.lower()
    assert "<b>bold</b>" in safe
