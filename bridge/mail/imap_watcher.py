"""IMAP watcher: store each new UID exactly once from the resume point; reconnect with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

from bridge.core.backoff import Backoff
from bridge.core.health import ComponentHealth
from bridge.mail.imap_session import (
    TLS_MODES,
    ImapError,
    ImapFolder,
    ImapSession,
    MailboxConfig,
    expected_failure,
)

log = logging.getLogger("passerelle.mail.imap")

# A UID whose fetch fails this many times in one process is quarantined with this size.
POISON_ATTEMPTS = 3
QUARANTINED_SIZE = -1

BACKOFF_INITIAL = 1.0
BACKOFF_MAXIMUM = 300.0

# RFC822.SIZE is asked for this many UIDs per command. aioimaplib re-scans every line of a
# response for each line received and parses a network read recursively, one frame per line:
# thousands of lines in one response are quadratic and can overflow the recursion limit.
_SIZE_WINDOW = 200
# Likewise for bodies (about three lines each): ``batch`` is capped at this.
_MAX_BATCH = 100
# A body batch also stops growing at this many bytes (or max_size, if larger).
_BATCH_BYTES = 16 * 1024 * 1024
# The first batch of a sync holds at most this many mails: the room's first mail is posted
# once its batch is stored, so a burst starts sooner; the next batches are ``batch`` long.
_FIRST_BATCH = 5


class MailboxStore(Protocol):
    """What the IMAP side needs from the bridge's database (the lead implements it)."""

    async def resume_point(self, mailbox: str, uidvalidity: int) -> int:
        """The highest UID already stored for (mailbox, uidvalidity); 0 if none or new."""
        ...

    async def store_raw(self, mailbox: str, uidvalidity: int, uid: int, raw: bytes) -> None:
        """Durable; idempotent for the same (mailbox, uidvalidity, uid)."""
        ...

    async def store_oversized(self, mailbox: str, uidvalidity: int, uid: int, size: int) -> None:
        """Record a mail that is not fetched: too big, or (size -1) quarantined as unfetchable."""
        ...

    def notify(self) -> None:
        """New raw mail stored: wake the worker."""
        ...


@runtime_checkable
class BatchStore(MailboxStore, Protocol):
    """A store that can keep several fetched mails in one commit (optional)."""

    async def store_raw_many(
        self, mailbox: str, uidvalidity: int, mails: list[tuple[int, bytes]]
    ) -> None:
        """Durable, all or none; idempotent like store_raw; `mails` in UID order."""
        ...


@runtime_checkable
class BaselineStore(MailboxStore, Protocol):
    """A store that wants a new mailbox to start from its current end (optional)."""

    async def needs_baseline(self, mailbox: str) -> bool: ...

    async def set_baseline(self, mailbox: str, uidvalidity: int, uid: int) -> None: ...


