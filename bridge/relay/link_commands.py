"""The `link`, `unlink` and `links` commands: who may bind a room to a list, and how."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bridge.config import Config, ConfigError, check_sender_patterns, mail_address
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.links import Link, LinkSettings
from bridge.core.permissions import PermissionLevel
from bridge.db import links as link_db
from bridge.db import rooms
from bridge.db.engine import Database

log = logging.getLogger("passerelle.links")

# Room power level that lets a `user` (not an `admin`) manage the room's links: moderators.
MIN_POWER_LEVEL = 50

LinksChanged = Callable[[], Awaitable[None]]
# Tell the room's clients about a link (True) or its removal (False): m.bridge state.
Announce = Callable[[Link, bool], Awaitable[None]]


class LinkCommands:
    def __init__(
        self, config: Config, db: Database, on_change: LinksChanged, announce: Announce
    ) -> None:
        self.config = config
        self.db = db
        self.on_change = on_change
        self.announce = announce

    def register(self, processor: CommandProcessor) -> None:
        processor.add(
            CommandSpec(
                "link",
                "post the mail of a list configured by the administrator in this room",
                PermissionLevel.USER,
                usage="ADDRESS [allow DOMAIN,*.DOMAIN] [flat]",
            ),
            self.link,
        )
        processor.add(
            CommandSpec(
                "unlink", "stop bridging a list here", PermissionLevel.USER, usage="ADDRESS"
            ),
            self.unlink,
        )
        processor.add(
            CommandSpec("links", "the lists linked to this room", PermissionLevel.USER), self.links
        )

    async def _may_manage(self, ctx: CommandContext) -> bool:
        if ctx.level >= PermissionLevel.ADMIN:
            return True
        return await ctx.power_level() >= MIN_POWER_LEVEL

    async def link(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        if not args:
            return Reply.plain("Usage: link ADDRESS [allow DOMAIN,*.DOMAIN] [flat]")
        if not await self._may_manage(ctx):
            return Reply.plain(
                f"Linking needs the admin permission, or power level {MIN_POWER_LEVEL} here."
            )
        try:
            address = mail_address("address", args[0])
        except ConfigError:
            return Reply.plain(f"“{args[0][:100]}” is not a plain mail address.")
        if address not in self.config.mail.mailboxes:
            return Reply.plain(
                f"{address} is not a mailbox this bridge may read. The administrator adds it "
                "under mail.mailboxes in the config (credentials never go through a room)."
            )
        room = await rooms.get_room(self.db, ctx.room_id)
        if room is not None and room.encrypted:
            return Reply.plain(
                "This room is end-to-end encrypted: Passerelle cannot post into it yet, and "
                "never posts in clear to a room that expects encryption."
            )
        senders: tuple[str, ...] = (address.rpartition("@")[2],)
        mode = "threads"
        rest = list(args[1:])
        while rest:
            word = rest.pop(0).casefold()
            if word == "flat":
                mode = "flat"
            elif word == "threads":
                mode = "threads"
            elif word == "allow" and rest:
                patterns = [p for p in rest.pop(0).split(",") if p]
                try:
                    senders = check_sender_patterns("allow", patterns)
                except ConfigError as e:
                    return Reply.plain(f"Not linked: {e.problem}")
            else:
                return Reply.plain(f"Not linked: unexpected “{word[:50]}”.")
        existing = await link_db.link_by_remote(self.db, "mail", address)
        if existing is not None and existing.room_id != ctx.room_id:
            return Reply.plain(f"{address} is already linked to another room; unlink it there.")
        if existing is not None and existing.source == "config":
            return Reply.plain(f"{address} is linked here by the config file; change it there.")
        link = await link_db.save_link(
            self.db,
            room_id=ctx.room_id,
            kind="mail",
            remote=address,
            settings=LinkSettings(allowed_senders=senders, thread_mode=mode),
            source="bot",
            created_by=ctx.sender,
        )
        log.info("%s linked %s to %s", ctx.sender, address, ctx.room_id)
        await self.on_change()
        await self.announce(link, True)
        return Reply.plain(
            f"Linked {address}: from now on its mail appears here "
            f"({_describe(link, self.config)})."
        )

    async def unlink(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        here = await link_db.links_in_room(self.db, ctx.room_id)
        if not args and len(here) == 1:
            target = here[0]
        else:
            wanted = args[0].casefold() if args else ""
            found = [link for link in here if link.remote == wanted]
            if not found:
                return Reply.plain("Usage: unlink ADDRESS (one of the links of this room).")
            target = found[0]
        if not await self._may_manage(ctx):
            return Reply.plain(
                f"Unlinking needs the admin permission, or power level {MIN_POWER_LEVEL} here."
            )
        if target.source == "config":
            return Reply.plain(f"{target.remote} is linked by the config file; change it there.")
        unsent = await link_db.delete_link(self.db, target.id)
        log.info("%s unlinked %s from %s", ctx.sender, target.remote, ctx.room_id)
        await self.on_change()
        await self.announce(target, False)
        dropped = (
            f" {unsent} message(s) from here that were waiting to be mailed to it were dropped."
            if unsent
            else ""
        )
        return Reply.plain(f"Unlinked {target.remote}: its mail no longer comes here.{dropped}")

    async def links(self, ctx: CommandContext, _args: tuple[str, ...]) -> Reply:
        here = await link_db.links_in_room(self.db, ctx.room_id)
        if not here:
            return Reply.plain("No list is linked to this room.")
        return Reply.plain(
            "\n".join(f"• {link.remote} — {_describe(link, self.config)}" for link in here)
        )


def _describe(link: Link, config: Config) -> str:
    senders = ", ".join(link.settings.allowed_senders) or "nobody"
    mode = "one thread per conversation" if link.settings.thread_mode == "threads" else "flat"
    sender = link.settings.from_address or config.mail.from_address
    if config.mail.smtp is None or sender is None:
        out = "messages written here are not mailed"
    else:
        edits = "" if link.settings.send_edits else ", edits not"
        out = f"messages written here are mailed to it from {sender}{edits}"
    paused = "; paused" if link.paused else ""
    source = " (from the config file)" if link.source == "config" else ""
    return f"senders allowed: {senders}; {mode}; {out}{paused}{source}"
