"""IMAP ingestion: watch one mailbox folder and hand every new mail to the store exactly once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import aioimaplib

from bridge.core.backoff import Backoff
from bridge.core.health import ComponentHealth

log = logging.getLogger("passerelle.mail.imap")

TlsMode = Literal["tls", "starttls", "none"]
TLS_MODES: tuple[TlsMode, ...] = ("tls", "starttls", "none")

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
# How long closing a connection may take (IDLE DONE, LOGOUT, TCP/TLS close), each.
_CLOSE_TIMEOUT = 2.0
# An untagged NO/BAD ends IDLE for a fresh look at the folder at most this often.
_WARNING_WAKE_INTERVAL = 60.0

# aioimaplib strips "* " before it routes untagged lines; the hook below sees them unstripped.
_EXISTS_RE = re.compile(rb"^\* (\d+) EXISTS\b", re.IGNORECASE)
_EXPUNGE_RE = re.compile(rb"^\* (\d+) EXPUNGE\b", re.IGNORECASE)
_BYE_RE = re.compile(rb"^\* BYE\b ?(.*)$", re.IGNORECASE)
_WARNING_RE = re.compile(rb"^\* (NO|BAD)\b ?(.*)$", re.IGNORECASE)
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_FETCH_START_RE = re.compile(rb"^(\d+) FETCH[ (]", re.IGNORECASE)
_LOOSE_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_LITERAL_RE = re.compile(rb"\{(\d+)\}$")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")

if not hasattr(aioimaplib.IMAP4ClientProtocol, "_untagged_response"):  # pragma: no cover
    raise ImportError("aioimaplib changed: IMAP4ClientProtocol._untagged_response is gone")

T = TypeVar("T")


@dataclass(frozen=True)
class MailboxConfig:
    """Where and how to reach one IMAP folder."""

    host: str
    port: int
    # "none" only when the config explicitly says so (loopback tests); never a fallback.
    tls: TlsMode
    user: str
    password: str = field(repr=False)
    folder: str = "INBOX"
    # An extra CA for self-signed agency servers; certificate verification is never turned off.
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.tls!r}")


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
class BaselineStore(MailboxStore, Protocol):
    """A store that wants a new mailbox to start from its current end (optional)."""

    async def needs_baseline(self, mailbox: str) -> bool: ...

    async def set_baseline(self, mailbox: str, uidvalidity: int, uid: int) -> None: ...


class ImapError(Exception):
    """The IMAP side failed; str() is safe to log and show (never a password)."""


class ImapTlsError(ImapError):
    """TLS could not be set up; the watcher never falls back to cleartext."""


class ImapLoginError(ImapError):
    """The server refused the credentials."""


class ImapConnectionLost(ImapError):
    """The server closed the connection (or it broke) while we used it."""


# --- aioimaplib hooks -------------------------------------------------------------------------


class _WatchedProtocol(aioimaplib.IMAP4ClientProtocol):  # type: ignore[misc]
    """aioimaplib's protocol, plus events for new mail (EXISTS) and for the connection's end.

    aioimaplib routes an untagged EXISTS only to a pending IDLE or NOOP and drops it otherwise
    (during UID SEARCH or UID FETCH, say), and it never fails pending commands when the
    connection is lost: they hang until their timeout. Both are observed here instead, and
    so are untagged NO/BAD: Dovecot reports a folder rebuilt under an open session (new
    UIDVALIDITY) that way while in IDLE, and only disconnects at the next command.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, conn_lost_cb: Any = None) -> None:
        super().__init__(loop, conn_lost_cb)
        self.news = asyncio.Event()
        self.warned = asyncio.Event()
        self.lost = asyncio.Event()
        self.bye: str | None = None
        self.warning: str | None = None

    def _untagged_response(self, line: bytes) -> Any:
        if _EXISTS_RE.match(line):
            self.news.set()
        elif match := _EXPUNGE_RE.match(line):
            log.debug("server reports message %s expunged", match.group(1).decode())
        elif match := _BYE_RE.match(line):
            self.bye = _printable(match.group(1).decode("utf-8", "replace"))[:200]
        elif match := _WARNING_RE.match(line):
            self.warning = _printable(match.group(0)[2:].decode("utf-8", "replace"))[:200]
            self.warned.set()
        return super()._untagged_response(line)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()
        super().connection_lost(exc)


