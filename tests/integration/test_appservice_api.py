"""The Application Service API over real HTTP, on SQLite and PostgreSQL, homeserver absent."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from bridge.app import Bridge
from bridge.db.schema import dead_letter, inbox_event
from tests.conftest import InProcessBridge

TXN = "/_matrix/app/v1/transactions/"


def room_event(n: int, **overrides: Any) -> dict[str, Any]:
    event = {
        "event_id": f"$event{n}",
        "room_id": "!room:localhost",
        "sender": "@alice:localhost",
        "type": "m.room.message",
        "origin_server_ts": 1_700_000_000_000 + n,
        "content": {"msgtype": "m.text", "body": f"message {n}"},
    }
    event.update(overrides)
    return event


async def call(
    bridge: InProcessBridge,
    method: str,
    path: str,
    *,
    token: str | None = "default",
    body: bytes | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    all_headers = dict(headers or {})
    if token == "default":
        token = bridge.hs_token
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if json_body is not None:
        body = json.dumps(json_body).encode()
        all_headers["Content-Type"] = "application/json"
    data = io.BytesIO(body) if body is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, bridge.base_url + path, data=data, headers=all_headers) as resp,
    ):
        assert resp.content_type == "application/json", (resp.status, await resp.text())
        return resp.status, await resp.json()


async def count(bridge: Bridge, table: Any, *where: Any) -> int:
    async with bridge.db.begin() as conn:
        query = select(func.count()).select_from(table)
        for clause in where:
            query = query.where(clause)
        return int((await conn.execute(query)).scalar_one())


async def test_auth_missing_wrong_and_legacy(offline_bridge: InProcessBridge) -> None:
    path = TXN + "t1"
    body = {"events": []}
    assert await call(offline_bridge, "PUT", path, token=None, json_body=body) == (
        401,
        {"errcode": "M_UNAUTHORIZED", "error": "Missing hs_token"},
    )
    status, err = await call(offline_bridge, "PUT", path, token="x" * 43, json_body=body)
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
    # A token that is a prefix of the real one, or the as_token, is just as wrong.
    for wrong in (offline_bridge.hs_token[:-1], offline_bridge.config.appservice.as_token):
        status, err = await call(offline_bridge, "PUT", path, token=wrong, json_body=body)
        assert status == 403
    status, err = await call(offline_bridge, "PUT", path + "?access_token=other", json_body=body)
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")
    assert "disagrees" in err["error"]
    status, _ = await call(
        offline_bridge,
        "PUT",
        path + f"?access_token={offline_bridge.hs_token}",
        token=None,
        json_body=body,
    )
    assert status == 200
    status, err = await call(
        offline_bridge,
        "GET",
        "/_matrix/app/v1/users/@x:localhost",
        token=None,
        headers={"Authorization": "Basic abc"},
    )
    assert (status, err["errcode"]) == (403, "M_FORBIDDEN")


async def test_error_shapes(offline_bridge: InProcessBridge) -> None:
    status, err = await call(offline_bridge, "PUT", TXN + "t", body=b"{not json")
    assert (status, err["errcode"]) == (400, "M_NOT_JSON")
    status, err = await call(offline_bridge, "PUT", TXN + "t", body=b"\xff\xfe")
    assert (status, err["errcode"]) == (400, "M_NOT_JSON")
    status, err = await call(offline_bridge, "PUT", TXN + "t", body=b'{"events": NaN}')
    assert (status, err["errcode"]) == (400, "M_NOT_JSON")
    for bad in ({}, {"events": {}}, [], {"events": "x"}):
        status, err = await call(offline_bridge, "PUT", TXN + "t", json_body=bad)
        assert (status, err["errcode"]) == (400, "M_BAD_JSON"), bad
    # 100,000 levels of nesting: refused as not JSON, not a crash.
    status, err = await call(offline_bridge, "PUT", TXN + "t", body=b"[" * 100_000)
    assert (status, err["errcode"]) == (400, "M_NOT_JSON")
    status, err = await call(offline_bridge, "GET", "/_matrix/app/v1/nothing-here")
    assert (status, err["errcode"]) == (404, "M_UNRECOGNIZED")
    status, err = await call(offline_bridge, "GET", "/")
    assert (status, err["errcode"]) == (404, "M_UNRECOGNIZED")
    status, err = await call(offline_bridge, "POST", TXN + "t", json_body={"events": []})
    assert (status, err["errcode"]) == (405, "M_UNRECOGNIZED")
    status, err = await call(offline_bridge, "GET", "/_matrix/app/v1/rooms/%23a:localhost")
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND")
    status, err = await call(offline_bridge, "GET", "/_matrix/app/v1/users/@nobody:localhost")
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND")
    status, err = await call(offline_bridge, "GET", "/_matrix/app/v1/thirdparty/protocol/x")
    assert (status, err["errcode"]) == (404, "M_NOT_FOUND")


async def test_ping(offline_bridge: InProcessBridge) -> None:
    path = "/_matrix/app/v1/ping"
    assert await call(offline_bridge, "POST", path, json_body={"transaction_id": "p1"}) == (
        200,
        {},
    )
    assert await call(offline_bridge, "POST", path, body=b"") == (200, {})
    status, err = await call(offline_bridge, "POST", path, json_body={"transaction_id": 5})
    assert (status, err["errcode"]) == (400, "M_BAD_JSON")
    assert await call(offline_bridge, "POST", path, token=None, json_body={}) == (
        401,
        {"errcode": "M_UNAUTHORIZED", "error": "Missing hs_token"},
    )


async def test_body_above_the_limit_is_refused_with_413(offline_bridge: InProcessBridge) -> None:
    limit = offline_bridge.config.appservice.max_body_size
    big = json.dumps({"events": [room_event(1, content={"body": "x" * limit})]}).encode()
    status, err = await call(offline_bridge, "PUT", TXN + "big", body=big)
    assert (status, err["errcode"]) == (413, "M_TOO_LARGE")
    assert await count(offline_bridge.bridge, inbox_event) == 0

    # Without Content-Length (chunked), the limit holds all the same.
    async def chunks() -> Any:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    async with (
        aiohttp.ClientSession() as session,
        session.put(
            offline_bridge.base_url + TXN + "big2",
            data=chunks(),
            headers={"Authorization": f"Bearer {offline_bridge.hs_token}"},
        ) as resp,
    ):
        assert resp.status == 413
        assert (await resp.json())["errcode"] == "M_TOO_LARGE"


async def test_events_stored_once_and_malformed_ones_dead_lettered(
    offline_bridge: InProcessBridge,
) -> None:
    bridge = offline_bridge.bridge
    good = [room_event(1), room_event(2), room_event(2)]  # a duplicate inside one transaction
    bad = [
        "not an object",
        {"event_id": "$x"},
        room_event(3, sender="alice"),
        room_event(4, origin_server_ts="yesterday"),
        room_event(5, content=[]),
        room_event(6, room_id=None),
        room_event(7, event_id="$" + "a" * 300),
        room_event(8, type=""),
    ]
    body = {"events": good + bad}
    assert await call(offline_bridge, "PUT", TXN + "1", json_body=body) == (200, {})
    assert await count(bridge, inbox_event) == 2
    assert await count(bridge, dead_letter) == len(bad)

    # The same transaction again: nothing new, nothing dead-lettered twice.
    assert await call(offline_bridge, "PUT", TXN + "1", json_body=body) == (200, {})
    assert await count(bridge, inbox_event) == 2
    assert await count(bridge, dead_letter) == len(bad)

    # A homeserver whose txn counter restarted reuses "1" for new events: they are taken,
    # the old ones in it are not stored twice.
    renumbered = {"events": [room_event(2), room_event(9)]}
    assert await call(offline_bridge, "PUT", TXN + "1", json_body=renumbered) == (200, {})
    assert await count(bridge, inbox_event) == 3

    # Deep nesting inside one event: that event is dead-lettered, the rest stored.
    deep: Any = "x"
    for _ in range(200):
        deep = {"k": deep}
    mixed = {"events": [room_event(10, content={"deep": deep}), room_event(11)]}
    assert await call(offline_bridge, "PUT", TXN + "2", json_body=mixed) == (200, {})
    assert await count(bridge, inbox_event) == 4
    assert await count(bridge, dead_letter, dead_letter.c.reason.contains("deep")) == 1


async def test_replay_after_restart_is_not_stored_again(
    offline_bridge: InProcessBridge,
) -> None:
    body = {"events": [room_event(1), room_event(2)]}
    assert await call(offline_bridge, "PUT", TXN + "42", json_body=body) == (200, {})
    bridge = offline_bridge.bridge
    await bridge.stop()
    await bridge.start()
    assert await count(bridge, inbox_event) == 2
    assert await call(offline_bridge, "PUT", TXN + "42", json_body=body) == (200, {})
    # Same events under a new txnId (Synapse on SQLite restarts its counter): still once.
    assert await call(offline_bridge, "PUT", TXN + "1", json_body=body) == (200, {})
    assert await count(bridge, inbox_event) == 2


async def test_concurrent_transactions_with_overlapping_events(
    offline_bridge: InProcessBridge,
) -> None:
    bodies = [{"events": [room_event(i % 7) for i in range(n, n + 20)]} for n in range(10)]
    results = await asyncio.gather(
        *(call(offline_bridge, "PUT", TXN + f"c{n}", json_body=b) for n, b in enumerate(bodies))
    )
    assert all(r == (200, {}) for r in results)
    assert await count(offline_bridge.bridge, inbox_event) == 7


async def test_health_reports_an_unreachable_homeserver(offline_bridge: InProcessBridge) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(offline_bridge.base_url + "/health") as resp,
    ):
        report = await resp.json()
    assert resp.status == 200
    assert report["status"] == "degraded"
    assert report["database"]["ok"] is True
    assert report["homeserver"]["reachable"] is False
    assert report["version"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_port_in_use_is_a_clear_startup_error(offline_bridge: InProcessBridge) -> None:
    from bridge.app import StartupError

    second = Bridge(offline_bridge.config)
    with pytest.raises(StartupError, match=r"cannot listen on 127\.0\.0\.1"):
        await second.start()


async def test_the_bridges_own_messages_coming_back_are_not_stored(
    offline_bridge: InProcessBridge,
) -> None:
    config = offline_bridge.config
    ghost = config.ghost_mxid("agent=40gouv.fr")
    events = [
        room_event(1, sender=config.bot_mxid),
        room_event(2, sender=ghost),
        # State from our own users still matters (the bot's join tells it about a room).
        room_event(3, sender=ghost, type="m.room.member", state_key=ghost),
        room_event(4),
    ]
    assert await call(offline_bridge, "PUT", TXN + "echo", json_body={"events": events}) == (
        200,
        {},
    )
    async with offline_bridge.bridge.db.begin() as conn:
        stored = (await conn.execute(select(inbox_event.c.event_id))).scalars().all()
    assert sorted(stored) == ["$event3", "$event4"]
