"""The webhook endpoint in process: what is refused never reaches the store, bodies over the
limit are not read, answers are JSON."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.webhooks.server import WebhookServer
from bridge.webhooks.signature import sign

KEY = b"s" * 32
NOW = 1_800_000_000


class Store:
    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], str] = {}
        self.notified = 0

    async def __call__(self, hook: str, webhook_id: str, body: str) -> bool:
        if (hook, webhook_id) in self.kept:
            return False
        self.kept[hook, webhook_id] = body
        return True


@pytest.fixture
async def served() -> AsyncIterator[tuple[TestClient[Any, Any], Store]]:
    store = Store()

    def stored() -> None:
        store.notified += 1

    server = WebhookServer(
        {"ci": [KEY], "rotated": [b"n" * 32, KEY]}.get,
        store,
        max_body_size=1024,
        tolerance=300,
        on_stored=stored,
        clock=lambda: NOW,
    )
    app = web.Application()
    server.add_routes(app)
    async with TestClient(TestServer(app)) as client:
        yield client, store


def headers(body: bytes, webhook_id: str = "msg_1", ts: int = NOW) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(KEY, webhook_id, ts, body),
    }


async def test_accepted_then_duplicate(served: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = served
    body = json.dumps({"text": "hello"}).encode()
    response = await client.post("/webhooks/v1/ci", data=body, headers=headers(body))
    assert (response.status, await response.json()) == (202, {"accepted": True})
    response = await client.post("/webhooks/v1/ci", data=body, headers=headers(body))
    assert (response.status, await response.json()) == (200, {"duplicate": True})
    assert store.kept == {("ci", "msg_1"): '{"text": "hello"}'}
    assert store.notified == 1


async def test_chunked_body_over_the_limit(served: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = served

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):  # no Content-Length: the limit is found while reading
            yield b"x" * 512

    response = await client.post("/webhooks/v1/ci", data=chunks(), headers=headers(b""))
    assert response.status == 413
    assert (await response.json())["errcode"] == "M_TOO_LARGE"
    assert not store.kept


@pytest.mark.parametrize(
    ("change", "status"),
    [
        (lambda h: h.pop("webhook-signature"), 401),
        (lambda h: h.update({"webhook-timestamp": str(NOW - 301)}), 401),
        (lambda h: h.update({"webhook-id": "msg_other"}), 401),
        (lambda h: h.update({"content-type": "text/plain"}), 400),
    ],
)
async def test_refused_never_stored(
    served: tuple[TestClient[Any, Any], Store],
    change: Callable[[dict[str, str]], Any],
    status: int,
) -> None:
    client, store = served
    body = json.dumps({"text": "hello"}).encode()
    sent = headers(body)
    change(sent)
    response = await client.post("/webhooks/v1/ci", data=body, headers=sent)
    assert response.status == status
    answer = await response.json()
    assert set(answer) == {"errcode", "error"}
    assert not store.kept
    assert store.notified == 0


async def test_unknown_hook(served: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = served
    body = b'{"text": "x"}'
    response = await client.post("/webhooks/v1/other", data=body, headers=headers(body))
    assert response.status == 404
    assert not store.kept


async def test_any_current_key_verifies(served: tuple[TestClient[Any, Any], Store]) -> None:
    """During a rotation the hook has two keys: a request signed with either is kept."""
    client, store = served
    body = json.dumps({"text": "old key still valid"}).encode()
    response = await client.post("/webhooks/v1/rotated", data=body, headers=headers(body))
    assert response.status == 202
    assert ("rotated", "msg_1") in store.kept
