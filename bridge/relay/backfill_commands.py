"""The `backfill` command: import a linked list's existing mail into its room."""

from __future__ import annotations

import datetime as dt
import logging

from bridge.config import ConfigError, mail_address
from bridge.core.backfill import USAGE, BadRequest, parse_selection
from bridge.core.commands import CommandContext, CommandProcessor, CommandSpec, Reply
from bridge.core.permissions import PermissionLevel
from bridge.db import links as link_db
from bridge.db.engine import Database
from bridge.relay.backfill import BackfillService
from bridge.relay.link_commands import LinkCommands, LinkRefused

log = logging.getLogger("passerelle.links")


class BackfillCommands:
    """Who may import history (those who may manage the room's links), and what."""

    def __init__(self, db: Database, links: LinkCommands, service: BackfillService) -> None:
        self.db = db
        self.links = links
        self.service = service

    def register(self, processor: CommandProcessor) -> None:
        processor.add(
            CommandSpec(
                "backfill",
                "post a linked list's existing mail here, oldest first",
                PermissionLevel.USER,
                usage="ADDRESS [since YYYY-MM-DD | last N]",
            ),
            self.backfill,
        )

    async def backfill(self, ctx: CommandContext, args: tuple[str, ...]) -> Reply:
        if not args:
            return Reply.plain(f"Usage: {USAGE}")
        try:
            await self.links.authorize(ctx, "Importing a list's history")
        except LinkRefused as e:
            return Reply.plain(e.for_room())
        try:
            address = mail_address("address", args[0])
        except ConfigError:
            return Reply.plain(f"“{args[0][:100]}” is not a plain mail address. ({USAGE})")
        try:
            selection = parse_selection(list(args[1:]), today=dt.datetime.now(dt.UTC).date())
        except BadRequest as e:
            return Reply.plain(f"Not imported: {e}.")
        link = await link_db.link_by_remote(self.db, "mail", address)
        if link is None or link.room_id != ctx.room_id:
            return Reply.plain(
                f"{address} is not linked to this room: link it first (link {address})."
            )
        if link.paused:
            return Reply.plain(
                f"The link to {address} is paused here: nothing can be posted until it resumes."
            )
        text, job = await self.service.request(link, selection, ctx.sender)
        if job is not None:
            log.info("%s asked for the history of %s (%s)", ctx.sender, address, job.id)
        return Reply.plain(text)
