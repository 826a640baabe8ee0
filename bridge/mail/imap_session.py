"""IMAP connection layer: TLS, login, capabilities, opening the folder, IDLE, UID commands."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aioimaplib

from bridge.core.tasks import wait_for
from bridge.mail.imap_wire import (
    FetchRecord,
    parse_fetch,
    printable,
    quote,
    response_text,
    uid_set,
    utf7,
)

log = logging.getLogger("passerelle.mail.imap")

TlsMode = Literal["tls", "starttls", "none"]
TLS_MODES: tuple[TlsMode, ...] = ("tls", "starttls", "none")

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
            self.bye = printable(match.group(1).decode("utf-8", "replace"))[:200]
        elif match := _WARNING_RE.match(line):
            self.warning = printable(match.group(0)[2:].decode("utf-8", "replace"))[:200]
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
class ImapSession:
    """One open connection: the client, and the UIDVALIDITY of the folder it has open."""

    client: _Client
    uidvalidity: int = 0

    @property
    def protocol(self) -> _WatchedProtocol:
        return self.client.protocol


# --- the folder -------------------------------------------------------------------------------


class ImapFolder:
    """Reaches one folder read-only: connects, waits for news (IDLE or poll), searches, fetches.

    One instance serves every connection of a watcher, so what it learns (the server refused
    IDLE, a warning woke IDLE recently) survives reconnecting.
    """

    def __init__(
        self,
        mailbox: str,
        config: MailboxConfig,
        *,
        idle_renew: float,
        poll_interval: float,
        connect_timeout: float,
    ) -> None:
        self._mailbox = mailbox
        self._config = config
        self._idle_renew = idle_renew
        self._poll_interval = poll_interval
        self._timeout = connect_timeout
        self._where = f"{config.host}:{config.port}"
        self._idling = False
        self._warning_woke_at: float | None = None
        self._idle_refused = False
        # "connected" is said at INFO once, and again after a failure: a polled mailbox
        # connects every poll interval, which is DEBUG.
        self._connected_said = False
        password = config.password
        self._secrets = sorted(
            {s for s in (password, quote(password)[1:-1]) if s}, key=len, reverse=True
        )

    @property
    def idling(self) -> bool:
        """Whether a connection is in IDLE right now, waiting for the server to announce mail."""
        return self._idling

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
    async def open(self) -> AsyncIterator[ImapSession]:
        """A logged-in connection with the folder open (read-only), closed on exit."""
        config = self._config
        context = self._ssl_context() if config.tls != "none" else None
        client = _Client(
            host=config.host,
            port=config.port,
            timeout=self._timeout,
            ssl_context=context if config.tls == "tls" else None,
        )
        session = ImapSession(client)
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
            log.log(
                logging.DEBUG if self._connected_said else logging.INFO,
                "IMAP %s: connected to %s (%s) as %s, folder %s, UIDVALIDITY %d",
                self._mailbox,
                self._where,
                config.tls,
                config.user,
                config.folder,
                session.uidvalidity,
            )
            self._connected_said = True
            yield session
        finally:
            self._idling = False
            await _close(client)

    async def _starttls(self, session: ImapSession, context: ssl.SSLContext) -> None:
        protocol = session.protocol
        if not session.client.has_capability("STARTTLS"):
            raise ImapTlsError("server does not offer STARTTLS; refusing to continue without TLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await self._call(session, wait_for(protocol.execute(command), self._timeout))
        if response.result != "OK":
            raise ImapTlsError(f"STARTTLS refused: {response_text(response)}")
        loop = asyncio.get_running_loop()
        try:
            transport = await wait_for(
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
        await self._call(session, wait_for(protocol.capability(), self._timeout))

    async def _login(self, session: ImapSession) -> None:
        config = self._config
        protocol = session.protocol
        # Not aioimaplib's login(): it sends the user name unquoted, and its DEBUG log masks
        # the password as given while the wire carries it quoted, so a password holding " or \
        # would be logged. Here the masked text is exactly what is sent.
        secret = quote(config.password)
        command = aioimaplib.Command(
            "LOGIN", protocol.new_tag(), quote(config.user), secret, loop=protocol.loop
        )
        response = await self._call(
            session, wait_for(protocol.execute(command, scrub=secret), self._timeout)
        )
        if response.result != "OK":
            raise ImapLoginError(f"login as {config.user} refused: {response_text(response)}")
        protocol.state = "AUTH"
        # The capabilities of the authenticated state (IDLE may only show up now).
        await self._call(session, wait_for(protocol.capability(), self._timeout))

    async def _examine(self, session: ImapSession) -> None:
        folder = self._config.folder
        response = await self._call(session, session.client.examine(quote(utf7(folder))))
        if response.result != "OK":
            raise ImapError(f"cannot open folder {folder!r}: {response_text(response)}")
        for line in response.lines:
            if isinstance(line, bytes) and (match := _UIDVALIDITY_RE.search(line)):
                session.uidvalidity = int(match.group(1))
                break
        else:
            raise ImapError(f"folder {folder!r} has no UIDVALIDITY")
        # aioimaplib runs EXAMINE as a plain command and leaves its state at AUTH, where it
        # refuses UID and IDLE; EXAMINE selected the folder (read-only) like SELECT would.
        session.protocol.state = "SELECTED"

    async def _call(self, session: ImapSession, awaitable: Awaitable[T]) -> T:
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

    def _lost(self, session: ImapSession) -> ImapConnectionLost:
        bye = session.protocol.bye
        return ImapConnectionLost(
            f"connection closed by the server (BYE {bye})" if bye else "connection lost"
        )

    # -- waiting for mail -----------------------------------------------------------------------

    async def wait_for_news(self, session: ImapSession) -> None:
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
                wait_for(
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
                self.reason(exc),
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
        response = await self._call(session, wait_for(idle, self._timeout))
        if response.result != "OK":
            raise ImapError(f"IDLE ended with {response.result}: {response_text(response)}")

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
        self, session: ImapSession, events: Sequence[asyncio.Event], seconds: float
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

    # -- UID commands on the open folder --------------------------------------------------------

    async def search_from(self, session: ImapSession, first: int) -> list[int]:
        """The UIDs >= ``first``, ascending."""
        response = await self._call(
            session, session.client.uid_search("UID", f"{first}:*", charset=None)
        )
        uids = _searched_uids(response)
        # "n:*" always includes the highest UID, even when it is below n.
        return sorted(uid for uid in uids if uid >= first)

    async def search_below(
        self, session: ImapSession, highest: int, since: str | None = None
    ) -> list[int]:
        """The UIDs <= ``highest`` (received since ``since``, an IMAP date such as
        1-Feb-2024, if given), ascending."""
        if highest < 1:
            return []
        criteria = ["UID", f"1:{highest}"] + (["SINCE", since] if since else [])
        response = await self._call(session, session.client.uid_search(*criteria, charset=None))
        uids = _searched_uids(response)
        return sorted(uid for uid in uids if uid <= highest)

    async def exists(self, session: ImapSession, uid: int) -> bool:
        response = await self._call(
            session, session.client.uid_search("UID", str(uid), charset=None)
        )
        if response.result != "OK":
            raise ImapError(f"UID SEARCH failed: {response_text(response)}")
        return any(str(uid).encode() in bytes(line).split() for line in response.lines[:-1])

    async def _uid_fetch(
        self, session: ImapSession, uids: Sequence[int], items: str
    ) -> list[FetchRecord]:
        response = await self._call(session, session.client.uid("fetch", uid_set(uids), items))
        if response.result == "BAD":
            raise ImapError(f"UID FETCH refused: {response_text(response)}")
        if response.result != "OK":
            log.warning(
                "IMAP %s: UID FETCH %s: %s",
                self._mailbox,
                response.result,
                response_text(response),
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

    async def sizes(self, session: ImapSession, uids: Sequence[int]) -> dict[int, int | None]:
        wanted = set(uids)
        sizes: dict[int, int | None] = {}
        for record in await self._uid_fetch(session, uids, "(UID RFC822.SIZE)"):
            if record.uid in wanted and sizes.get(record.uid) is None:
                sizes[record.uid] = record.size
        return sizes

    async def bodies(self, session: ImapSession, uids: Sequence[int]) -> dict[int, bytes]:
        # BODY.PEEK never sets \Seen (and the folder is open read-only anyway).
        wanted = set(uids)
        bodies: dict[int, bytes] = {}
        for record in await self._uid_fetch(session, uids, "BODY.PEEK[]"):
            if record.uid in wanted and record.body is not None and record.uid not in bodies:
                bodies[record.uid] = record.body
        return bodies

    # -- errors ---------------------------------------------------------------------------------

    def reason(self, exc: BaseException) -> str:
        """One line for health and logs: where, and what went wrong; secrets masked."""
        self._connected_said = False  # the next connection is news again
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
        return printable(f"{self._where}: {text}")[:500]


def expected_failure(exc: BaseException) -> bool:
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
                    await wait_for(idle.wait(), _CLOSE_TIMEOUT)
                if protocol.state in ("NONAUTH", "AUTH", "SELECTED"):
                    await wait_for(protocol.logout(), _CLOSE_TIMEOUT)
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
                await wait_for(protocol.lost.wait(), _CLOSE_TIMEOUT)
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


def _searched_uids(response: aioimaplib.Response) -> set[int]:
    """The UIDs of a UID SEARCH answer; a refusal or a token that is not a number is an error."""
    if response.result != "OK":
        raise ImapError(f"UID SEARCH failed: {response_text(response)}")
    uids: set[int] = set()
    for line in response.lines[:-1]:
        tokens = bytes(line).split()
        if tokens and tokens[0].upper() == b"SEARCH":
            tokens = tokens[1:]
        if not all(token.isdigit() for token in tokens):
            raise ImapError(f"unreadable UID SEARCH response: {printable(repr(line))}")
        uids.update(int(token) for token in tokens)
    return uids
