"""Making, listing, revoking and rotating webhooks: the checks and effects shared by the room's
`webhook` command and the provisioning API."""

from __future__ import annotations

import base64
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from yarl import URL

from bridge.config import Config
from bridge.config.webhooks import HOOK_NAME
from bridge.core.commands import CommandContext
from bridge.core.errors import TransientError
from bridge.core.ids import RoomID, UserID
from bridge.db import room_hooks, rooms
from bridge.db.engine import Database
from bridge.db.util import now_ms
from bridge.relay.hooks_out import drop_deliveries
from bridge.relay.link_commands import LinkCommands, LinkRefused
from bridge.webhooks.directory import HookDirectory
from bridge.webhooks.egress import EgressRefused
from bridge.webhooks.signature import SECRET_PREFIX

log = logging.getLogger("passerelle.webhooks.admin")

INBOUND = "inbound"  # requests from a legacy system post in a room
OUTBOUND = "outbound"  # a room's messages are POSTed to a legacy system's URL
ROOM_SOURCE = "room"  # made with `webhook new` or the provisioning API: kept in the database
CONFIG_SOURCE = "config"  # declared under webhooks.hooks: changed in the config only

# The bot joins a room (True), or may not yet (False: the hook's messages wait for it).
Join = Callable[[RoomID], Awaitable[bool]]
# The URL an outbound hook may POST to, normalised; EgressRefused, or TransientError when its
# host does not resolve now.
CheckTarget = Callable[[str], Awaitable[str]]


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


@dataclass(frozen=True)
class HookInfo:
    """A hook as people and tools may see it: never its secret."""

    name: str
    room_id: RoomID
    url: str  # inbound: the URL to call; outbound: where it POSTs, without its query
    source: str  # ROOM_SOURCE or CONFIG_SOURCE
    direction: str = INBOUND
    created_by: UserID | None = None
    created_at: int | None = None  # ms since the epoch
    rotating_until: int | None = None  # ms: the previous secret is accepted until then


@dataclass(frozen=True)
class HookSecret:
    """A hook with its new secret, to be handed to the person who asked, once."""

    hook: HookInfo
    secret: str = field(repr=False)
    previous_valid_until: int | None = None  # ms, after a rotation


# Hand a new secret to its requester before the hook is live; raising undoes the hook.
Deliver = Callable[[HookSecret], Awaitable[None]]


