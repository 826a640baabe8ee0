"""The `webhook` command: hooks made, listed, revoked and rotated in the room they post to."""

from __future__ import annotations

import logging
import secrets

from bridge.config import Config
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.errors import PermanentError, TransientError
from bridge.core.ids import RoomID, UserID
from bridge.core.permissions import PermissionLevel
from bridge.db import kv, rooms
from bridge.db.engine import Database
from bridge.matrix.client import MatrixClient
from bridge.matrix.render import notice_content
from bridge.relay.hook_admin import CONFIG_SOURCE, OUTBOUND, HookAdmin, HookSecret
from bridge.relay.hook_admin import new_secret as new_secret
from bridge.relay.link_commands import LinkCommands, LinkRefused
from bridge.webhooks.directory import HookDirectory

log = logging.getLogger("passerelle.webhooks.commands")

USAGE = (
    "Usage: webhook new NAME | webhook out NAME URL | webhook list | webhook revoke NAME | "
    "webhook rotate NAME"
)
_DM_KEY = "webhook-dm:"


class DirectChatFailed(Exception):
    """The person could not be reached in a direct chat (the text is for the room)."""


class WebhookCommands:
    """The room's side of HookAdmin: secrets go to the requester's direct chat, never here."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        directory: HookDirectory,
        links: LinkCommands,
        admin: HookAdmin | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.admin = admin or HookAdmin(config, db, directory, links)

    def register(self, processor: CommandProcessor) -> None:
        processor.add(
            CommandSpec(
                "webhook",
                "webhooks of this room: make one that posts here (its URL and secret come to "
                "you in a direct chat) or one that receives this room's messages at a URL, "
                "list them, revoke one, or give one a new secret",
                PermissionLevel.USER,
                usage="new NAME | out NAME URL | list | revoke NAME | rotate NAME",
            ),
            self.webhook,
        )

    async def webhook(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        action = args[0].casefold() if args else ""
        if action == "list" and len(args) == 1:
            return self._list(ctx)
        wanted = 3 if action == "out" else 2
        if action not in ("new", "out", "revoke", "rotate") or len(args) != wanted:
            return Reply.plain(USAGE)
        name = args[1].casefold()
        try:
            if action in ("new", "out"):
                return await self._new(ctx, name, args[2] if action == "out" else None)
            if action == "revoke":
                removed = await self.admin.revoke(ctx, name)
                if removed.direction == OUTBOUND:
                    return Reply.plain(
                        f"Webhook {name} revoked: this room's messages are no longer sent to "
                        "it (those still waiting are dropped)."
                    )
                return Reply.plain(f"Webhook {name} revoked: its URL no longer accepts requests.")
            return await self._rotate(ctx, name)
        except LinkRefused as e:
            return Reply.plain(e.message)
        except DirectChatFailed as e:
            return Reply.plain(str(e))

    def _list(self, ctx: CommandContext) -> Reply:
        lines = []
        for hook in self.admin.hooks(ctx.room_id):
            origin = (
                "from the config file"
                if hook.source == CONFIG_SOURCE
                else f"made by {hook.created_by}"
            )
            what = (
                f"receives this room's messages at {hook.url}"
                if hook.direction == OUTBOUND
                else "posts here"
            )
            lines.append(f"• {hook.name} — {what} — {origin}")
        if not lines:
            return Reply.plain("No webhook in this room.")
        return Reply.plain("Webhooks of this room:\n" + "\n".join(sorted(lines)))

    async def _new(self, ctx: CommandContext, name: str, url: str | None) -> Reply:
        async def deliver(made: HookSecret) -> None:
            await self._send_secret(ctx.sender, made, "made")

        made = await self.admin.create(ctx, name, deliver=deliver, url=url)
        if url is not None:
            return Reply.plain(
                f"Webhook {name} created: this room's messages are sent to "
                f"{made.hook.url}; the secret that signs them was sent to you in a direct chat."
            )
        return Reply.plain(
            f"Webhook {name} created; its URL and secret were sent to you in a direct chat."
        )

    async def _rotate(self, ctx: CommandContext, name: str) -> Reply:
        rotated = await self.admin.rotate(ctx, name)
        grace = self.config.webhooks.rotation_grace
        try:
            await self._send_secret(ctx.sender, rotated, "given a new secret")
        except DirectChatFailed as e:
            return Reply.plain(f"{e} The old secret stays valid for {grace} seconds.")
        return Reply.plain(
            f"Webhook {name} has a new secret, sent to you in a direct chat; the old one stays "
            f"valid for {grace} seconds."
        )

    async def _send_secret(self, user: UserID, made: HookSecret, what: str) -> None:
        if made.hook.direction == OUTBOUND:
            text = (
                f"Webhook {made.hook.name} was {what}.\nIt sends the messages of "
                f"{made.hook.room_id} to: {made.hook.url}\nSecret: {made.secret}\n"
                "Give the secret to the receiving system only; it checks the signature of "
                "each request with it (Standard Webhooks)."
            )
        else:
            text = (
                f"Webhook {made.hook.name} was {what}.\nURL: {made.hook.url}\n"
                f"Secret: {made.secret}\n"
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
