"""The `link`, `unlink` and `links` commands: who may bind a room to a list, and how."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace

from bridge.config import Config, ConfigError, check_sender_patterns, mail_address
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.links import (
    REMOTE_KIND,
    THREAD_MODES,
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


class LinkRefused(Exception):
    """A link request refused, with what to tell the person. kind: "forbidden" (permission),
    "invalid" (the request), "conflict" (the state of the links)."""

    def __init__(self, kind: str, message: str, *, bare: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.bare = bare  # a whole sentence, shown as is (else after "Not linked: ")

    def for_room(self) -> str:
        if self.kind == "forbidden" or self.bare:
            return self.message
        return f"Not linked: {self.message}"


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

    async def authorize(self, ctx: CommandContext, action: str = "Linking") -> None:
        """Refuse (LinkRefused "forbidden") a person who may not manage this room's links."""
        if not await self._may_manage(ctx):
            raise LinkRefused(
                "forbidden",
                f"{action} needs the admin permission, or power level {MIN_POWER_LEVEL} here.",
            )

    async def link(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        if not args:
            return Reply.plain(
                "Usage: link ADDRESS [allow DOMAIN,*.DOMAIN] [flat] [marking LEVEL]"
            )
        senders: list[str] | None = None
        mode = "threads"
        marking: str | None = None
        try:
            await self.authorize(ctx)
            rest = list(args[1:])
            while rest:
                word = rest.pop(0).casefold()
                if word in ("flat", "threads"):
                    mode = word
                elif word == "marking" and rest:
                    marking, rest = self._level(rest)
                    if marking is None:
                        known = ", ".join(self.config.mail.markings.levels.names)
                        raise LinkRefused("invalid", f"the marking must be one of {known}.")
                elif word == "allow" and rest:
                    senders = [p for p in rest.pop(0).split(",") if p]
                else:
                    raise LinkRefused("invalid", f"unexpected “{word[:50]}”.")
            link = await self.add_mail_link(ctx, args[0], senders, mode, marking)
        except LinkRefused as e:
            return Reply.plain(e.for_room())
        return Reply.plain(
            f"Linked {link.remote}: from now on its mail appears here "
            f"({_describe(link, self.config)})."
        )

    async def add_mail_link(
        self,
        ctx: CommandContext,
        address_text: str,
        allowed_senders: list[str] | None,
        thread_mode: str,
        marking: str | None,
        *,
        joined: bool = True,
    ) -> Link:
        """Link a configured mailbox to ctx.room_id (after authorize()): the checks and effects
        shared by `link` and the provisioning API. Raises LinkRefused. `joined`: False when
        the bot is not in the room yet; the link then waits (paused) for its invite."""
        try:
            address = mail_address("address", address_text)
        except ConfigError:
            raise LinkRefused(
                "invalid", f"“{address_text[:100]}” is not a plain mail address.", bare=True
            ) from None
        if address not in self.config.mail.mailboxes:
            raise LinkRefused(
                "invalid",
                f"{address} is not a mailbox this bridge may read. The administrator adds it "
                "under mail.mailboxes in the config (credentials never go through a room).",
                bare=True,
            )
        if address == self.config.mail.bounces.mailbox:
            raise LinkRefused(
                "invalid",
                f"{address} is the bridge's bounce mailbox (mail.bounces.mailbox): it receives "
                "delivery reports only, and is never linked to a room.",
                bare=True,
            )
        room = await rooms.get_room(self.db, ctx.room_id)
        if room is not None and room.encrypted:
            raise LinkRefused(
                "invalid",
                "This room is end-to-end encrypted: Passerelle cannot post into it yet, and "
                "never posts in clear to a room that expects encryption.",
                bare=True,
            )
        senders: tuple[str, ...] = (address.rpartition("@")[2],)
        if allowed_senders is not None:
            try:
                senders = check_sender_patterns("allow", allowed_senders)
            except ConfigError as e:
                raise LinkRefused("invalid", e.problem) from None
        if thread_mode not in THREAD_MODES:
            raise LinkRefused("invalid", f"the thread mode must be one of {THREAD_MODES}.")
        if marking is not None and self.config.mail.markings.levels.canonical(marking) is None:
            known = ", ".join(self.config.mail.markings.levels.names)
            raise LinkRefused("invalid", f"the marking must be one of {known}.")
        existing = await link_db.link_by_remote(self.db, "mail", address)
        if existing is not None and existing.room_id != ctx.room_id:
            raise LinkRefused(
                "conflict",
                f"{address} is already linked to another room; unlink it there.",
                bare=True,
            )
        if existing is not None and existing.source == "config":
            raise LinkRefused(
                "conflict",
                f"{address} is linked here by the config file; change it there.",
                bare=True,
            )
        if marking is not None:
            marking = self.config.mail.markings.levels.canonical(marking)
        link = await link_db.save_link(
            self.db,
            room_id=ctx.room_id,
            kind="mail",
            remote=address,
            settings=LinkSettings(
                allowed_senders=senders, thread_mode=thread_mode, marking=marking
            ),
            source="bot",
            created_by=ctx.sender,
        )
        log.info("%s linked %s to %s", ctx.sender, address, ctx.room_id)
        return await self._activate(link, joined)

    async def _activate(self, link: Link, joined: bool) -> Link:
        """A saved link starts, or waits (paused) for the bot to be let into its room."""
        if not joined:
            await link_db.set_paused(self.db, link.id, True)
            link = replace(link, paused=True)
        await self.on_change()
        if joined:
            await self.announce(link, True)
        return link

    async def remove_link(self, ctx: CommandContext, target: Link) -> int:
        """Remove one of ctx.room_id's links (after authorize()), shared by `unlink`,
        `unlink-remote` and the provisioning API: how many unsent messages were dropped."""
        if target.source == "config":
            what = target.remote if target.kind != REMOTE_KIND else "That link"
            raise LinkRefused(
                "conflict", f"{what} is linked by the config file; change it there.", bare=True
            )
        unsent = await link_db.delete_link(self.db, target.id)
        log.info("%s unlinked %s from %s", ctx.sender, target.remote, ctx.room_id)
        await self.on_change()
        await self.announce(target, False)
        return unsent

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
        try:
            await self.authorize(ctx, "Unlinking")
            unsent = await self.remove_link(ctx, target)
        except LinkRefused as e:
            return Reply.plain(e.for_room())
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
        try:
            await self.authorize(ctx)
            await self.add_remote_link(ctx, args[0], args[1])
        except LinkRefused as e:
            return Reply.plain(e.for_room())
        return Reply.plain(
            f"Linked {args[1]} on {args[0].casefold()}: from now on messages are relayed both "
            "ways (what was said before is not)."
        )

    async def add_remote_link(
        self, ctx: CommandContext, remote: str, room: str, *, joined: bool = True
    ) -> Link:
        """Relay ctx.room_id with a room of a configured remote (after authorize()): shared by
        `link-remote` and the provisioning API. Raises LinkRefused ("remote": the remote
        refused or could not be reached). `joined` as for add_mail_link."""
        name = remote.casefold()
        if name not in self.config.remotes or self.remote_join is None:
            known = ", ".join(sorted(self.config.remotes)) or "none"
            raise LinkRefused(
                "invalid",
                f"“{name[:50]}” is not a remote this bridge knows (configured: {known}). The "
                "administrator adds it under remotes in the config (credentials never go "
                "through a room).",
                bare=True,
            )
        if not _ROOM_REF.fullmatch(room):
            raise LinkRefused(
                "invalid", f"“{room[:100]}” is not a room ID (!…) or alias (#…:server).", bare=True
            )
        local = await rooms.get_room(self.db, ctx.room_id)
        if local is not None and local.encrypted:
            raise LinkRefused(
                "invalid",
                "This room is end-to-end encrypted: Passerelle cannot relay it yet, and never "
                "posts in clear to a room that expects encryption.",
                bare=True,
            )
        try:
            remote_room = await self.remote_join(name, room)
        except RemoteJoinError as e:
            raise LinkRefused("remote", str(e)) from None
        key = remote_link_key(name, remote_room)
        existing = await link_db.link_by_remote(self.db, REMOTE_KIND, key)
        if existing is not None and existing.room_id != ctx.room_id:
            raise LinkRefused(
                "conflict", f"{room} on {name} is already linked to another room.", bare=True
            )
        if existing is not None and existing.source == "config":
            raise LinkRefused(
                "conflict", f"{room} on {name} is linked here by the config file.", bare=True
            )
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
        return await self._activate(link, joined)

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
        try:
            await self.authorize(ctx, "Unlinking")
            unsent = await self.remove_link(ctx, target)
        except LinkRefused as e:
            return Reply.plain(e.for_room())
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
