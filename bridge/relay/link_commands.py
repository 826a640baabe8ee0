"""The `link`, `unlink` and `links` commands: who may bind a room to a list, and how."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable

from bridge.config import Config, ConfigError, check_sender_patterns, mail_address
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.links import (
    REMOTE_KIND,
    Link,
    LinkSettings,
    remote_link_key,
    split_remote_key,
)
from bridge.core.permissions import PermissionLevel
from bridge.db import links as link_db
from bridge.db import rooms
from bridge.db.engine import Database
from bridge.relay.remotes import RemoteJoinError, describe_remote_link

log = logging.getLogger("passerelle.links")

_ROOM_REF = re.compile(r"[!#][^\s:]{1,200}(?::[^\s]{1,255})?")

# Room power level that lets a `user` (not an `admin`) manage the room's links: moderators.
MIN_POWER_LEVEL = 50

LinksChanged = Callable[[], Awaitable[None]]
# The bridge's account joins a remote room (ID or alias): its room ID, or an error for a person.
RemoteJoin = Callable[[str, str], Awaitable[str]]
# Tell the room's clients about a link (True) or its removal (False): m.bridge state.
Announce = Callable[[Link, bool], Awaitable[None]]


class LinkCommands:
    def __init__(
        self,
        config: Config,
        db: Database,
        on_change: LinksChanged,
        announce: Announce,
        remote_join: RemoteJoin | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.on_change = on_change
        self.announce = announce
        self.remote_join = remote_join

    def register(self, processor: CommandProcessor) -> None:
        processor.add(
            CommandSpec(
                "link",
                "post the mail of a list configured by the administrator in this room",
                PermissionLevel.USER,
                usage="ADDRESS [allow DOMAIN,*.DOMAIN] [flat] [marking LEVEL]",
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
            CommandSpec(
                "links", "the lists and remote rooms linked to this room", PermissionLevel.USER
            ),
            self.links,
        )
        processor.add(
            CommandSpec(
                "link-remote",
                "relay this room with a room on another ministry's server",
                PermissionLevel.USER,
                usage="REMOTE ROOM",
            ),
            self.link_remote,
        )
        processor.add(
            CommandSpec(
                "unlink-remote",
                "stop relaying a remote room here",
                PermissionLevel.USER,
                usage="REMOTE ROOM",
            ),
            self.unlink_remote,
        )

    async def _may_manage(self, ctx: CommandContext) -> bool:
        if ctx.level >= PermissionLevel.ADMIN:
            return True
        return await ctx.power_level() >= MIN_POWER_LEVEL

    async def link(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        if not args:
            return Reply.plain(
                "Usage: link ADDRESS [allow DOMAIN,*.DOMAIN] [flat] [marking LEVEL]"
            )
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
        if address == self.config.mail.bounces.mailbox:
            return Reply.plain(
                f"{address} is the bridge's bounce mailbox (mail.bounces.mailbox): it receives "
                "delivery reports only, and is never linked to a room."
            )
        room = await rooms.get_room(self.db, ctx.room_id)
        if room is not None and room.encrypted:
            return Reply.plain(
                "This room is end-to-end encrypted: Passerelle cannot post into it yet, and "
                "never posts in clear to a room that expects encryption."
            )
        senders: tuple[str, ...] = (address.rpartition("@")[2],)
        mode = "threads"
        marking: str | None = None
        rest = list(args[1:])
        while rest:
            word = rest.pop(0).casefold()
            if word == "flat":
                mode = "flat"
            elif word == "threads":
                mode = "threads"
            elif word == "marking" and rest:
                marking, rest = self._level(rest)
                if marking is None:
                    known = ", ".join(self.config.mail.markings.levels.names)
                    return Reply.plain(f"Not linked: the marking must be one of {known}.")
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
            settings=LinkSettings(allowed_senders=senders, thread_mode=mode, marking=marking),
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

    def _level(self, words: list[str]) -> tuple[str | None, list[str]]:
        """The level the longest run of leading `words` names (levels have spaces:
        "DIFFUSION RESTREINTE"), and the words after it."""
        levels = self.config.mail.markings.levels
        for end in range(min(len(words), 8), 0, -1):
            level = levels.canonical(" ".join(words[:end]))
            if level is not None:
                return level, words[end:]
        return None, words

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
            return Reply.plain("No list or remote room is linked to this room.")
        lines = [
            f"• {describe_remote_link(link)}"
            if link.kind == REMOTE_KIND
            else f"• {link.remote} — {_describe(link, self.config)}"
            for link in here
        ]
        return Reply.plain("\n".join(lines))

    async def link_remote(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        usage = "Usage: link-remote REMOTE ROOM (ROOM: a room ID or alias on that server)"
        if len(args) != 2:
            return Reply.plain(usage)
        if not await self._may_manage(ctx):
            return Reply.plain(
                f"Linking needs the admin permission, or power level {MIN_POWER_LEVEL} here."
            )
        name, room = args[0].casefold(), args[1]
        if name not in self.config.remotes or self.remote_join is None:
            known = ", ".join(sorted(self.config.remotes)) or "none"
            return Reply.plain(
                f"“{name[:50]}” is not a remote this bridge knows (configured: {known}). The "
                "administrator adds it under remotes in the config (credentials never go "
                "through a room)."
            )
        if not _ROOM_REF.fullmatch(room):
            return Reply.plain(f"“{room[:100]}” is not a room ID (!…) or alias (#…:server).")
        local = await rooms.get_room(self.db, ctx.room_id)
        if local is not None and local.encrypted:
            return Reply.plain(
                "This room is end-to-end encrypted: Passerelle cannot relay it yet, and never "
                "posts in clear to a room that expects encryption."
            )
        try:
            remote_room = await self.remote_join(name, room)
        except RemoteJoinError as e:
            return Reply.plain(f"Not linked: {e}")
        key = remote_link_key(name, remote_room)
        existing = await link_db.link_by_remote(self.db, REMOTE_KIND, key)
        if existing is not None and existing.room_id != ctx.room_id:
            return Reply.plain(f"{room} on {name} is already linked to another room.")
        if existing is not None and existing.source == "config":
            return Reply.plain(f"{room} on {name} is linked here by the config file.")
        link = await link_db.save_link(
            self.db,
            room_id=ctx.room_id,
            kind=REMOTE_KIND,
            remote=key,
            settings=LinkSettings(),
            source="bot",
            created_by=ctx.sender,
        )
        log.info("%s linked %s to %s", ctx.sender, key, ctx.room_id)
        await self.on_change()
        await self.announce(link, True)
        return Reply.plain(
            f"Linked {room} on {name}: from now on messages are relayed both ways "
            "(what was said before is not)."
        )

    async def unlink_remote(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        here = [
            link
            for link in await link_db.links_in_room(self.db, ctx.room_id)
            if link.kind == REMOTE_KIND
        ]
        if not args and len(here) == 1:
            target = here[0]
        else:
            found = [
                link
                for link in here
                if len(args) == 2
                and split_remote_key(link.remote)[0] == args[0].casefold()
                and split_remote_key(link.remote)[1] == args[1]
            ]
            if len(args) == 2 and not found and self.remote_join is not None:
                # An alias: the link knows the room by its ID.
                found = [
                    link
                    for link in here
                    if split_remote_key(link.remote)[0] == args[0].casefold()
                    and args[1].startswith("#")
                ][:1]
            if not found:
                return Reply.plain("Usage: unlink-remote REMOTE ROOM (one of this room's links).")
            target = found[0]
        if not await self._may_manage(ctx):
            return Reply.plain(
                f"Unlinking needs the admin permission, or power level {MIN_POWER_LEVEL} here."
            )
        if target.source == "config":
            return Reply.plain("That link is in the config file; change it there.")
        unsent = await link_db.delete_link(self.db, target.id)
        log.info("%s unlinked %s from %s", ctx.sender, target.remote, ctx.room_id)
        await self.on_change()
        await self.announce(target, False)
        name, remote_room = split_remote_key(target.remote)
        dropped = f" {unsent} message(s) not sent yet were dropped." if unsent else ""
        return Reply.plain(
            f"Unlinked {remote_room} on {name}: nothing is relayed any more.{dropped}"
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
    marking = f"marked {link.settings.marking}; " if link.settings.marking else ""
    return f"{marking}senders allowed: {senders}; {mode}; {out}{paused}{source}"