class _Client(aioimaplib.IMAP4):  # type: ignore[misc]
    """aioimaplib's client on a `_WatchedProtocol`.

    IMAP4_SSL is not used for "tls": it drops ``conn_lost_cb`` and only differs from IMAP4 by
    the SSL context it passes to ``create_connection``, which is given explicitly here.
    """

    protocol: _WatchedProtocol
    connect_task: asyncio.Task[Any]

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        loop = loop if loop is not None else asyncio.get_running_loop()
        protocol = _WatchedProtocol(loop, conn_lost_cb)
        self.protocol = protocol
        self.connect_task = self._client_task = loop.create_task(
            loop.create_connection(lambda: protocol, host, port, ssl=ssl_context)
        )


@dataclass
class _Session:
    client: _Client
    uidvalidity: int = 0

    @property
    def protocol(self) -> _WatchedProtocol:
        return self.client.protocol


# --- the watcher ------------------------------------------------------------------------------


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
        self._config = config
        self._store = store
        self._health = health
        self._max_size = max_size
        self._idle_renew = idle_renew
        self._poll_interval = poll_interval
        self._batch = min(batch, _MAX_BATCH)
        self._batch_bytes = max(max_size, _BATCH_BYTES)
        self._timeout = connect_timeout
        self._where = f"{config.host}:{config.port}"
        self._failures: dict[tuple[int, int], int] = {}
        self._idling = False
        self._warning_woke_at: float | None = None
        self._idle_refused = False
        password = config.password
        self._secrets = sorted(
            {s for s in (password, _quote(password)[1:-1]) if s}, key=len, reverse=True
        )

    @property
    def idling(self) -> bool:
        """Whether the watcher is in IDLE right now, waiting for the server to announce mail."""
        return self._idling

    # -- public entry points --------------------------------------------------------------------

    async def run(self) -> None:
        """Watch forever (until cancelled): sync, then IDLE or poll; reconnect on any failure."""
        backoff = Backoff(initial=BACKOFF_INITIAL, maximum=BACKOFF_MAXIMUM)
        while True:
            try:
                async with self._open() as session:
                    while True:
                        await self._sync(session)
                        self._health.ok()
                        backoff.reset()
                        await self._wait_for_news(session)
            except Exception as exc:
                reason = self._reason(exc)
                self._health.failed(reason)
                delay = backoff.next_delay()
                if _expected(exc):
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
            async with self._open() as session:
                stored = await self._sync(session)
        except ImapError as exc:
            self._health.failed(self._reason(exc))
            raise
        except Exception as exc:
            reason = self._reason(exc)
            self._health.failed(reason)
            if _expected(exc):
                # aioimaplib's exception texts may quote a command, arguments included.
                raise ImapError(reason) from None
            raise
        self._health.ok()
        return stored

    # -- connection -----------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._config.ca_file:
            try:
                context.load_verify_locations(cafile=self._config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ImapTlsError(f"cannot load ca_file {self._config.ca_file}: {exc}") from None
        return context

    @contextlib.asynccontextmanager
    async def _open(self) -> AsyncIterator[_Session]:
        """A logged-in connection with the folder open (read-only), closed on exit."""
        config = self._config
        context = self._ssl_context() if config.tls != "none" else None
        client = _Client(
            host=config.host,
            port=config.port,
            timeout=self._timeout,
            ssl_context=context if config.tls == "tls" else None,
        )
        session = _Session(client)
        try:
            try:
                await client.wait_hello_from_server()
            except ssl.SSLCertVerificationError as exc:
                raise ImapTlsError(
                    f"TLS certificate rejected: {exc.verify_message or exc.reason}"
                ) from None
            except ssl.SSLError as exc:
                raise ImapTlsError(
                    f"TLS handshake failed ({exc.reason or exc}); is this a TLS port?"
                ) from None
            except TimeoutError:
                raise ImapError(f"no IMAP greeting within {self._timeout:g} s") from None
            except OSError as exc:
                raise ImapError(f"cannot connect: {exc.strerror or exc}") from None
            _keepalive(client.protocol.transport)
            if config.tls == "starttls":
                assert context is not None
                await self._starttls(session, context)
            await self._login(session)
            await self._examine(session)
            log.info(
                "IMAP %s: connected to %s (%s) as %s, folder %s, UIDVALIDITY %d",
                self._mailbox,
                self._where,
                config.tls,
                config.user,
                config.folder,
                session.uidvalidity,
            )
            yield session
        finally:
            self._idling = False
            await _close(client)

    async def _starttls(self, session: _Session, context: ssl.SSLContext) -> None:
        protocol = session.protocol
        if not session.client.has_capability("STARTTLS"):
            raise ImapTlsError("server does not offer STARTTLS; refusing to continue without TLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await self._call(
            session, asyncio.wait_for(protocol.execute(command), self._timeout)
        )
        if response.result != "OK":
            raise ImapTlsError(f"STARTTLS refused: {_text(response)}")
        loop = asyncio.get_running_loop()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(
                    protocol.transport, protocol, context, server_hostname=self._config.host
                ),
                self._timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            raise ImapTlsError(
                f"TLS certificate rejected: {exc.verify_message or exc.reason}"
            ) from None
        except ssl.SSLError as exc:
            raise ImapTlsError(
                f"TLS handshake after STARTTLS failed: {exc.reason or exc}"
            ) from None
        protocol.transport = transport
        # What the server said before TLS is not to be trusted (RFC 3501 §6.2.1): ask again.
        protocol.capabilities = set()
        await self._call(session, asyncio.wait_for(protocol.capability(), self._timeout))

    async def _login(self, session: _Session) -> None:
        config = self._config
        protocol = session.protocol
        # Not aioimaplib's login(): it sends the user name unquoted, and its DEBUG log masks
        # the password as given while the wire carries it quoted, so a password holding " or \
        # would be logged. Here the masked text is exactly what is sent.
        secret = _quote(config.password)
        command = aioimaplib.Command(
            "LOGIN", protocol.new_tag(), _quote(config.user), secret, loop=protocol.loop
        )
        response = await self._call(
            session, asyncio.wait_for(protocol.execute(command, scrub=secret), self._timeout)
        )
        if response.result != "OK":
            raise ImapLoginError(f"login as {config.user} refused: {_text(response)}")
        protocol.state = "AUTH"
        # The capabilities of the authenticated state (IDLE may only show up now).
        await self._call(session, asyncio.wait_for(protocol.capability(), self._timeout))

    async def _examine(self, session: _Session) -> None:
        folder = self._config.folder
        response = await self._call(session, session.client.examine(_quote(_utf7(folder))))
        if response.result != "OK":
            raise ImapError(f"cannot open folder {folder!r}: {_text(response)}")
        for line in response.lines:
            if isinstance(line, bytes) and (match := _UIDVALIDITY_RE.search(line)):
                session.uidvalidity = int(match.group(1))
                break
        else:
            raise ImapError(f"folder {folder!r} has no UIDVALIDITY")
        # aioimaplib runs EXAMINE as a plain command and leaves its state at AUTH, where it
        # refuses UID and IDLE; EXAMINE selected the folder (read-only) like SELECT would.
        session.protocol.state = "SELECTED"

    async def _call(self, session: _Session, awaitable: Awaitable[T]) -> T:
        """Await an aioimaplib call, failing at once if the connection is lost meanwhile."""
        lost = session.protocol.lost
        task = asyncio.ensure_future(awaitable)
        if not lost.is_set():
            waiter = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
        if task.done() and not task.cancelled():
            return task.result()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        raise self._lost(session)

    def _lost(self, session: _Session) -> ImapConnectionLost:
        bye = session.protocol.bye
        return ImapConnectionLost(
            f"connection closed by the server (BYE {bye})" if bye else "connection lost"
        )

    # -- waiting for mail -----------------------------------------------------------------------

    async def _wait_for_news(self, session: _Session) -> None:
        """Return when new mail may be there: EXISTS, IDLE renewal or poll interval."""
        protocol = session.protocol
        if protocol.news.is_set():  # announced while we were busy with other commands
            return
        if self._idle_refused or not session.client.has_capability("IDLE"):
            await self._wait_events(session, (), self._poll_interval)
            return
        while not protocol.idle_queue.empty():  # aioimaplib's copy of past pushes; unused
            protocol.idle_queue.get_nowait()
        try:
            # aioimaplib's own renewal timer (it only wakes wait_server_push) is set past ours.
            idle = await self._call(
                session,
                asyncio.wait_for(
                    session.client.idle_start(timeout=self._idle_renew + self._timeout),
                    self._timeout,
                ),
            )
        except aioimaplib.Abort as exc:
            if protocol.has_pending_idle_command():
                raise
            # The server announced IDLE and then refused it: poll from now on.
            log.warning(
                "IMAP %s: IDLE refused (%s); polling every %g s instead",
                self._mailbox,
                self._reason(exc),
                self._poll_interval,
            )
            self._idle_refused = True
            return
        self._idling = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._idle_renew
        try:
            while (remaining := deadline - loop.time()) > 0:
                await self._wait_events(session, (protocol.news, protocol.warned), remaining)
                if protocol.news.is_set() or (
                    protocol.warned.is_set() and self._wake_for_warning(protocol)
                ):
                    break
                protocol.warned.clear()
        finally:
            self._idling = False
        session.client.idle_done()
        response = await self._call(session, asyncio.wait_for(idle, self._timeout))
        if response.result != "OK":
            raise ImapError(f"IDLE ended with {response.result}: {_text(response)}")

    def _wake_for_warning(self, protocol: _WatchedProtocol) -> bool:
        """Whether an untagged NO/BAD should end IDLE now (at most once a minute)."""
        now = asyncio.get_running_loop().time()
        wake = (
            self._warning_woke_at is None or now - self._warning_woke_at >= _WARNING_WAKE_INTERVAL
        )
        log.warning(
            "IMAP %s: server says %s%s",
            self._mailbox,
            protocol.warning,
            "; looking at the folder again" if wake else "",
        )
        if wake:
            self._warning_woke_at = now
        return wake

    async def _wait_events(
        self, session: _Session, events: Sequence[asyncio.Event], seconds: float
    ) -> None:
        """Wait for one of ``events`` or ``seconds``; raise if the connection is lost first."""
        lost = session.protocol.lost
        waiters = {asyncio.ensure_future(event.wait()) for event in (lost, *events)}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if lost.is_set():
            raise self._lost(session)

    # -- fetching -------------------------------------------------------------------------------

    async def _sync(self, session: _Session) -> int:
        """Store every mail above the resume point, in UID order; return how many were stored."""
        session.protocol.news.clear()  # an EXISTS from now on means: look again
        session.protocol.warned.clear()
        uidvalidity = session.uidvalidity
        if isinstance(self._store, BaselineStore) and await self._store.needs_baseline(
            self._mailbox
        ):
            # A new link posts what arrives from now on, not the mailbox's whole history.
            existing = await self._search_from(session, 1)
            highest = existing[-1] if existing else 0
            await self._store.set_baseline(self._mailbox, uidvalidity, highest)
            log.info("IMAP %s: new link starts after UID %d", self._mailbox, highest)
        first = await self._store.resume_point(self._mailbox, uidvalidity) + 1
        uids = await self._search_from(session, first)
        if not uids:
            return 0
        log.debug("IMAP %s: %d new UIDs from %d", self._mailbox, len(uids), first)
        stored = 0
        for window in _chunks(uids, _SIZE_WINDOW):
            sizes = await self._sizes(session, window)
            for group in self._groups([(uid, sizes.get(uid)) for uid in window]):
                stored += await self._deliver_group(session, group)
        if stored:
            log.info("IMAP %s: stored %d new mail(s)", self._mailbox, stored)
        return stored

    def _groups(
        self, entries: list[tuple[int, int | None]]
    ) -> Iterator[list[tuple[int, int | None]]]:
        """Consecutive runs of at most ``batch`` mails (and about ``_batch_bytes`` of bodies)."""
        group: list[tuple[int, int | None]] = []
        total = 0
        for uid, size in entries:
            weight = size if size is not None and size <= self._max_size else 0
            if group and (len(group) >= self._batch or total + weight > self._batch_bytes):
                yield group
                group, total = [], 0
            group.append((uid, size))
            total += weight
        if group:
            yield group

    async def _deliver_group(self, session: _Session, group: list[tuple[int, int | None]]) -> int:
        wanted = [uid for uid, size in group if size is not None and size <= self._max_size]
        bodies = await self._bodies(session, wanted) if wanted else {}
        stored = 0
        for uid, size in group:
            if await self._deliver(session, uid, size, bodies.get(uid)):
                stored += 1
        if stored:
            self._store.notify()
        return stored

    async def _deliver(
        self, session: _Session, uid: int, size: int | None, body: bytes | None
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
            if not await self._exists(session, uid):
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
                size = (await self._sizes(session, [uid])).get(uid)
            body = None
            if size is not None and size <= self._max_size:
                body = (await self._bodies(session, [uid])).get(uid)

    async def _search_from(self, session: _Session, first: int) -> list[int]:
        """The UIDs >= ``first``, ascending."""
        response = await self._call(
            session, session.client.uid_search("UID", f"{first}:*", charset=None)
        )
        if response.result != "OK":
            raise ImapError(f"UID SEARCH failed: {_text(response)}")
        uids: set[int] = set()
        for line in response.lines[:-1]:
            tokens = bytes(line).split()
            if tokens and tokens[0].upper() == b"SEARCH":
                tokens = tokens[1:]
            if not all(token.isdigit() for token in tokens):
                raise ImapError(f"unreadable UID SEARCH response: {_printable(repr(line))}")
            uids.update(int(token) for token in tokens)
        # "n:*" always includes the highest UID, even when it is below n.
        return sorted(uid for uid in uids if uid >= first)

    async def _exists(self, session: _Session, uid: int) -> bool:
        response = await self._call(
            session, session.client.uid_search("UID", str(uid), charset=None)
        )
        if response.result != "OK":
            raise ImapError(f"UID SEARCH failed: {_text(response)}")
        return any(str(uid).encode() in bytes(line).split() for line in response.lines[:-1])

    async def _uid_fetch(
        self, session: _Session, uids: Sequence[int], items: str
    ) -> list[FetchRecord]:
        response = await self._call(session, session.client.uid("fetch", _uid_set(uids), items))
        if response.result == "BAD":
            raise ImapError(f"UID FETCH refused: {_text(response)}")
        if response.result != "OK":
            log.warning(
                "IMAP %s: UID FETCH %s: %s", self._mailbox, response.result, _text(response)
            )
        records = parse_fetch(response.lines[:-1])
        for record in records:
            if record.error is not None:
                log.warning(
                    "IMAP %s: unreadable FETCH response for UID %s: %s",
                    self._mailbox,
                    record.uid if record.uid is not None else "?",
                    record.error,
                )
        return records

    async def _sizes(self, session: _Session, uids: Sequence[int]) -> dict[int, int | None]:
        wanted = set(uids)
        sizes: dict[int, int | None] = {}
        for record in await self._uid_fetch(session, uids, "(UID RFC822.SIZE)"):
            if record.uid in wanted and sizes.get(record.uid) is None:
                sizes[record.uid] = record.size
        return sizes

    async def _bodies(self, session: _Session, uids: Sequence[int]) -> dict[int, bytes]:
        # BODY.PEEK never sets \Seen (and the folder is open read-only anyway).
        wanted = set(uids)
        bodies: dict[int, bytes] = {}
        for record in await self._uid_fetch(session, uids, "BODY.PEEK[]"):
            if record.uid in wanted and record.body is not None and record.uid not in bodies:
                bodies[record.uid] = record.body
        return bodies

    # -- errors ---------------------------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        """One line for health and logs: where, and what went wrong; secrets masked."""
        if isinstance(exc, ImapError):
            text = str(exc)
        elif isinstance(exc, aioimaplib.CommandTimeout):
            # str() of this one is the command, arguments included.
            text = "IMAP command timed out"
        elif isinstance(exc, aioimaplib.AioImapException):
            text = f"IMAP protocol error: {exc}"
        elif isinstance(exc, TimeoutError):
            text = "timed out"
        elif isinstance(exc, OSError):
            text = f"connection error: {exc.strerror or exc}"
        else:
            text = f"{type(exc).__name__}: {exc}"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _printable(f"{self._where}: {text}")[:500]


def _expected(exc: BaseException) -> bool:
    """Failures of the network or the server, as opposed to bugs and store errors."""
    return isinstance(exc, ImapError | aioimaplib.AioImapException | OSError | TimeoutError)


async def _close(client: _Client) -> None:
    """Leave IDLE, LOGOUT if the connection still works, then close the socket for sure."""
    protocol = client.protocol
    try:
        if not client.connect_task.done():
            client.connect_task.cancel()
            await asyncio.wait({client.connect_task})
        if protocol.transport is not None and not protocol.lost.is_set():
            with contextlib.suppress(Exception):
                idle = protocol.pending_sync_command
                if protocol.has_pending_idle_command():
                    client.idle_done()
                    await asyncio.wait_for(idle.wait(), _CLOSE_TIMEOUT)
                if protocol.state in ("NONAUTH", "AUTH", "SELECTED"):
                    await asyncio.wait_for(protocol.logout(), _CLOSE_TIMEOUT)
    finally:
        for task in (*client.tasks, *protocol.tasks):
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is not None:
                # e.g. aioimaplib's greeting task after a "* BYE" greeting: seen, not logged
                log.debug("aioimaplib task failed: %r", type(task.exception()).__name__)
        transport = protocol.transport
        if transport is not None:
            transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(protocol.lost.wait(), _CLOSE_TIMEOUT)
            if not protocol.lost.is_set():
                transport.abort()
                await asyncio.sleep(0)


def _keepalive(transport: Any) -> None:
    """TCP keepalive, so a connection that silently died is noticed while in IDLE."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 20), ("TCP_KEEPCNT", 3)):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)


# --- small helpers ----------------------------------------------------------------------------


def _quote(text: str) -> str:
    """An IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _utf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + encoded.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def _uid_set(uids: Sequence[int]) -> str:
    """``1:3,7,9:10`` for [1, 2, 3, 7, 9, 10]."""
    parts: list[str] = []
    ordered = sorted(set(uids))
    start = prev = ordered[0]
    for uid in [*ordered[1:], None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub("?", text)


def _text(response: Any) -> str:
    """The server's text of a tagged response, short and printable."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    text = bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""
    return _printable(text)[:200] or "(no text)"


# --- FETCH response parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRecord:
    """One message's data from a FETCH response."""

    uid: int | None
    size: int | None = None
    body: bytes | None = None
    error: str | None = None


class _Unparseable(ValueError):
    pass


# A token is ("(", b"("), (")", b")"), ("atom", ...) or ("string", ...) (quoted or literal).
_Token = tuple[str, bytes]
_Value = _Token | list["_Value"]


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[FetchRecord]:
    """Parse aioimaplib's untagged FETCH lines (tagged text already removed).

    aioimaplib gives ``b"12 FETCH (UID 12 BODY[] {345}"``, then the literal as a bytearray, then
    the rest of the line (``b")"``); items may come in any order, and a server may add others
    (FLAGS) or send a separate FETCH for the same message. A record that cannot be parsed is
    returned with ``error`` set (and its UID if one can be seen) instead of raising.
    """
    records: list[FetchRecord] = []
    current: list[bytes | bytearray] = []
    for line in lines:
        if isinstance(line, bytes) and _FETCH_START_RE.match(line):
            if current:
                records.append(_parse_record(current))
            current = [line]
        elif current:
            current.append(line)
        else:
            log.debug("ignoring a line outside FETCH data: %.80r", bytes(line))
    if current:
        records.append(_parse_record(current))
    return records


def _parse_record(segments: list[bytes | bytearray]) -> FetchRecord:
    try:
        tokens = _tokenize(segments)
        if (
            len(tokens) < 3
            or tokens[0][0] != "atom"
            or not tokens[0][1].isdigit()
            or tokens[1][0] != "atom"
            or tokens[1][1].upper() != b"FETCH"
            or tokens[2][0] != "("
        ):
            raise _Unparseable("not a FETCH response")
        items, end = _parse_list(tokens, 2)
        if end != len(tokens):
            raise _Unparseable("data after the FETCH item list")
        if len(items) % 2:
            raise _Unparseable("odd number of FETCH items")
        fields: dict[bytes, _Value] = {}
        for name, value in zip(items[::2], items[1::2], strict=True):
            if isinstance(name, list) or name[0] != "atom":
                raise _Unparseable("FETCH item name is not an atom")
            fields.setdefault(name[1].upper(), value)
        uid = _number(fields.get(b"UID"), "UID")
        if uid is None:
            raise _Unparseable("no UID")
        body: bytes | None = None
        if b"BODY[]" in fields:
            value = fields[b"BODY[]"]
            if isinstance(value, list) or value[0] != "string":
                return FetchRecord(uid, error="BODY[] is not a string")
            body = value[1]
        return FetchRecord(uid, size=_number(fields.get(b"RFC822.SIZE"), "RFC822.SIZE"), body=body)
    except _Unparseable as exc:
        first = segments[0] if isinstance(segments[0], bytes) else b""
        match = _LOOSE_UID_RE.search(first)
        return FetchRecord(int(match.group(1)) if match else None, error=str(exc))


def _number(value: _Value | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list) or value[0] != "atom" or not value[1].isdigit():
        raise _Unparseable(f"{name} is not a number")
    return int(value[1])


def _parse_list(tokens: list[_Token], pos: int) -> tuple[list[_Value], int]:
    """Parse the parenthesized list starting at ``tokens[pos]``; return it and the next index."""
    items: list[_Value] = []
    pos += 1
    while pos < len(tokens):
        kind = tokens[pos][0]
        if kind == ")":
            return items, pos + 1
        if kind == "(":
            sub, pos = _parse_list(tokens, pos)
            items.append(sub)
        else:
            items.append(tokens[pos])
            pos += 1
    raise _Unparseable("unbalanced parentheses")


def _tokenize(segments: Sequence[bytes | bytearray]) -> list[_Token]:
    tokens: list[_Token] = []
    literal: int | None = None
    for segment in segments:
        if isinstance(segment, bytearray):
            if literal is None or len(segment) != literal:
                raise _Unparseable("literal of unexpected size")
            tokens.append(("string", bytes(segment)))
            literal = None
            continue
        if literal is not None:
            raise _Unparseable("announced literal is missing")
        text = bytes(segment)
        pos, end = 0, len(text)
        while pos < end:
            char = text[pos : pos + 1]
            if char == b" ":
                pos += 1
            elif char in (b"(", b")"):
                tokens.append((char.decode(), char))
                pos += 1
            elif char == b'"':
                value = bytearray()
                pos += 1
                while pos < end and text[pos : pos + 1] != b'"':
                    if text[pos : pos + 1] == b"\\":
                        pos += 1
                    value += text[pos : pos + 1]
                    pos += 1
                if pos >= end:
                    raise _Unparseable("unterminated quoted string")
                tokens.append(("string", bytes(value)))
                pos += 1
            elif char == b"{":
                match = _LITERAL_RE.match(text, pos)
                if match is None:
                    raise _Unparseable("malformed literal")
                literal = int(match.group(1))
                pos = end
            else:
                start, depth = pos, 0
                while pos < end:
                    char = text[pos : pos + 1]
                    if char == b"[":
                        depth += 1
                    elif char == b"]":
                        depth -= 1
                    elif depth <= 0 and char in (b" ", b"(", b")", b'"'):
                        break
                    pos += 1
                tokens.append(("atom", text[start:pos]))
    if literal is not None:
        raise _Unparseable("announced literal is missing")
    return tokens