class HookAdmin:
    """Webhooks of rooms, acting as a person: `links.authorize` decides who may manage them.
    Refusals are LinkRefused: "forbidden", "invalid" (the name, or no such hook in the room)
    or "conflict" (the name is taken, or the hook is in the config file)."""

    def __init__(
        self,
        config: Config,
        db: Database,
        directory: HookDirectory,
        links: LinkCommands,
        *,
        check_target: CheckTarget | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.directory = directory
        self.links = links
        self.check_target = check_target

    def url(self, name: str) -> str:
        return f"{self.config.appservice.address.rstrip('/')}/webhooks/v1/{name}"

    async def authorize(self, ctx: CommandContext) -> None:
        await self.links.authorize(ctx, "Managing webhooks")

    def find(self, name: str) -> HookInfo | None:
        if name in self.directory.configured or name in self.directory.configured_out:
            return self._configured(name)
        hook = self.directory.room_hooks.get(name)
        return None if hook is None else self._info(hook)

    def hooks(self, room_id: RoomID | None = None) -> list[HookInfo]:
        """Every hook of both directions (of room_id only, when given), by name."""
        configured = [*self.directory.configured, *self.directory.configured_out]
        found = [self._configured(name) for name in configured] + [
            self._info(hook)
            for name, hook in self.directory.room_hooks.items()
            if name not in configured
        ]
        return sorted(
            (hook for hook in found if room_id is None or hook.room_id == room_id),
            key=lambda hook: hook.name,
        )

    def check_name(self, name: str) -> None:
        """Refuse a name a new hook may not have."""
        if not HOOK_NAME.fullmatch(name):
            raise LinkRefused(
                "invalid", "A webhook's name is 1 to 32 of a-z, 0-9 and '-'.", bare=True
            )
        if self.directory.taken(name):
            raise LinkRefused("conflict", _taken(name), bare=True)

    async def create(
        self,
        ctx: CommandContext,
        name: str,
        *,
        join: Join | None = None,
        deliver: Deliver | None = None,
        url: str | None = None,
    ) -> HookSecret:
        """Make hook `name` post in ctx.room_id, or with `url`, send ctx.room_id's messages
        there. `join`: the bot joins the room first (a refusal does not stop the hook: its
        messages wait for the bot). `deliver`: gives the secret to its requester; if it
        raises, the hook is not kept."""
        await self.authorize(ctx)
        self.check_name(name)
        if url is not None:
            url = await self._outbound_target(ctx.room_id, url)
        if join is not None and not await join(ctx.room_id):
            log.info("webhook %s: the bot is not in %s yet", name, ctx.room_id)
        secret = new_secret()
        hook = await room_hooks.create(self.db, name, ctx.room_id, secret, ctx.sender, url=url)
        if hook is None:
            raise LinkRefused("conflict", _taken(name), bare=True)
        made = HookSecret(self._info(hook), secret)
        if deliver is not None:
            try:
                await deliver(made)
            except Exception:
                # A hook whose secret nobody has is useless: it is not kept.
                await room_hooks.remove(self.db, name)
                raise
        self.directory.put(hook)
        log.info("%s made webhook %s for %s", ctx.sender, name, ctx.room_id)
        return made

    async def revoke(self, ctx: CommandContext, name: str) -> HookInfo:
        """Remove hook `name` of ctx.room_id: an inbound hook's URL answers 404 from now on,
        an outbound hook's waiting deliveries are dropped (a hook made again with this name
        starts empty)."""
        await self.authorize(ctx)
        hook = self._own(ctx, name)
        await room_hooks.remove(self.db, name)
        self.directory.drop(name)
        if hook.outbound:
            await drop_deliveries(self.db, name, f"the webhook was revoked by {ctx.sender}")
        log.info("%s revoked webhook %s of %s", ctx.sender, name, ctx.room_id)
        return self._info(hook)

    async def rotate(self, ctx: CommandContext, name: str) -> HookSecret:
        """A new secret for hook `name` of ctx.room_id; the previous one stays valid for
        webhooks.rotation_grace seconds."""
        await self.authorize(ctx)
        hook = self._own(ctx, name)
        secret = new_secret()
        expires_at = now_ms() + self.config.webhooks.rotation_grace * 1000
        await room_hooks.rotate(self.db, name, secret, hook.secret, expires_at)
        rotated = replace(
            hook, secret=secret, previous_secret=hook.secret, previous_expires_at=expires_at
        )
        self.directory.put(rotated)
        log.info("%s rotated the secret of webhook %s", ctx.sender, name)
        return HookSecret(self._info(rotated), secret, expires_at)

    async def _outbound_target(self, room_id: RoomID, url: str) -> str:
        """The URL, normalised, if an outbound hook of this room may POST there."""
        if self.check_target is None:
            raise LinkRefused("invalid", "Outbound webhooks are not available here.", bare=True)
        try:
            target = await self.check_target(url)
        except EgressRefused as e:
            raise LinkRefused(
                "invalid", f"That URL is not allowed (webhooks.egress): {e}", bare=True
            ) from None
        except TransientError as e:
            raise LinkRefused("invalid", f"That URL cannot be used now: {e}", bare=True) from None
        room = await rooms.get_room(self.db, room_id)
        if room is not None and room.encrypted:
            raise LinkRefused(
                "invalid",
                "This room is encrypted: Passerelle cannot read its messages, so an outbound "
                "webhook would receive nothing.",
                bare=True,
            )
        return target

    def _own(self, ctx: CommandContext, name: str) -> room_hooks.RoomHook:
        """The room hook `name` of ctx.room_id, else LinkRefused."""
        if name in self.directory.configured or name in self.directory.configured_out:
            raise LinkRefused(
                "conflict", f"Webhook {name} is in the config file; change it there.", bare=True
            )
        hook = self.directory.room_hooks.get(name)
        if hook is None or hook.room_id != ctx.room_id:
            raise LinkRefused("invalid", f"No webhook {name} in this room.", bare=True)
        return hook

    def _configured(self, name: str) -> HookInfo:
        outbound = self.directory.configured_out.get(name)
        if outbound is not None:
            return HookInfo(
                name, RoomID(outbound.room_id), shown_url(outbound.url), CONFIG_SOURCE, OUTBOUND
            )
        settings = self.directory.configured[name]
        return HookInfo(name, RoomID(settings.room_id), self.url(name), CONFIG_SOURCE)

    def _info(self, hook: room_hooks.RoomHook) -> HookInfo:
        rotating = hook.previous_expires_at
        if hook.previous_secret is None or rotating is None or rotating <= now_ms():
            rotating = None
        return HookInfo(
            hook.name,
            RoomID(hook.room_id),
            self.url(hook.name) if hook.url is None else shown_url(hook.url),
            ROOM_SOURCE,
            INBOUND if hook.url is None else OUTBOUND,
            created_by=UserID(hook.created_by),
            created_at=hook.created_at,
            rotating_until=rotating,
        )


def shown_url(url: str) -> str:
    """An outbound hook's URL as people and tools may see it: its query (which may hold a
    token for the receiver) replaced by "?…"."""
    target = URL(url)
    shown = str(target.with_query(None).with_fragment(None).with_user(None))
    return shown + "?…" if target.raw_query_string else shown


def _taken(name: str) -> str:
    return f"A webhook named {name} already exists; choose another name."
