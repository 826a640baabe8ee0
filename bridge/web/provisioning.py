"""The provisioning HTTP API (/_passerelle/provision/v1): links, webhooks and status for tools,
acting as a user."""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web
from ruamel.yaml import YAML

from bridge.config import Config, ConfigError, mail_address
from bridge.core.commands import CommandContext
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import RoomID, UserID
from bridge.core.links import REMOTE_KIND, Link, remote_link_key, split_remote_key
from bridge.core.permissions import PermissionLevel
from bridge.db import links as link_db
from bridge.relay.hook_admin import HookAdmin, HookInfo
from bridge.relay.link_commands import LinkCommands, LinkRefused
from bridge.status import StatusReporter

log = logging.getLogger("passerelle.web.provisioning")

PREFIX = "/_passerelle/provision/v1"
OPENAPI_DOCUMENT = Path(__file__).with_name("provisioning-openapi.yaml")

_MXID = re.compile(r"@[^\s:]+:[^\s]+")
_ROOM_ID = re.compile(r"![^\s]+")
MAX_ID_LENGTH = 255
_MAIL_FIELDS = {"room_id", "address", "allowed_senders", "thread_mode", "marking"}
_REMOTE_FIELDS = {"room_id", "remote", "remote_room"}
_HOOK_FIELDS = {"room_id", "name", "url"}
# A new secret is shown once: no cache may keep the answer that holds it.
_NO_STORE = {"Cache-Control": "no-store"}
_STATUS_OF = {"forbidden": 403, "invalid": 400, "conflict": 409, "remote": 502}
_ERRCODE_OF = {
    "forbidden": "M_FORBIDDEN",
    "invalid": "M_INVALID_PARAM",
    "conflict": "M_UNKNOWN",
    "remote": "M_UNKNOWN",
}

PowerLevel = Callable[[RoomID, UserID], Awaitable[int]]
Join = Callable[[RoomID], Awaitable[bool]]


