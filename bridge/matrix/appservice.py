"""The Application Service API the homeserver calls: transactions, user and alias queries, ping."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler

from bridge.config import Config
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import EventID, RoomID, TxnID, UserID
from bridge.db import ghosts, inbox
from bridge.db.engine import Database
from bridge.db.inbox import IncomingEvent, Rejected

log = logging.getLogger("passerelle.matrix.appservice")

MAX_ID_LENGTH = 255
MAX_EVENT_DEPTH = 64
MAX_SAFE_INTEGER = 2**53 - 1  # canonical JSON's integer range
PREFIX = "/_matrix/app/v1"


def matrix_error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


_STATUS_ERRCODES = {
    400: "M_BAD_JSON",
    401: "M_UNAUTHORIZED",
    403: "M_FORBIDDEN",
    404: "M_UNRECOGNIZED",
    405: "M_UNRECOGNIZED",
    413: "M_TOO_LARGE",
}


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as a Matrix JSON error; nothing leaks a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        errcode = _STATUS_ERRCODES.get(e.status, "M_UNKNOWN")
        reason = {404: "Unrecognized request", 405: "Method not allowed for this path"}.get(
            e.status, e.reason
        )
        response = matrix_error(e.status, errcode, reason)
        if e.status == 405 and "Allow" in e.headers:
            response.headers["Allow"] = e.headers["Allow"]
        return response
    except Exception:
        log.exception("unexpected failure handling %s %s", request.method, request.path)
        return matrix_error(500, "M_UNKNOWN", "Internal error")


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Access log without query strings: a legacy access_token must never reach a log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.debug(
            "%s %s -> %d (%.1f ms)", request.method, request.path, response.status, time * 1000
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return False


def _valid_id(value: Any, sigil: str, *, needs_server: bool = True) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(sigil)
        and 1 < len(value) <= MAX_ID_LENGTH
        and (":" in value or not needs_server)
        and value.isprintable()
    )


def validate_event(event: Any) -> IncomingEvent | Rejected:
    """Check the fields every room event must have; anything else is rejected with a reason."""
    if not isinstance(event, dict):
        return Rejected(event, "event is not a JSON object")
    problems = []
    if not _valid_id(event.get("event_id"), "$", needs_server=False):
        problems.append("event_id")
    if not _valid_id(event.get("room_id"), "!", needs_server=False):
        problems.append("room_id")
    if not _valid_id(event.get("sender"), "@"):
        problems.append("sender")
    event_type = event.get("type")
    if (
        not isinstance(event_type, str)
        or not 0 < len(event_type) <= MAX_ID_LENGTH
        or not event_type.isprintable()
    ):
        problems.append("type")
    if not isinstance(event.get("content"), dict):
        problems.append("content")
    ts = event.get("origin_server_ts")
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_SAFE_INTEGER:
        problems.append("origin_server_ts")
    if problems:
        return Rejected(event, f"missing or invalid {', '.join(problems)}")
    if _depth_exceeds(event, MAX_EVENT_DEPTH):
        return Rejected({"event_id": event["event_id"]}, "event nested too deeply")
    event_json = json.dumps(event, ensure_ascii=False)
    try:
        event_json.encode("utf-8")
    except UnicodeEncodeError:
        return Rejected(event, "event holds invalid Unicode (lone surrogates)")
    return IncomingEvent(
        event_id=EventID(event["event_id"]),
        room_id=RoomID(event["room_id"]),
        event_type=event["type"],
        sender=UserID(event["sender"]),
        origin_ts=int(event["origin_server_ts"]),
        event_json=event_json,
    )


def is_own_echo(config: Config, event: dict[str, Any]) -> bool:
    """A message the bridge itself sent (as its bot or a ghost) coming back: nothing to do.
    State events (memberships) are kept: the bot's own join still tells it about a room."""
    sender = event.get("sender")
    return (
        "state_key" not in event
        and isinstance(sender, str)
        and (sender == config.bot_mxid or config.is_ghost(sender))
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class AppserviceServer:
    """aiohttp routes of the Application Service API, authenticated with the hs_token."""

    def __init__(
        self,
        config: Config,
        db: Database,
        on_stored: Callable[[], None],
        ensure_bot: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.db = db
        self.on_stored = on_stored
        self.ensure_bot = ensure_bot
        self._hs_token = config.appservice.hs_token.encode("utf-8")
        self.pings_received: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_put(PREFIX + "/transactions/{txn_id}", self.put_transaction)
        app.router.add_get(PREFIX + "/users/{user_id}", self.get_user)
        app.router.add_get(PREFIX + "/rooms/{alias}", self.get_room_alias)
        app.router.add_post(PREFIX + "/ping", self.post_ping)
        for path in (
            "/thirdparty/protocol/{protocol}",
            "/thirdparty/location/{protocol}",
            "/thirdparty/user/{protocol}",
            "/thirdparty/location",
            "/thirdparty/user",
        ):
            app.router.add_get(PREFIX + path, self.get_thirdparty)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        query = request.query.get("access_token")
        header_token: str | None = None
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return matrix_error(403, "M_FORBIDDEN", "Malformed Authorization header")
            header_token = value.strip()
        if header_token is not None and query is not None and header_token != query:
            return matrix_error(
                403,
                "M_FORBIDDEN",
                "access_token parameter disagrees with the Authorization header",
            )
        token = header_token if header_token is not None else query
        if token is None:
            return matrix_error(401, "M_UNAUTHORIZED", "Missing hs_token")
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), self._hs_token):
            return matrix_error(403, "M_FORBIDDEN", "Invalid hs_token")
        return None

    async def _read_json(self, request: web.Request) -> Any:
        limit = self.config.appservice.max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        body = await request.read()
        try:
            return body, json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return body, _NOT_JSON

    async def put_transaction(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        txn_id = TxnID(request.match_info["txn_id"])
        if len(txn_id) > MAX_ID_LENGTH:
            return matrix_error(400, "M_INVALID_PARAM", "Transaction ID too long")
        body, data = await self._read_json(request)
        if data is _NOT_JSON:
            return matrix_error(400, "M_NOT_JSON", "Body is not valid JSON")
        if not isinstance(data, dict) or not isinstance(data.get("events"), list):
            return matrix_error(400, "M_BAD_JSON", "Body must be an object with an events list")
        valid: list[IncomingEvent] = []
        rejected: list[Rejected] = []
        seen: set[str] = set()
        echoes = 0
        for raw in data["events"]:
            checked = validate_event(raw)
            if isinstance(checked, Rejected):
                rejected.append(checked)
            elif is_own_echo(self.config, raw):
                echoes += 1
            elif checked.event_id not in seen:
                seen.add(checked.event_id)
                valid.append(checked)
        if not valid and not rejected:
            # Only our own echoes (or nothing): there is nothing to keep, not even the txnId.
            log.debug("transaction %r: %d own echoes, nothing to store", txn_id, echoes)
            return web.json_response({})
        digest = hashlib.sha256(body).hexdigest()
        outcome = await inbox.store_transaction(self.db, txn_id, digest, valid, rejected)
        if outcome.replay:
            log.debug("transaction %r replayed, already stored", txn_id)
        else:
            log.debug(
                "transaction %r: %d new, %d duplicate, %d rejected, %d own echoes",
                txn_id,
                outcome.stored,
                outcome.duplicates,
                outcome.rejected,
                echoes,
            )
            if outcome.rejected:
                log.warning(
                    "transaction %r carried %d malformed events; kept in dead letters",
                    txn_id,
                    outcome.rejected,
                )
            if outcome.stored:
                self.on_stored()
        return web.json_response({})

    async def get_user(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        user_id = UserID(request.match_info["user_id"])
        if user_id == self.config.bot_mxid:
            try:
                await self.ensure_bot()
            except (TransientError, PermanentError) as e:
                # The bot exists by definition; the monitor keeps trying to register it.
                log.warning("could not register the bot on the homeserver's query: %s", e)
            return web.json_response({})
        if self.config.is_ghost(user_id) and await ghosts.ghost_exists(self.db, user_id):
            return web.json_response({})
        return matrix_error(404, "M_NOT_FOUND", "No such user on this bridge")

    async def get_room_alias(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        return matrix_error(404, "M_NOT_FOUND", "This bridge creates no rooms from aliases")

    async def get_thirdparty(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        return matrix_error(404, "M_NOT_FOUND", "This bridge offers no third-party protocols")

    async def post_ping(self, request: web.Request) -> web.Response:
        if (denied := self._check_auth(request)) is not None:
            return denied
        body, data = await self._read_json(request)
        if not body.strip():
            data = {}
        if data is _NOT_JSON:
            return matrix_error(400, "M_NOT_JSON", "Body is not valid JSON")
        if not isinstance(data, dict):
            return matrix_error(400, "M_BAD_JSON", "Body must be a JSON object")
        txn = data.get("transaction_id")
        if txn is not None and not isinstance(txn, str):
            return matrix_error(400, "M_BAD_JSON", "transaction_id must be a string")
        if txn is not None:
            self.pings_received = [*self.pings_received[-9:], txn]
        return web.json_response({})


_NOT_JSON = object()
