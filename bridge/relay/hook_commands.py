"""The `webhook` command: hooks made, listed, revoked and rotated in the room they post to."""

from __future__ import annotations

import base64
import logging
import secrets
from dataclasses import replace

from bridge.config import Config
from bridge.config.webhooks import HOOK_NAME
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import RoomID, UserID
from bridge.core.permissions import PermissionLevel
from bridge.db import kv, room_hooks, rooms
from bridge.db.engine import Database
from bridge.db.util import now_ms
from bridge.matrix.client import MatrixClient
from bridge.matrix.render import notice_content
from bridge.relay.link_commands import LinkCommands, LinkRefused
from bridge.webhooks.directory import HookDirectory
from bridge.webhooks.signature import SECRET_PREFIX

log = logging.getLogger("passerelle.webhooks.commands")

USAGE = "Usage: webhook new NAME | webhook list | webhook revoke NAME | webhook rotate NAME"
_DM_KEY = "webhook-dm:"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class DirectChatFailed(Exception):
    """The person could not be reached in a direct chat (the text is for the room)."""


class WebhookCommands:
    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        directory: HookDirectory,
        links: LinkCommands,
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.directory = directory
        self.links = links

    def register(self, processor: CommandProcessor) -> None:
        processor.add(
            CommandSpec(
                "webhook",
                "webhooks posting in this room: make one (its URL and secret come to you in "
                "a direct chat), list them, revoke one, or give one a new secret",
                PermissionLevel.USER,
                usage="new NAME | list | revoke NAME | rotate NAME",
            ),
            self.webhook,
        )

    def url(self, name: str) -> str:
        return f"{self.config.appservice.address.rstrip('/')}/webhooks/v1/{name}"

    async def webhook(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        action = args[0].casefold() if args else ""
        if action == "list" and len(args) == 1:
            return self._list(ctx)
        if action not in ("new", "revoke", "rotate") or len(args) != 2:
            return Reply.plain(USAGE)
        name = args[1].casefold()
        try:
            await self.links.authorize(ctx, "Managing webhooks")
            if action == "new":
                return await self._new(ctx, name)
            if action == "revoke":
                return await self._revoke(ctx, name)
            return await self._rotate(ctx, name)
        except LinkRefused as e:
            return Reply.plain(e.message)
        except DirectChatFailed as e:
            return Reply.plain(str(e))

    def _list(self, ctx: CommandContext) -> Reply:
        lines = [
            f"• {hook.name} — made by {hook.created_by}"
            for hook in self.directory.room_hooks.values()
            if hook.room_id == ctx.room_id
        ] + [
            f"• {hook.name} — from the config file"
            for hook in self.directory.configured.values()
            if hook.room_id == ctx.room_id
        ]
        if not lines:
            return Reply.plain("No webhook posts in this room.")
        return Reply.plain("Webhooks posting in this room:\n" + "\n".join(sorted(lines)))

    def _own(self, ctx: CommandContext, name: str) -> room_hooks.RoomHook:
        """The room hook `name` of this room, else LinkRefused."""
        if name in self.directory.configured:
            raise LinkRefused(
                "conflict", f"Webhook {name} is in the config file; change it there.", bare=True
            )
        hook = self.directory.room_hooks.get(name)
        if hook is None or hook.room_id != ctx.room_id:
            raise LinkRefused("invalid", f"No webhook {name} posts in this room.", bare=True)
        return hook

    async def _new(self, ctx: CommandContext, name: str) -> Reply:
        if not HOOK_NAME.fullmatch(name):
            return Reply.plain("A webhook's name is 1 to 32 of a-z, 0-9 and '-'.")
        if name in self.directory.hooks:
            return Reply.plain(f"A webhook named {name} already exists; choose another name.")
        secret = new_secret()
        hook = await room_hooks.create(self.db, name, ctx.room_id, secret, ctx.sender)
        if hook is None:
            return Reply.plain(f"A webhook named {name} already exists; choose another name.")
        try:
            await self._send_secret(ctx.sender, name, secret, "made")
        except DirectChatFailed:
            # A hook whose secret nobody has is useless: it is not kept.
            await room_hooks.remove(self.db, name)
            raise
        self.directory.put(hook)
        log.info("%s made webhook %s for %s", ctx.sender, name, ctx.room_id)
        return Reply.plain(
            f"Webhook {name} created; its URL and secret were sent to you in a direct chat."
        )

    async def _revoke(self, ctx: CommandContext, name: str) -> Reply:
        self._own(ctx, name)
        await room_hooks.remove(self.db, name)
        self.directory.drop(name)
        log.info("%s revoked webhook %s of %s", ctx.sender, name, ctx.room_id)
        return Reply.plain(f"Webhook {name} revoked: its URL no longer accepts requests.")

    async def _rotate(self, ctx: CommandContext, name: str) -> Reply:
        hook = self._own(ctx, name)
        secret = new_secret()
        grace = self.config.webhooks.rotation_grace
        expires_at = now_ms() + grace * 1000
        await room_hooks.rotate(self.db, name, secret, hook.secret, expires_at)
        self.directory.put(
            replace(
                hook, secret=secret, previous_secret=hook.secret, previous_expires_at=expires_at
            )
        )
        log.info("%s rotated the secret of webhook %s", ctx.sender, name)
        try:
            await self._send_secret(ctx.sender, name, secret, "given a new secret")
        except DirectChatFailed as e:
            return Reply.plain(f"{e} The old secret stays valid for {grace} seconds.")
        return Reply.plain(
            f"Webhook {name} has a new secret, sent to you in a direct chat; the old one stays "
            f"valid for {grace} seconds."
        )

    async def _send_secret(self, user: UserID, name: str, secret: str, what: str) -> None:
        text = (
            f"Webhook {name} was {what}.\nURL: {self.url(name)}\nSecret: {secret}\n"
            "Keep the secret in the sending system only; it signs the requests "
            "(Standard Webhooks)."
        )
        try:
            room_id = await self._direct_room(user)
            await self.client.send_event(
                room_id,
                "m.room.message",
                notice_content(text),
                f"pas.whsec.{secrets.token_hex(16)}",
                sensitive=True,
            )
        except (PermanentError, TransientError) as e:
            log.warning("could not reach %s in a direct chat: %s", user, e)
            raise DirectChatFailed(
                "I could not reach you in a direct chat, so nothing was sent; try again."
            ) from None

    async def _direct_room(self, user: UserID) -> RoomID:
        """The bot's direct chat with `user` for secrets: the last one, or a new one."""
        known = await kv.get_value(self.db, _DM_KEY + user)
        if known is not None:
            room = await rooms.get_room(self.db, RoomID(known))
            if room is not None and room.bot_membership == "join" and room.member_count == 2:
                return room.room_id
        room_id = await self.client.create_direct_room(user)
        await rooms.save_room(
            self.db,
            room_id,
            bot_membership="join",
            is_direct=True,
            encrypted=False,
            invited_by=None,
            member_count=2,
        )
        await kv.set_value(self.db, _DM_KEY + user, room_id)
        try:
            await self.client.add_direct_chat(user, room_id)
        except (PermanentError, TransientError) as e:
            # Clients then show it as a plain room: not worth failing the command for.
            log.info("could not record %s in the bot's m.direct: %s", room_id, e)
        log.info("opened a direct chat %s with %s", room_id, user)
        return room_id