class ApiError(Exception):
    def __init__(self, status: int, errcode: str, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.errcode = errcode
        self.error = error

    def response(self) -> web.Response:
        body = {"errcode": self.errcode, "error": self.error}
        return web.json_response(body, status=self.status)


@cache
def openapi_document() -> dict[str, Any]:
    """The hand-written OpenAPI document of this API, as plain JSON-able data."""
    data: dict[str, Any] = YAML(typ="safe").load(OPENAPI_DOCUMENT.read_text(encoding="utf-8"))
    return data


def link_json(link: Link) -> dict[str, Any]:
    """A link as the API shows it."""
    out: dict[str, Any] = {
        "id": link.id,
        "kind": link.kind,
        "room_id": link.room_id,
        "paused": link.paused,
        "source": link.source,
    }
    if link.kind == REMOTE_KIND:
        name, remote_room = split_remote_key(link.remote)
        out |= {"remote": name, "remote_room": remote_room}
    else:
        out |= {"address": link.remote, "settings": link.settings.as_json()}
    return out


def hook_json(hook: HookInfo) -> dict[str, Any]:
    """A webhook as the API shows it: never its secret."""
    out: dict[str, Any] = {
        "name": hook.name,
        "room_id": hook.room_id,
        "url": hook.url,
        "direction": hook.direction,
        "source": hook.source,
    }
    if hook.created_by is not None:
        out["created_by"] = hook.created_by
    if hook.created_at is not None:
        out["created_at"] = hook.created_at
    if hook.rotating_until is not None:
        out["rotating_until"] = hook.rotating_until
    return out


class ProvisioningApi:
    """aiohttp handlers; every request acts as `?user_id=` with that user's permission."""

    def __init__(
        self,
        config: Config,
        links: LinkCommands,
        status: StatusReporter,
        power_level: PowerLevel,
        join: Join,
        *,
        hooks: HookAdmin,
    ) -> None:
        self.config = config
        self.links = links
        self.hooks = hooks
        self.status = status
        self.power_level = power_level
        self.join = join
        secret = config.provisioning.shared_secret
        self._secret = None if secret is None else secret.encode("utf-8")

    def add_routes(self, app: web.Application) -> None:
        """Nothing when no secret is set: the whole prefix answers 404."""
        if self._secret is None:
            return
        app.router.add_get(PREFIX + "/openapi.json", self.get_openapi)
        app.router.add_get(PREFIX + "/status", self._wrap(self.get_status))
        app.router.add_get(PREFIX + "/links", self._wrap(self.get_links))
        app.router.add_post(PREFIX + "/links/mail", self._wrap(self.post_mail_link))
        app.router.add_delete(PREFIX + "/links/mail/{address}", self._wrap(self.delete_mail_link))
        app.router.add_post(PREFIX + "/links/remote", self._wrap(self.post_remote_link))
        app.router.add_delete(
            PREFIX + "/links/remote/{remote}/{remote_room}", self._wrap(self.delete_remote_link)
        )
        app.router.add_get(PREFIX + "/webhooks", self._wrap(self.get_webhooks))
        app.router.add_post(PREFIX + "/webhooks", self._wrap(self.post_webhook))
        app.router.add_delete(PREFIX + "/webhooks/{name}", self._wrap(self.delete_webhook))
        app.router.add_post(PREFIX + "/webhooks/{name}/rotate", self._wrap(self.rotate_webhook))

    def _wrap(
        self, handler: Callable[[web.Request, CommandContext], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            try:
                self._check_secret(request)
                return await handler(request, self._context(request))
            except ApiError as e:
                return e.response()
            except LinkRefused as e:
                return ApiError(_STATUS_OF[e.kind], _ERRCODE_OF[e.kind], e.message).response()
            except TransientError as e:
                log.warning("provisioning %s %s: %s", request.method, request.path, e)
                return ApiError(503, "M_UNKNOWN", "The homeserver is not reachable").response()

        return run

    def _check_secret(self, request: web.Request) -> None:
        assert self._secret is not None
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "M_MISSING_TOKEN", "Missing Authorization: Bearer header")
        token = value.strip().encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(token, self._secret):
            raise ApiError(401, "M_UNKNOWN_TOKEN", "Unknown provisioning secret")

    def _context(self, request: web.Request, room_id: RoomID | None = None) -> CommandContext:
        user_id = request.query.get("user_id")
        if user_id is None:
            raise ApiError(400, "M_MISSING_PARAM", "user_id is required")
        if len(user_id) > MAX_ID_LENGTH or not _MXID.fullmatch(user_id):
            raise ApiError(400, "M_INVALID_PARAM", "user_id must be a Matrix user ID")
        level = self.config.permissions.level_for(UserID(user_id))
        if level < PermissionLevel.USER:
            raise ApiError(403, "M_FORBIDDEN", "This user may not use the bridge")
        return self._in_room(
            CommandContext(
                sender=UserID(user_id),
                room_id=RoomID(""),
                level=level,
                is_direct=False,
                power_level=_no_room,
            ),
            room_id,
        )

    def _in_room(self, ctx: CommandContext, room_id: RoomID | None) -> CommandContext:
        """The context of ctx's user in room_id: power levels read through the bot."""
        if room_id is None:
            return ctx

        async def power_level() -> int:
            try:
                return await self.power_level(room_id, ctx.sender)
            except PermanentError as e:
                # The bot cannot read the room: nothing shows this user may manage it.
                log.info("cannot read power levels of %s: %s", room_id, e)
                return 0

        return CommandContext(
            sender=ctx.sender,
            room_id=room_id,
            level=ctx.level,
            is_direct=False,
            power_level=power_level,
        )

    async def get_openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def get_status(self, _request: web.Request, _ctx: CommandContext) -> web.Response:
        return web.json_response(await self.status.report())

    async def get_links(self, request: web.Request, ctx: CommandContext) -> web.Response:
        room = request.query.get("room_id")
        if room is None:
            if ctx.level < PermissionLevel.ADMIN:
                raise ApiError(403, "M_FORBIDDEN", "Listing every link needs the admin permission")
            found = await link_db.all_links(self.links.db)
        else:
            room_id = _room_id(room)
            await self.links.authorize(self._in_room(ctx, room_id), "Listing links")
            found = await link_db.links_in_room(self.links.db, room_id)
        return web.json_response({"links": [link_json(link) for link in found]})

    async def post_mail_link(self, request: web.Request, ctx: CommandContext) -> web.Response:
        body = await _json_object(request, _MAIL_FIELDS)
        room_id = _room_id(body.get("room_id"))
        address = body.get("address")
        if not isinstance(address, str):
            raise ApiError(400, "M_BAD_JSON", "address must be a string")
        senders = body.get("allowed_senders")
        if senders is not None and (
            not isinstance(senders, list) or not all(isinstance(s, str) for s in senders)
        ):
            raise ApiError(400, "M_BAD_JSON", "allowed_senders must be a list of strings")
        mode = body.get("thread_mode", "threads")
        marking = body.get("marking")
        if not isinstance(mode, str) or not (marking is None or isinstance(marking, str)):
            raise ApiError(400, "M_BAD_JSON", "thread_mode and marking must be strings")
        ctx = self._in_room(ctx, room_id)
        await self.links.authorize(ctx)
        # The bot joins first (it needs an invite); if it cannot, the link waits for one.
        joined = await self.join(room_id)
        link = await self.links.add_mail_link(ctx, address, senders, mode, marking, joined=joined)
        return web.json_response(link_json(link), status=201)

    async def delete_mail_link(self, request: web.Request, ctx: CommandContext) -> web.Response:
        try:
            address = mail_address("address", request.match_info["address"])
        except ConfigError:
            raise ApiError(400, "M_INVALID_PARAM", "Not a plain mail address") from None
        link = await link_db.link_by_remote(self.links.db, "mail", address)
        if link is None:
            raise ApiError(404, "M_NOT_FOUND", f"{address} is not linked")
        return await self._remove(self._in_room(ctx, link.room_id), link)

    async def post_remote_link(self, request: web.Request, ctx: CommandContext) -> web.Response:
        body = await _json_object(request, _REMOTE_FIELDS)
        room_id = _room_id(body.get("room_id"))
        remote, remote_room = body.get("remote"), body.get("remote_room")
        if not isinstance(remote, str) or not isinstance(remote_room, str):
            raise ApiError(400, "M_BAD_JSON", "remote and remote_room must be strings")
        ctx = self._in_room(ctx, room_id)
        await self.links.authorize(ctx)
        joined = await self.join(room_id)
        link = await self.links.add_remote_link(ctx, remote, remote_room, joined=joined)
        return web.json_response(link_json(link), status=201)

    async def delete_remote_link(self, request: web.Request, ctx: CommandContext) -> web.Response:
        remote = request.match_info["remote"].casefold()
        key = remote_link_key(remote, request.match_info["remote_room"])
        link = await link_db.link_by_remote(self.links.db, REMOTE_KIND, key)
        if link is None:
            raise ApiError(404, "M_NOT_FOUND", "No such remote link")
        return await self._remove(self._in_room(ctx, link.room_id), link)

    async def _remove(self, ctx: CommandContext, link: Link) -> web.Response:
        await self.links.authorize(ctx, "Unlinking")
        dropped = await self.links.remove_link(ctx, link)
        return web.json_response({"removed": link_json(link), "dropped_messages": dropped})

    async def get_webhooks(self, request: web.Request, ctx: CommandContext) -> web.Response:
        room = request.query.get("room_id")
        if room is None:
            if ctx.level < PermissionLevel.ADMIN:
                raise ApiError(
                    403, "M_FORBIDDEN", "Listing every webhook needs the admin permission"
                )
            found = self.hooks.hooks()
        else:
            room_id = _room_id(room)
            await self.links.authorize(self._in_room(ctx, room_id), "Listing webhooks")
            found = self.hooks.hooks(room_id)
        log.info("provisioning: %s listed the webhooks of %s", ctx.sender, room or "every room")
        return web.json_response({"webhooks": [hook_json(hook) for hook in found]})

    async def post_webhook(self, request: web.Request, ctx: CommandContext) -> web.Response:
        body = await _json_object(request, _HOOK_FIELDS)
        room_id = _room_id(body.get("room_id"))
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "M_BAD_JSON", "name must be a string")
        url = body.get("url")
        if url is not None and not isinstance(url, str):
            raise ApiError(400, "M_BAD_JSON", "url must be a string")
        # The bot joins once the request is found right; not let in yet, the hook's messages
        # wait for it, as for a hook of the config.
        made = await self.hooks.create(self._in_room(ctx, room_id), name, join=self.join, url=url)
        log.info("provisioning: %s made webhook %s in %s", ctx.sender, name, room_id)
        hook = made.hook
        answer = {
            "name": hook.name,
            "room_id": hook.room_id,
            "url": hook.url,
            "direction": hook.direction,
            "secret": made.secret,
        }
        return web.json_response(answer, status=201, headers=_NO_STORE)

    async def delete_webhook(self, request: web.Request, ctx: CommandContext) -> web.Response:
        hook = self._hook(request)
        try:
            removed = await self.hooks.revoke(self._in_room(ctx, hook.room_id), hook.name)
        except LinkRefused as e:
            raise _hidden(e) from None
        log.info("provisioning: %s revoked webhook %s", ctx.sender, hook.name)
        return web.json_response({"removed": hook_json(removed)})

    async def rotate_webhook(self, request: web.Request, ctx: CommandContext) -> web.Response:
        hook = self._hook(request)
        try:
            rotated = await self.hooks.rotate(self._in_room(ctx, hook.room_id), hook.name)
        except LinkRefused as e:
            raise _hidden(e) from None
        log.info("provisioning: %s rotated the secret of webhook %s", ctx.sender, hook.name)
        answer: dict[str, Any] = {
            "name": hook.name,
            "url": rotated.hook.url,
            "secret": rotated.secret,
            "previous_valid_until": rotated.previous_valid_until,
        }
        return web.json_response(answer, headers=_NO_STORE)

    def _hook(self, request: web.Request) -> HookInfo:
        hook = self.hooks.find(request.match_info["name"])
        if hook is None:
            raise ApiError(404, "M_NOT_FOUND", "No such webhook")
        return hook


def _hidden(refused: LinkRefused) -> Exception:
    """A hook of a room the user may not manage is answered as if it did not exist."""
    if refused.kind in ("forbidden", "invalid"):
        return ApiError(404, "M_NOT_FOUND", "No such webhook")
    return refused


async def _no_room() -> int:
    return 0


def _room_id(value: Any) -> RoomID:
    if (
        not isinstance(value, str)
        or len(value) > MAX_ID_LENGTH
        or not value.isprintable()
        or not _ROOM_ID.fullmatch(value)
    ):
        raise ApiError(400, "M_INVALID_PARAM", "room_id must be a room ID (!…)")
    return RoomID(value)


async def _json_object(request: web.Request, fields: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(await request.read())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "M_NOT_JSON", "Body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "M_BAD_JSON", "Body must be a JSON object")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ApiError(400, "M_BAD_JSON", f"Unknown field(s): {', '.join(unknown)[:200]}")
    return data