class ImapWatcher:
    """Keeps one folder's new mail flowing into the store, reconnecting forever."""

    def __init__(
        self,
        mailbox: str,
        config: MailboxConfig,
        store: MailboxStore,
        health: ComponentHealth,
        *,
        max_size: int,
        idle_renew: float = 29 * 60,
        poll_interval: float = 30.0,
        batch: int = 50,
        connect_timeout: float = 30.0,
    ) -> None:
        if config.tls not in TLS_MODES:  # a dataclass field can be bypassed; be sure
            raise ValueError(f"unknown tls mode {config.tls!r}")
        if max_size < 1 or batch < 1:
            raise ValueError("max_size and batch must be positive")
        if idle_renew <= 0 or poll_interval <= 0 or connect_timeout <= 0:
            raise ValueError("idle_renew, poll_interval and connect_timeout must be positive")
        self._mailbox = mailbox
        self._folder = ImapFolder(
            mailbox,
            config,
            idle_renew=idle_renew,
            poll_interval=poll_interval,
            connect_timeout=connect_timeout,
        )
        self._store = store
        self._health = health
        self._max_size = max_size
        self._batch = min(batch, _MAX_BATCH)
        self._batch_bytes = max(max_size, _BATCH_BYTES)
        self._failures: dict[tuple[int, int], int] = {}

    @property
    def idling(self) -> bool:
        """Whether the watcher is in IDLE right now, waiting for the server to announce mail."""
        return self._folder.idling

    # -- public entry points --------------------------------------------------------------------

    async def run(self) -> None:
        """Watch forever (until cancelled): sync, then IDLE or poll; reconnect on any failure."""
        backoff = Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAXIMUM)
        while True:
            try:
                async with self._folder.open() as session:
                    while True:
                        await self._sync(session)
                        self._health.ok()
                        backoff.reset()
                        await self._folder.wait_for_news(session)
            except Exception as exc:
                reason = self._folder.reason(exc)
                self._health.failed(reason)
                delay = backoff.next_delay()
                if expected_failure(exc):
                    log.warning(
                        "IMAP %s: %s; reconnecting in %.1f s", self._mailbox, reason, delay
                    )
                else:
                    log.error(
                        "IMAP %s: unexpected failure: %s; reconnecting in %.1f s",
                        self._mailbox,
                        reason,
                        delay,
                        exc_info=True,
                    )
                await asyncio.sleep(delay)

    async def sync_once(self) -> int:
        """Connect, store every new mail, disconnect; return how many mails were stored.

        Raises `ImapError` (or what the store raised) on failure.
        """
        try:
            async with self._folder.open() as session:
                stored = await self._sync(session)
        except ImapError as exc:
            self._health.failed(self._folder.reason(exc))
            raise
        except Exception as exc:
            reason = self._folder.reason(exc)
            self._health.failed(reason)
            if expected_failure(exc):
                # aioimaplib's exception texts may quote a command, arguments included.
                raise ImapError(reason) from None
            raise
        self._health.ok()
        return stored

    # -- fetching -------------------------------------------------------------------------------

    async def _sync(self, session: ImapSession) -> int:
        """Store every mail above the resume point, in UID order; return how many were stored."""
        session.protocol.news.clear()  # an EXISTS from now on means: look again
        session.protocol.warned.clear()
        uidvalidity = session.uidvalidity
        if isinstance(self._store, BaselineStore) and await self._store.needs_baseline(
            self._mailbox
        ):
            # A new link posts what arrives from now on, not the mailbox's whole history.
            existing = await self._folder.search_from(session, 1)
            highest = existing[-1] if existing else 0
            await self._store.set_baseline(self._mailbox, uidvalidity, highest)
            log.info("IMAP %s: new link starts after UID %d", self._mailbox, highest)
        first = await self._store.resume_point(self._mailbox, uidvalidity) + 1
        uids = await self._folder.search_from(session, first)
        if not uids:
            return 0
        log.debug("IMAP %s: %d new UIDs from %d", self._mailbox, len(uids), first)
        stored = 0
        for n, window in enumerate(_chunks(uids, _SIZE_WINDOW)):
            sizes = await self._folder.sizes(session, window)
            entries = [(uid, sizes.get(uid)) for uid in window]
            for group in self._groups(entries, first=n == 0):
                stored += await self._deliver_group(session, group)
        if stored:
            log.info("IMAP %s: stored %d new mail(s)", self._mailbox, stored)
        return stored

    def _groups(
        self, entries: list[tuple[int, int | None]], *, first: bool = False
    ) -> Iterator[list[tuple[int, int | None]]]:
        """Consecutive runs of at most ``batch`` mails (and about ``_batch_bytes`` of bodies);
        the sync's first run (`first`) of at most _FIRST_BATCH."""
        group: list[tuple[int, int | None]] = []
        total = 0
        limit = min(self._batch, _FIRST_BATCH) if first else self._batch
        for uid, size in entries:
            weight = size if size is not None and size <= self._max_size else 0
            if group and (len(group) >= limit or total + weight > self._batch_bytes):
                yield group
                group, total = [], 0
                limit = self._batch
            group.append((uid, size))
            total += weight
        if group:
            yield group

    async def _deliver_group(
        self, session: ImapSession, group: list[tuple[int, int | None]]
    ) -> int:
        wanted = [uid for uid, size in group if size is not None and size <= self._max_size]
        bodies = await self._folder.bodies(session, wanted) if wanted else {}
        stored = 0
        # Runs of plainly fetched mails are kept in one commit each; any other mail goes alone
        # and only after the run before it is kept, so the stored UIDs never skip one.
        run: list[tuple[int, bytes]] = []
        for uid, size in group:
            body = bodies.get(uid)
            if isinstance(self._store, BatchStore) and self._plain(size, body):
                assert body is not None
                run.append((uid, body))
                continue
            stored += await self._store_run(session, run)
            run = []
            if await self._deliver(session, uid, size, body):
                stored += 1
        stored += await self._store_run(session, run)
        if stored:
            self._store.notify()
        return stored

    def _plain(self, size: int | None, body: bytes | None) -> bool:
        """A mail whose size and body were read and are within the limit."""
        return (
            size is not None
            and size <= self._max_size
            and body is not None
            and len(body) <= self._max_size
        )

    async def _store_run(self, session: ImapSession, run: list[tuple[int, bytes]]) -> int:
        if not run:
            return 0
        assert isinstance(self._store, BatchStore)
        await self._store.store_raw_many(self._mailbox, session.uidvalidity, run)
        for uid, _ in run:
            self._failures.pop((session.uidvalidity, uid), None)
        log.debug("IMAP %s: stored UIDs %d-%d", self._mailbox, run[0][0], run[-1][0])
        return len(run)

    async def _deliver(
        self, session: ImapSession, uid: int, size: int | None, body: bytes | None
    ) -> bool:
        """Store one mail (or record it as oversized or quarantined); True if stored raw.

        A mail whose size or body cannot be read is retried alone on this connection; after
        POISON_ATTEMPTS failures in this process it is quarantined, so that one bad mail can
        neither block the mail after it nor be fetched forever.
        """
        mailbox, uidvalidity = self._mailbox, session.uidvalidity
        key = (uidvalidity, uid)
        while True:
            if body is not None and len(body) > self._max_size:
                size = len(body)  # the server under-reported RFC822.SIZE
            if size is not None and size > self._max_size:
                log.info(
                    "IMAP %s: UID %d is %d bytes, over the %d-byte limit: not fetched",
                    mailbox,
                    uid,
                    size,
                    self._max_size,
                )
                await self._store.store_oversized(mailbox, uidvalidity, uid, size)
                self._failures.pop(key, None)
                return False
            if size is not None and body is not None:
                await self._store.store_raw(mailbox, uidvalidity, uid, body)
                self._failures.pop(key, None)
                log.debug("IMAP %s: stored UID %d (%d bytes)", mailbox, uid, len(body))
                return True
            problem = "no RFC822.SIZE" if size is None else "no readable BODY[]"
            if not await self._folder.exists(session, uid):
                log.info("IMAP %s: UID %d was expunged before it could be fetched", mailbox, uid)
                self._failures.pop(key, None)
                return False
            attempts = self._failures[key] = self._failures.get(key, 0) + 1
            if attempts >= POISON_ATTEMPTS:
                log.error(
                    "IMAP %s: UID %d (UIDVALIDITY %d): %s after %d attempts; quarantined",
                    mailbox,
                    uid,
                    uidvalidity,
                    problem,
                    attempts,
                )
                await self._store.store_oversized(mailbox, uidvalidity, uid, QUARANTINED_SIZE)
                del self._failures[key]
                return False
            log.warning(
                "IMAP %s: UID %d: %s (attempt %d of %d); fetching it again",
                mailbox,
                uid,
                problem,
                attempts,
                POISON_ATTEMPTS,
            )
            if size is None:
                size = (await self._folder.sizes(session, [uid])).get(uid)
            body = None
            if size is not None and size <= self._max_size:
                body = (await self._folder.bodies(session, [uid])).get(uid)


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
