"""History backfill: a linked mailbox's existing mail, oldest first, through the live relay's
own path (parse, authenticate, policy, markings, threads, ghosts), out of the live queue."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bridge.config import Config
from bridge.core.backfill import (
    Outcome,
    Selection,
    may_claim,
    owner_pid,
    pick,
    progress_text,
    seconds_left,
)
from bridge.core.backoff import Backoff
from bridge.core.ids import EventID, RoomID
from bridge.core.links import Link
from bridge.core.tasks import TaskGroup
from bridge.db import backfill as backfill_db
from bridge.db import links as link_db
from bridge.db.backfill import WAITING, Job
from bridge.db.engine import Database
from bridge.db.util import now_ms
from bridge.mail.backfill import HistoryReader, HistorySession
from bridge.mail.imap_session import MailboxConfig, expected_failure
from bridge.mail.store import DbMailboxStore
from bridge.relay.mail_in import MailRelay

log = logging.getLogger("passerelle.mail.backfill")

# UIDs fetched, stored and posted together: one IMAP round trip and one commit per group.
GROUP = 50
# Mails parsed ahead (in worker threads) while the current one is posted.
LOOKAHEAD = 4
# Seconds between two heartbeats of a running import (STALE_AFTER_MS lets another take it).
HEARTBEAT = 15.0
# How often (seconds) a running import looks whether its link was paused or removed.
LINK_CHECK = 1.0
PAUSED = "the link is paused (the bot is not in the room, or the room is encrypted)"
# Failures of the mailbox or homeserver in a row before a command-line run gives up (the
# bridge retries for as long as it runs).
CLI_ATTEMPTS = 3


class ProgressBoard(Protocol):
    """What the backfill needs from the Matrix side: one notice, edited in place."""

    async def show(
        self, room_id: RoomID, text: str, *, key: str, replaces: EventID | None = None
    ) -> EventID: ...


@dataclass(frozen=True)
class Progress:
    """Told to a watcher (the command line's progress bar) as the job goes."""

    total: int
    handled: int
    posted: int


class JobLost(Exception):
    """Another runner took the job (this one was thought dead): stop touching it."""


def runner_identity(kind: str) -> tuple[str, str]:
    """(owner, host) for this process: "host:pid:kind"."""
    host = socket.gethostname()
    return f"{host}:{os.getpid()}:{kind}", host


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def mailbox_config(config: Config, address: str) -> MailboxConfig | None:
    mailbox = config.mail.mailboxes.get(address)
    if mailbox is None:
        return None
    return MailboxConfig(
        host=mailbox.host,
        port=mailbox.port,
        tls=mailbox.tls,  # type: ignore[arg-type]
        user=mailbox.user,
        password=mailbox.password,
        folder=mailbox.folder,
        ca_file=mailbox.ca_file,
    )


def selection_of(job: Job) -> Selection:
    return Selection(since=dt.date.fromisoformat(job.since) if job.since else None, last=job.last)


class BackfillRunner:
    """Runs backfill jobs: claims them in the database, fetches their mail on a connection of
    its own, settles each mail with the live relay, and keeps the room's notice current."""

    def __init__(
        self,
        config: Config,
        db: Database,
        relay: MailRelay,
        board: ProgressBoard,
        *,
        kind: str,
        attempts: int | None = None,  # None: retry failures for as long as it runs
    ) -> None:
        self.config = config
        self.db = db
        self.relay = relay
        self.board = board
        self.me, self.host = runner_identity(kind)
        self.attempts = attempts
        settings = config.mail.backfill
        self.interval = settings.progress_interval
        self.min_gap = 1.0 / settings.max_rate if settings.max_rate > 0 else 0.0

    async def claim(self, job: Job) -> bool:
        """Take the job if nobody alive holds it."""
        pid = owner_pid(job.owner, self.host) if job.owner is not None else None
        gone = pid is not None and pid != os.getpid() and _gone(pid)
        if not may_claim(
            job.owner, job.heartbeat_at, me=self.me, holder_gone=gone, now_ms=now_ms()
        ):
            return False
        return await backfill_db.claim(self.db, job, self.me)

    async def run(
        self, job: Job, on_progress: Callable[[Progress], None] | None = None
    ) -> Outcome:
        """Run a claimed job to its end (or until cancelled: it is then let go, for anyone to
        resume). Failures of the mailbox or homeserver are retried with backoff."""
        backoff = Backoff(initial=1.0, maximum=60.0)
        failures = 0
        try:
            while True:
                try:
                    return await self._run_once(job, on_progress)
                except JobLost:
                    raise
                except _Final as e:
                    return await self._finish(job, "failed", str(e))
                except Exception as e:
                    failures += 1
                    reason = _reason(e)
                    if self.attempts is not None and failures >= self.attempts:
                        return await self._finish(job, "failed", reason)
                    delay = backoff.next_delay()
                    log.warning(
                        "backfill #%d of %s: %s; retrying in %.1f s",
                        job.id,
                        job.mailbox,
                        reason,
                        delay,
                    )
                    if not expected_failure(e):
                        # A database error's text quotes its parameters (a mail's bytes):
                        # the traceback only at DEBUG, where bodies may appear.
                        log.debug("backfill #%d: the failure", job.id, exc_info=e)
                    await asyncio.sleep(delay)
                    job = await self._still_ours(job)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await backfill_db.release(self.db, job.id, self.me)
            log.info("backfill #%d of %s interrupted; it resumes later", job.id, job.mailbox)
            raise

    async def _still_ours(self, job: Job) -> Job:
        fresh = await backfill_db.get_job(self.db, job.id)
        if fresh is None or fresh.owner != self.me:
            raise JobLost(f"backfill #{job.id} is no longer ours")
        return fresh

    async def _finish(self, job: Job, state: str, error: str | None) -> Outcome:
        fresh = await backfill_db.get_job(self.db, job.id) or job
        outcome = Outcome(
            address=job.mailbox,
            total=fresh.total,
            posted=fresh.posted,
            skipped=max(0, fresh.handled - fresh.posted),
            state=state,
            error=error,
        )
        if not await backfill_db.finish_job(self.db, job.id, self.me, state, error):
            raise JobLost(f"backfill #{job.id} is no longer ours")
        # A paused room may expect encryption now: nothing more is said there in clear.
        if error != PAUSED:
            await self._tell_end(job, fresh.notice_event_id, outcome.summary())
        (log.info if state == "done" else log.warning)(
            "backfill #%d of %s %s: %d of %d posted%s",
            job.id,
            job.mailbox,
            state,
            outcome.posted,
            outcome.total,
            f" ({error})" if error else "",
        )
        return outcome

    async def _tell_end(self, job: Job, notice: str | None, text: str) -> None:
        """The progress notice's last text, and the same as a notice of its own (an edit
        notifies nobody). A courtesy: a failure here changes nothing of the outcome."""
        room = RoomID(job.room_id)
        try:
            if notice is not None:
                key = f"{job.id}:{self.me}:final-edit"
                await self.board.show(room, text, key=key, replaces=EventID(notice))
            await self.board.show(room, text, key=f"{job.id}:final")
        except Exception as e:
            log.warning("backfill #%d: final notice not sent: %s", job.id, _reason(e))

    async def _run_once(self, job: Job, on_progress: Callable[[Progress], None] | None) -> Outcome:
        link = next(
            (link for link in await link_db.all_links(self.db) if link.id == job.link_id), None
        )
        if link is None:
            raise _Final("the link was removed")
        if link.paused:
            raise _Final(PAUSED)
        config = mailbox_config(self.config, job.mailbox)
        if config is None:
            raise _Final(f"{job.mailbox} is no longer among mail.mailboxes")
        reader = HistoryReader(job.mailbox, config, max_size=self.config.mail.max_message_size)
        async with reader.open() as folder:
            job = await self._scope(job, link, folder)
            assert job.upto_uid is not None
            found = await folder.search(job.upto_uid, selection_of(job).since)
            uids = pick(found, selection_of(job), job.upto_uid)
            await self._import(job, link, folder, uids, on_progress)
        return await self._finish(job, "done", None)

    async def _scope(self, job: Job, link: Link, folder: HistorySession) -> Job:
        """Fix, on the first run, the folder generation and the last UID the job takes: the
        link's baseline (what the live watcher started after); later runs check it."""
        if job.uidvalidity is not None:
            if job.uidvalidity != folder.uidvalidity:
                raise _Final(
                    "the folder was rebuilt on the server (its UIDVALIDITY changed); start a "
                    "new backfill"
                )
            return job
        store = DbMailboxStore(self.db, link.id, lambda: None)
        if await store.needs_baseline(job.mailbox):
            highest = await folder.highest_uid()
            await store.set_baseline(job.mailbox, folder.uidvalidity, highest)
        upto = await store.resume_point(job.mailbox, folder.uidvalidity)
        if not await backfill_db.set_scope(self.db, job.id, self.me, folder.uidvalidity, upto):
            raise JobLost(f"backfill #{job.id} is no longer ours")
        fresh = await backfill_db.get_job(self.db, job.id)
        assert fresh is not None
        return fresh

    async def _import(
        self,
        job: Job,
        link: Link,
        folder: HistorySession,
        uids: list[int],
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        assert job.uidvalidity is not None
        known = await backfill_db.known_uids(self.db, job.mailbox, job.uidvalidity, uids)
        settled = {uid for uid, (_, state) in known.items() if state != WAITING}
        total, handled, posted = len(uids), len(settled), job.posted
        loop = asyncio.get_running_loop()
        started, handled_at_start = loop.time(), handled
        room = RoomID(job.room_id)
        notice = EventID(job.notice_event_id) if job.notice_event_id else None
        last_shown = -1e9
        next_send = 0.0
        checked_at = loop.time()

        async def report(force: bool = False) -> None:
            nonlocal notice, last_shown
            if not force and loop.time() - last_shown < self.interval:
                return
            last_shown = loop.time()
            if not await backfill_db.heartbeat(
                self.db, job.id, self.me, total=total, handled=handled, posted=posted
            ):
                raise JobLost(f"backfill #{job.id} was taken over")
            left = seconds_left(handled - handled_at_start, started, loop.time(), total - handled)
            text = progress_text(job.mailbox, handled, total, left)
            try:
                sent = await self.board.show(
                    room, text, key=f"{job.id}:{self.me}:{handled}", replaces=notice
                )
            except Exception as e:  # the notice is a courtesy: never stops the import
                log.warning("backfill #%d: progress notice not sent: %s", job.id, _reason(e))
                return
            if notice is None:
                notice = sent
                await backfill_db.set_notice(self.db, job.id, sent)

        async def beat() -> None:
            """Alive even while one mail waits out a homeserver outage."""
            while True:
                await asyncio.sleep(HEARTBEAT)
                try:
                    if not await backfill_db.heartbeat(self.db, job.id, self.me):
                        return  # taken over: the next report() says so
                except Exception as e:
                    log.warning("backfill #%d: heartbeat failed: %s", job.id, _reason(e))

        await report(force=True)
        if on_progress is not None:
            on_progress(Progress(total, handled, posted))
        beating = asyncio.create_task(beat(), name=f"backfill-heartbeat:{job.id}")
        try:
            for start in range(0, len(uids), GROUP):
                group = [uid for uid in uids[start : start + GROUP] if uid not in settled]
                if not group:
                    continue
                missing = [uid for uid in group if uid not in known]
                if missing:
                    fetched = await folder.fetch(missing)
                    await backfill_db.store_fetched(
                        self.db,
                        link_id=link.id,
                        mailbox=job.mailbox,
                        uidvalidity=job.uidvalidity,
                        mails=[(f.uid, f.message_id, f.raw, f.size, f.error) for f in fetched],
                    )
                waiting = await backfill_db.waiting_mail(
                    self.db, job.mailbox, job.uidvalidity, group
                )
                # A few parsed ahead, not the whole group: live mail shares the worker threads.
                for raw in waiting[:LOOKAHEAD]:
                    self.relay.prepare(link, raw)
                try:
                    for n, raw in enumerate(waiting):
                        if n + LOOKAHEAD < len(waiting):
                            self.relay.prepare(link, waiting[n + LOOKAHEAD])
                        if loop.time() - checked_at >= LINK_CHECK:
                            checked_at = loop.time()
                            await self._check_link(link)
                        if self.min_gap:
                            delay = next_send - loop.time()
                            if delay > 0:
                                await asyncio.sleep(delay)
                            next_send = loop.time() + self.min_gap
                        await self.relay.settle(link, raw)
                        handled += 1
                        if on_progress is not None:
                            on_progress(Progress(total, handled, posted))
                        await report()
                finally:
                    for raw in waiting:
                        self.relay.forget(raw)
                await self.relay.recorded()  # records are committed off the send path
                outcome = await backfill_db.states(self.db, [raw.id for raw in waiting])
                posted += sum(1 for state in outcome.values() if state == "done")
                handled += len(group) - len(waiting)  # duplicates, expunged: settled already
                if on_progress is not None:
                    on_progress(Progress(total, handled, posted))
                await report()
        finally:
            beating.cancel()
        # The final counts, for the summary.
        if not await backfill_db.heartbeat(
            self.db, job.id, self.me, total=total, handled=handled, posted=posted
        ):
            raise JobLost(f"backfill #{job.id} was taken over")

    async def _check_link(self, link: Link) -> None:
        """Stop at once when the link is paused (the room turned encryption on: nothing may be
        posted in clear there) or removed."""
        current = await link_db.link_by_remote(self.db, "mail", link.remote)
        if current is None or current.id != link.id:
            raise _Final("the link was removed")
        if current.paused:
            raise _Final(PAUSED)


class _Final(Exception):
    """The job cannot go on (its link is gone, …): it ends as failed, with this reason."""


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


class BackfillService:
    """The bridge's side of backfills: starts them for the room command, resumes those a
    stopped bridge left (at start-up, then every `RESCAN` seconds for abandoned ones)."""

    RESCAN = 30.0

    def __init__(self, runner: BackfillRunner, db: Database, tasks: TaskGroup) -> None:
        self.runner = runner
        self.db = db
        self.tasks = tasks
        self._running: dict[int, asyncio.Task[Any]] = {}

    async def run(self) -> None:
        """Resume the unfinished jobs started in rooms that nobody alive runs; forever."""
        while True:
            try:
                for job in await backfill_db.unfinished_jobs(self.db):
                    if job.id in self._running or not _from_a_room(job):
                        continue
                    if await self.runner.claim(job):
                        log.info("resuming backfill #%d of %s", job.id, job.mailbox)
                        self._spawn(job)
            except Exception as e:
                log.warning("cannot look for backfills to resume: %s", _reason(e))
            await asyncio.sleep(self.RESCAN)

    def _spawn(self, job: Job) -> None:
        task = self.tasks.spawn(self._run(job), name=f"backfill:{job.id}")
        self._running[job.id] = task

    async def _run(self, job: Job) -> None:
        try:
            await self.runner.run(job)
        except JobLost as e:
            log.warning("%s", e)
        finally:
            self._running.pop(job.id, None)

    async def request(
        self, link: Link, selection: Selection, requested_by: str
    ) -> tuple[str, Job | None]:
        """Start (or resume) the link's backfill: what to answer, and the job if it runs."""
        job = await backfill_db.unfinished_job(self.db, link.id)
        if job is not None:
            if job.id in self._running:
                return (
                    f"The history of {link.remote} is already being imported "
                    f"({job.handled} / {job.total} mails so far).",
                    None,
                )
            if not await self.runner.claim(job):
                return (
                    f"The history of {link.remote} is being imported by another process "
                    f"({job.handled} / {job.total} mails so far).",
                    None,
                )
            asked = selection_of(job).describe()
            self._spawn(job)
            return f"Resuming the import of the history of {link.remote} ({asked}).", job
        job = await backfill_db.create_job(
            self.db,
            link_id=link.id,
            mailbox=link.remote,
            room_id=link.room_id,
            since=selection.since.isoformat() if selection.since else None,
            last=selection.last,
            requested_by=requested_by,
        )
        if not await self.runner.claim(job):  # pragma: no cover - a new row is nobody's
            return "The import could not start; try again.", None
        self._spawn(job)
        return (
            f"Importing the history of {link.remote} ({selection.describe()}), oldest first; "
            "new mail keeps coming meanwhile.",
            job,
        )


def _from_a_room(job: Job) -> bool:
    """Started with the room command (resumed by the bridge), not on the command line
    (resumed by running the command again)."""
    return (job.requested_by or "").startswith("@")
