"""The management bot: accepts invites from permitted people and answers their commands."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.config import Config
from bridge.core.commands import CommandContext, CommandProcessor, Reply, parse_command
from bridge.core.errors import Ignored, PermanentError
from bridge.core.ids import EventID, RoomID
from bridge.core.permissions import PermissionLevel
from bridge.db import links as link_db
from bridge.db import rooms
from bridge.db.engine import Database
from bridge.db.inbox import InboxEvent
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.render import notice_content

log = logging.getLogger("passerelle.matrix.bot")

REFUSED_NOT_PERMITTED = "Passerelle: you are not allowed to use this bridge."
REFUSED_ENCRYPTED = (
    "Passerelle cannot read or write end-to-end encrypted rooms yet, and never sends in clear "
    "to a room that expects encryption. Invite it to a room without encryption."
)
NOW_ENCRYPTED = "encryption was turned on; the bot stays silent in this room from now on"


def _content(event: dict[str, Any]) -> dict[str, Any]:
    content = event.get("content")
    return content if isinstance(content, dict) else {}


def _invite_state_has_encryption(event: dict[str, Any]) -> bool:
    unsigned = event.get("unsigned")
    if not isinstance(unsigned, dict):
        return False
    state = unsigned.get("invite_room_state")
    if not isinstance(state, list):
        return False
    return any(isinstance(s, dict) and s.get("type") == "m.room.encryption" for s in state)


class ManagementBot:
    """Handles the events that concern the bot itself: its invites and the commands to it."""

    def __init__(
        self,
        config: Config,
        client: MatrixClient,
        db: Database,
        commands: CommandProcessor,
        *,
        on_joined: Callable[[RoomID], Awaitable[None]] | None = None,
        is_linked: Callable[[RoomID], Awaitable[bool]] | None = None,
        on_encrypted: Callable[[RoomID, EventID], Awaitable[None]] | None = None,
        on_left: Callable[[RoomID], None] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.db = db
        self.commands = commands
        self.mxid = config.bot_mxid
        self.on_joined = on_joined
        self.is_linked = is_linked or self._has_links
        self.on_encrypted = on_encrypted
        self.on_left = on_left

    async def handle(self, item: InboxEvent) -> None:
        """Handle one stored event; raises Ignored when it is none of the bot's business."""
        if item.event_type == "m.room.member" and item.event.get("state_key") == self.mxid:
            await self._on_bot_membership(item)
        elif item.event_type == "m.room.member":
            await self._on_member_change(item)
        elif item.event_type == "m.room.encryption" and item.event.get("state_key") == "":
            await self._on_encryption(item)
        elif item.event_type == "m.room.message":
            await self._on_message(item)
        else:
            raise Ignored(f"{item.event_type} is not for the bot")

    async def _on_bot_membership(self, item: InboxEvent) -> None:
        content = _content(item.event)
        membership = content.get("membership")
        room_id = item.room_id
        if membership == "invite":
            await self._on_invite(item, content)
        elif membership in ("leave", "ban"):
            log.info("bot is no longer in %s (%s by %s)", room_id, membership, item.sender)
            await rooms.set_membership(self.db, room_id, str(membership))
            if self.on_left is not None:
                self.on_left(room_id)
        elif membership == "join":
            if await rooms.get_room(self.db, room_id) is None:
                await rooms.save_room(
                    self.db,
                    room_id,
                    bot_membership="join",
                    is_direct=False,
                    encrypted=False,
                    invited_by=None,
                )
        else:
            raise Ignored(f"bot membership {membership!r}")

    async def _on_invite(self, item: InboxEvent, content: dict[str, Any]) -> None:
        room_id, inviter = item.room_id, item.sender
        level = self.config.permissions.level_for(inviter)
        encrypted = _invite_state_has_encryption(item.event)
        is_direct = content.get("is_direct") is True
        if level < PermissionLevel.USER:
            log.info("refusing invite to %s from %s: not permitted", room_id, inviter)
            await self._refuse(item, REFUSED_NOT_PERMITTED)
            return
        if encrypted:
            log.info("refusing invite to %s from %s: room is encrypted", room_id, inviter)
            await self._refuse(item, REFUSED_ENCRYPTED)
            return
        try:
            await self.client.join(room_id)
        except PermanentError as e:
            # The invite was withdrawn, or the room is gone: nothing to do but remember it.
            log.warning("could not join %s after invite from %s: %s", room_id, inviter, e)
            await rooms.save_room(
                self.db,
                room_id,
                bot_membership="leave",
                is_direct=is_direct,
                encrypted=False,
                invited_by=inviter,
            )
            return
        members = await self.client.member_count(room_id)
        await rooms.save_room(
            self.db,
            room_id,
            bot_membership="join",
            is_direct=is_direct,
            encrypted=False,
            invited_by=inviter,
            member_count=members,
        )
        log.info("joined %s on invite from %s (%d members)", room_id, inviter, members)
        if self.on_joined is not None:
            await self.on_joined(room_id)
        hint = "help" if members <= 2 else f"{self.config.appservice.command_prefix} help"
        name = self.config.appservice.bot_displayname
        await self._send_notice(
            room_id,
            Reply.plain(f"Hello, I am {name}. Write “{hint}” to see what I can do."),
            txn_id=derived_txn_id("greeting", item.event_id),
        )

    async def _has_links(self, room_id: RoomID) -> bool:
        return bool(await link_db.links_in_room(self.db, room_id))

    async def _refuse(self, item: InboxEvent, reason: str) -> None:
        try:
            await self.client.leave(item.room_id, reason=reason)
        except PermanentError as e:
            log.info("invite to %s already gone: %s", item.room_id, e)
        await rooms.save_room(
            self.db,
            item.room_id,
            bot_membership="leave",
            is_direct=_content(item.event).get("is_direct") is True,
            encrypted=_invite_state_has_encryption(item.event),
            invited_by=item.sender,
        )

    async def _on_member_change(self, item: InboxEvent) -> None:
        room = await rooms.get_room(self.db, item.room_id)
        if room is None or room.bot_membership != "join":
            raise Ignored("membership change in a room the bot is not in")
        count = await self.client.member_count(item.room_id)
        if count != room.member_count:
            await rooms.set_member_count(self.db, item.room_id, count)

    async def _on_encryption(self, item: InboxEvent) -> None:
        room = await rooms.get_room(self.db, item.room_id)
        if room is None:
            raise Ignored("encryption in a room the bot does not know")
        if not room.encrypted:
            log.warning("%s in %s: %s", NOW_ENCRYPTED, item.room_id, item.sender)
            await rooms.set_encrypted(self.db, item.room_id)
        if self.on_encrypted is not None:
            # Also on a retry: the callback is idempotent.
            await self.on_encrypted(item.room_id, item.event_id)

    async def _on_message(self, item: InboxEvent) -> None:
        sender = item.sender
        if sender == self.mxid or self.config.is_ghost(sender):
            raise Ignored("message from the bridge itself")
        content = _content(item.event)
        if content.get("msgtype") != "m.text":
            raise Ignored(f"msgtype {content.get('msgtype')!r} is not a command")
        body = content.get("body")
        if not isinstance(body, str):
            raise Ignored("message without a text body")
        relates = content.get("m.relates_to")
        if "m.new_content" in content or (
            isinstance(relates, dict) and relates.get("rel_type") == "m.replace"
        ):
            raise Ignored("edits are not commands")
        prefix = self.config.appservice.command_prefix
        if parse_command(body, prefix, is_direct=False) is None and await self.is_linked(
            item.room_id
        ):
            # The common case, a message in a linked room: settled without the database.
            raise Ignored("not a command")
        room = await rooms.get_room(self.db, item.room_id)
        if room is None or room.bot_membership != "join":
            raise Ignored("message in a room the bot is not in")
        if room.encrypted:
            raise Ignored("room is encrypted: the bot never answers in clear")
        # A room linked to a list is a conversation, even with only one person and the bot in
        # it: there, only prefixed text is a command.
        is_direct = room.is_direct_chat and not await self.is_linked(item.room_id)
        command = parse_command(body, prefix, is_direct=is_direct)
        if command is None:
            raise Ignored("not a command")
        level = self.config.permissions.level_for(sender)
        log.info(
            "command %r from %s in %s (%s)", command.name[:50], sender, item.room_id, item.event_id
        )

        async def power_level() -> int:
            return await self.client.power_level(item.room_id, sender)

        context = CommandContext(
            sender=sender,
            room_id=item.room_id,
            level=level,
            is_direct=is_direct,
            power_level=power_level,
        )
        reply = await self.commands.run(command, level, is_direct=is_direct, context=context)
        thread_root = None
        if isinstance(relates, dict) and relates.get("rel_type") == "m.thread":
            root = relates.get("event_id")
            thread_root = EventID(root) if isinstance(root, str) else None
        await self._send_notice(
            item.room_id,
            reply,
            txn_id=derived_txn_id("reply", item.event_id),
            reply_to=item.event_id,
            thread_root=thread_root,
        )

    async def _send_notice(
        self,
        room_id: RoomID,
        reply: Reply,
        *,
        txn_id: str,
        reply_to: EventID | None = None,
        thread_root: EventID | None = None,
    ) -> EventID:
        content = notice_content(
            reply.text, html=reply.html, reply_to=reply_to, thread_root=thread_root
        )
        event_id = await self.client.send_event(room_id, "m.room.message", content, txn_id)
        log.debug("sent notice %s in %s (txn %s)", event_id, room_id, txn_id)
        return event_id
