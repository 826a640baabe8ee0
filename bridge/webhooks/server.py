"""POST /webhooks/v1/{name}: a hook's request verified, kept durably, then answered 202."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from bridge.core.hooks_in import BadHookBody, parse_hook_body
from bridge.webhooks.signature import SignatureError, verify

log = logging.getLogger("passerelle.webhooks")

PATH = "/webhooks/v1/{name}"
_READ_CHUNK = 16 * 1024


# A hook's name → the keys a request may be signed with now (two during a rotation), or None.
Keys = Callable[[str], list[bytes] | None]
# (hook name, webhook-id, body as verified) → False if that webhook-id was already kept.
Store = Callable[[str, str, str], Awaitable[bool]]


def error(status: int, errcode: str, text: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": text}, status=status)


class WebhookServer:
    """Verifies requests of known hooks; only a verified, well-formed request is kept."""

    def __init__(
        self,
        keys: Keys,
        store: Store,
        *,
        max_body_size: int,
        tolerance: float,
        on_stored: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._store = store
        self._max_body_size = max_body_size
        self._tolerance = tolerance
        self._on_stored = on_stored
        self._clock = clock

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(PATH, self.post_hook)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The body, or None when it is over the limit (never read past it)."""
        length = request.content_length
        if length is not None and length > self._max_body_size:
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(min(_READ_CHUNK, self._max_body_size + 1 - size))
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self._max_body_size:
                return None
            chunks.append(chunk)

    async def post_hook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        keys = self._keys(name)
        if keys is None:
            return error(404, "M_NOT_FOUND", "no such webhook")
        body = await self._read_body(request)
        if body is None:
            return error(
                413, "M_TOO_LARGE", f"the body is larger than {self._max_body_size} bytes"
            )
        webhook_id = request.headers.get("webhook-id")
        refusal = None
        for key in keys:
            try:
                verify(
                    key,
                    webhook_id=webhook_id,
                    timestamp=request.headers.get("webhook-timestamp"),
                    signature=request.headers.get("webhook-signature"),
                    body=body,
                    now=self._clock(),
                    tolerance=self._tolerance,
                )
            except SignatureError as e:
                refusal = e
            else:
                refusal = None
                break
        if refusal is not None:
            log.info("webhook %s: refused a request: %s", name, refusal)
            return error(401, "M_UNAUTHORIZED", str(refusal))
        assert webhook_id is not None  # verify requires it
        if request.content_type != "application/json":
            return error(400, "M_NOT_JSON", "the content type must be application/json")
        try:
            parse_hook_body(body)
        except BadHookBody as e:
            return error(400, "M_BAD_JSON", str(e))
        if not await self._store(name, webhook_id, body.decode("utf-8")):
            log.debug("webhook %s: %s already received", name, webhook_id)
            return web.json_response({"duplicate": True}, status=200)
        log.debug("webhook %s: kept %s", name, webhook_id)
        self._on_stored()
        return web.json_response({"accepted": True}, status=202)
