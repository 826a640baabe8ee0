"""`passerelle backfill`: a linked list's existing mail into its room, with a progress bar."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import TextIO

import aiohttp
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from bridge.config import Config, ConfigError, mail_address
from bridge.core.backfill import Outcome, Selection, parse_count, parse_date
from bridge.core.health import ComponentHealth
from bridge.core.tasks import TaskGroup
from bridge.db import backfill as backfill_db
from bridge.db import links as link_db
from bridge.db.engine import Database, open_database
from bridge.mail.authcheck import SenderAuthenticator
from bridge.mail.ingest import make_parser
from bridge.matrix.client import MatrixClient
from bridge.matrix.ghosts import GhostManager
from bridge.matrix.members import RoomMembers
from bridge.matrix.poster import MatrixPoster
from bridge.matrix.progress import NoticeBoard
from bridge.relay import backfill as relay_backfill
from bridge.relay.backfill import CLI_ATTEMPTS, BackfillRunner, JobLost
from bridge.relay.bounces import Bounces
from bridge.relay.mail_in import MailRelay
from bridge.relay.mail_out import MailOut

log = logging.getLogger("passerelle.mail.backfill")

EXIT_DONE = 0
EXIT_FAILED = 1


class UsageError(ValueError):
    """A command line that cannot be run; str() says why."""


def selection_from(since: str | None, last: str | None, *, today: dt.date) -> Selection:
    """--since DATE / --last N, checked like the room command's words."""
    if since is not None and last is not None:
        raise UsageError("--since and --last cannot be used together")
    try:
        if since is not None:
            return Selection(since=parse_date(since, today=today))
        if last is not None:
            return Selection(last=parse_count(last))
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Selection()


def _relay(config: Config, db: Database, client: MatrixClient) -> MailRelay:
    """The live relay's mail-in path, as `passerelle run` builds it (bridge/app.py)."""
    mail_out = MailOut(config, db, client, RoomMembers(client), notify_outbox=lambda: None)
    return MailRelay(
        db,
        make_parser(config.mail),
        MatrixPoster(client, GhostManager(config, client, db)),
        TaskGroup(),
        authenticate=SenderAuthenticator(config.mail.trust).check,
        max_attempts=config.mail.max_attempts,
        is_own_message=mail_out.is_own_message_id,
        has_own_marker=mail_out.has_own_marker,
        levels=config.mail.markings.levels,
        bounces=Bounces(config, db, client),
    )


async def run_backfill(
    config: Config,
    address_text: str,
    selection: Selection,
    *,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    try:
        address = mail_address("--link", address_text)
    except ConfigError:
        raise UsageError(f"--link: “{address_text[:100]}” is not a plain mail address") from None
    db = await open_database(config.database)
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=config.homeserver.request_timeout),
        connector=aiohttp.TCPConnector(ssl=config.homeserver.verify_ssl),
    )
    try:
        link = await link_db.link_by_remote(db, "mail", address)
        if link is None:
            raise UsageError(f"{address} is not linked to a room (link it first)")
        client = MatrixClient(config, session, ComponentHealth("homeserver"))
        runner = BackfillRunner(
            config, db, _relay(config, db, client), NoticeBoard(client), kind="cli",
            attempts=CLI_ATTEMPTS,
        )  # fmt: skip
        job = await backfill_db.unfinished_job(db, link.id)
        if job is not None:
            if not await runner.claim(job):
                print(
                    f"The history of {address} is being imported by another process "
                    f"({job.owner}): {job.handled} / {job.total} mails so far.",
                    file=err,
                )
                return EXIT_FAILED
            asked = relay_backfill.selection_of(job)
            print(f"Resuming the import of {address} ({asked.describe()}).", file=out)
        else:
            job = await backfill_db.create_job(
                db,
                link_id=link.id,
                mailbox=address,
                room_id=link.room_id,
                since=selection.since.isoformat() if selection.since else None,
                last=selection.last,
                requested_by="command line",
            )
            if not await runner.claim(job):  # pragma: no cover - a new row is nobody's
                return EXIT_FAILED
            print(f"Importing {address} ({selection.describe()}) into {link.room_id}.", file=out)
        outcome = await _with_bar(runner, job, err)
    except JobLost as e:
        print(f"passerelle: {e}", file=err)
        return EXIT_FAILED
    finally:
        await session.close()
        await db.close()
    print(outcome.summary(), file=out)
    return EXIT_DONE if outcome.state == "done" else EXIT_FAILED


async def _with_bar(runner: BackfillRunner, job: backfill_db.Job, err: TextIO) -> Outcome:
    console = Console(file=err)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("mails"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job.mailbox, total=None)

        def show(progress: relay_backfill.Progress) -> None:
            bar.update(task, total=progress.total, completed=progress.handled)

        return await runner.run(job, show)
