"""SMTP sending: every outcome mapped to delivered, retry or give up; a connection per mail,
or (`keep_open`) a few kept open between mails."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiosmtplib

from bridge.core.health import ComponentHealth

log = logging.getLogger("passerelle.mail.smtp")

TlsMode = Literal["tls", "starttls", "none"]
TLS_MODES: tuple[TlsMode, ...] = ("tls", "starttls", "none")

# SendResult.message is at most this long (it may be shown in a room).
MESSAGE_LIMIT = 300
# The outbox's retry schedule in seconds, by attempt (1-based); the last one repeats.
RETRY_SCHEDULE: tuple[float, ...] = (30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
RETRY_JITTER = 0.1
# QUIT after a finished transaction may take this long; its outcome changes nothing.
_QUIT_TIMEOUT = 5.0
# RFC 4954 §6: "530 5.7.0 Authentication required" is about our configuration, not the mail.
_AUTH_REQUIRED = 530
# A connection kept open after a mail (`keep_open`) is used again for at most this long after
# its last mail, and for at most this many mails (servers limit both; a reused connection the
# server closed meanwhile costs a new connection, never the mail).
KEEP_SECONDS = 5.0
KEEP_MAILS = 100
# "421 Service not available, closing transmission channel": the session ends, not the mail.
_CLOSING = 421

# What may not appear in an envelope address: we never send quoted local parts, comments,
# source routes or address literals, so none of these is needed (and each could break or
# extend the command line).
_ADDRESS_FORBIDDEN = re.compile(r'[\x00-\x20\x7f<>"(),:;\[\]\\]')
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")
_HELO_NAME = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f.:]+\]")


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to submit mail."""

    host: str
    port: int
    # "none" only when the config explicitly says so (loopback tests); never a fallback.
    # "starttls" is required when chosen: nothing is sent if the server does not offer it.
    tls: TlsMode
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    # An extra CA for self-signed agency servers; certificate verification is never turned off.
    ca_file: str | None = None
    # Per network operation (connect, TLS handshake, each command's reply), in seconds.
    timeout: float = 30.0
    # The name sent in EHLO; None: this host's FQDN (looked up once per sender).
    helo_name: str | None = None

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {self.tls!r}")
        if not self.host or _UNPRINTABLE.search(self.host):
            raise ValueError("host must be a non-empty printable name")
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password must be given together")
        if self.user is not None and (not self.user or _UNPRINTABLE.search(self.user)):
            raise ValueError("user must be a non-empty printable name")
        if self.helo_name is not None and (
            not self.helo_name or re.search(r"[\x00-\x20\x7f]", self.helo_name)
        ):
            raise ValueError("helo_name must be a non-empty name without spaces")


@dataclass(frozen=True)
class SendResult:
    """What happened to one mail.

    ``accepted``: the server took responsibility for it (for at least one recipient; refusals
    of the others are listed in ``message`` and ``refused``). ``permanent``: the server refused
    the mail itself with a 5xx reply (or it can never be sent as it is): never retry. Neither:
    retry later. ``message`` is one printable line of at most 300 characters that never holds
    the password, safe to show in a room.
    """

    accepted: bool
    permanent: bool
    code: int | None
    message: str
    # Recipients refused with a 5xx reply while the mail was accepted for the others.
    refused: tuple[str, ...] = ()


def retry_delay(attempt: int, schedule: Sequence[float] = RETRY_SCHEDULE) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based), ±10 % jitter.

    By default 30 s, 1 min, 2, 5, 10, 30 min, 1 h, 2 h, then every 4 h (the last repeats).
    """
    if attempt < 1:
        raise ValueError(f"attempt starts at 1, not {attempt}")
    if not schedule:
        raise ValueError("the schedule is empty")
    base = schedule[min(attempt, len(schedule)) - 1]
    return base * (1 + random.uniform(-RETRY_JITTER, RETRY_JITTER))


class _Stop(Exception):
    """Ends a transaction early with its result."""

    def __init__(self, result: SendResult) -> None:
        super().__init__(result.message)
        self.result = result


@dataclass
class _Kept:
    smtp: aiosmtplib.SMTP
    mails: int  # sent on it so far
    since: float  # monotonic time of its last mail


@dataclass
class _Progress:
    data: bool = False  # DATA was sent: the server may have the mail


class SmtpSender:
    """Submits mail to one SMTP server.

    By default each mail has a connection of its own. With `keep_open` N, up to N connections
    stay open after an accepted mail (KEEP_SECONDS, KEEP_MAILS) for the next ones: no TCP and
    TLS handshake, greeting, EHLO and login per mail, and the server spares a session per
    mail. A kept connection found closed, or closing (421), before DATA is replaced by a new
    one for the same mail; once DATA was sent, the outcome stands as with a new connection.
    Whoever gives `keep_open` calls `close()` when done.
    """

    def __init__(self, config: SmtpConfig, health: ComponentHealth, *, keep_open: int = 0) -> None:
        if config.tls not in TLS_MODES:  # a dataclass field can be bypassed; be sure
            raise ValueError(f"unknown tls mode {config.tls!r}")
        if keep_open < 0:
            raise ValueError("keep_open must be >= 0")
        self._keep_open = keep_open
        self._kept: list[_Kept] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._config = config
        self._health = health
        self._where = f"{config.host}:{config.port}"
        self._context: ssl.SSLContext | None = None
        self._helo_name = config.helo_name
        secrets: set[str] = set()
        if config.password:
            password = config.password.encode()
            user = (config.user or "").encode()
            secrets = {
                config.password,
                base64.b64encode(password).decode(),
                base64.b64encode(b"\0" + user + b"\0" + password).decode(),
            }
        self._secrets = sorted(secrets, key=len, reverse=True)

    async def send(self, raw: bytes, mail_from: str, recipients: Sequence[str]) -> SendResult:
        """Submit ``raw`` for ``recipients``; never raises for network or server trouble."""
        if isinstance(recipients, str):
            raise TypeError("recipients must be a sequence of addresses, not one string")
        try:
            sender = _envelope_address(mail_from, allow_empty=True)
            rcpts = list(dict.fromkeys(_envelope_address(r) for r in recipients))
            if not rcpts:
                raise ValueError("no recipients")
        except ValueError as exc:
            result = SendResult(False, True, None, self._line(f"not sent: {exc}"))
            log.debug("SMTP %s: %s", self._where, result.message)
            return result
        try:
            result = await self._transaction(raw, sender, rcpts)
        except _Stop as stop:  # before a connection was made
            result = stop.result
        if result.accepted or result.permanent:
            self._health.ok()
        else:
            self._health.failed(result.message)
        log.debug(
            "SMTP %s: %d bytes from <%s> to %d recipient(s): %s",
            self._where,
            len(raw),
            mail_from,
            len(rcpts),
            result.message,
        )
        return result

    # -- the transaction -------------------------------------------------------------------------

    async def _transaction(self, raw: bytes, sender: str, rcpts: list[str]) -> SendResult:
        kept = self._take_kept()
        if kept is not None:
            progress = _Progress()
            try:
                result = await self._outcome(self._submit(kept.smtp, raw, sender, rcpts, progress))
            except BaseException:
                kept.smtp.close()
                raise
            lost = result.code is None or result.code == _CLOSING
            if result.accepted or progress.data or not lost:
                await self._after(kept.smtp, kept.mails + 1, result)
                return result
            # Closed while it waited, or closing now: the mail never left; a new connection.
            kept.smtp.close()
            log.debug("SMTP %s: kept connection unusable (%s); a new one", self._where, result)
        config = self._config
        context = await self._tls_context() if config.tls != "none" else None
        if self._helo_name is None:
            fqdn = await asyncio.to_thread(socket.getfqdn)
            self._helo_name = fqdn if _HELO_NAME.fullmatch(fqdn) else "localhost"
        smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            timeout=config.timeout,
            local_hostname=self._helo_name,
            use_tls=config.tls == "tls",
            start_tls=False,  # done below, and required, when configured
            tls_context=context,
        )
        try:
            try:
                await self._connect(smtp, context)
                if config.user is not None:
                    await self._login(smtp)
            except _Stop as stop:
                result = stop.result
            else:
                result = await self._outcome(self._submit(smtp, raw, sender, rcpts, _Progress()))
        except BaseException:
            smtp.close()
            raise
        await self._after(smtp, 1, result)
        return result

    @staticmethod
    async def _outcome(steps: Awaitable[SendResult]) -> SendResult:
        """The result of `steps`, or the one a step stopped with."""
        try:
            return await steps
        except _Stop as stop:
            return stop.result

    async def _after(self, smtp: aiosmtplib.SMTP, mails: int, result: SendResult) -> None:
        """Keep the connection for the next mail, or QUIT (politely; its outcome changes
        nothing) and close it."""
        if (
            result.accepted
            and smtp.is_connected
            and mails < KEEP_MAILS
            and len(self._kept) < self._keep_open
        ):
            self._kept.append(_Kept(smtp, mails, time.monotonic()))
            if self._expiry is None:
                loop = asyncio.get_running_loop()
                self._expiry = loop.call_later(KEEP_SECONDS, self._expire)
            return
        try:
            if smtp.is_connected:
                with contextlib.suppress(Exception):
                    await smtp.quit(timeout=min(self._config.timeout, _QUIT_TIMEOUT))
        finally:
            smtp.close()

    def _take_kept(self) -> _Kept | None:
        """The most recently used kept connection still open and fresh, if any."""
        self._expire_old()
        while self._kept:
            kept = self._kept.pop()
            if kept.smtp.is_connected:
                return kept
            kept.smtp.close()
        return None

    def _expire_old(self) -> None:
        limit = time.monotonic() - KEEP_SECONDS
        old = [k for k in self._kept if k.since <= limit]
        self._kept = [k for k in self._kept if k.since > limit]
        for kept in old:
            kept.smtp.close()  # no QUIT: the server sees the connection end, which it allows

    def _expire(self) -> None:
        self._expiry = None
        self._expire_old()
        if self._kept:
            oldest = min(k.since for k in self._kept)
            delay = max(0.05, oldest + KEEP_SECONDS - time.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def close(self) -> None:
        """Close the kept connections (at once, without QUIT)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        kept, self._kept = self._kept, []
        for k in kept:
            k.smtp.close()

    async def _connect(self, smtp: aiosmtplib.SMTP, context: ssl.SSLContext | None) -> None:
        try:
            await smtp.connect()
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise self._transient(
                f"refused at connection: {_reply(exc.code, exc.message)}", _code(exc.code)
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._transient(_network_error("cannot connect", exc)) from None
        await self._ehlo(smtp)
        if self._config.tls != "starttls":
            return
        assert context is not None
        if not smtp.supports_extension("starttls"):
            raise self._transient("server does not offer STARTTLS; refusing to send without TLS")
        try:
            await smtp.starttls(server_hostname=self._config.host, tls_context=context)
        except aiosmtplib.SMTPResponseException as exc:
            raise self._transient(
                f"STARTTLS refused: {_reply(exc.code, exc.message)}", _code(exc.code)
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._transient(_network_error("STARTTLS failed", exc)) from None
        # RFC 3207 §4.2: forget what the server said before TLS and ask again.
        await self._ehlo(smtp)

    async def _ehlo(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            try:
                await smtp.ehlo()
            except aiosmtplib.SMTPHeloError as exc:
                if not smtp.is_connected or self._config.tls == "starttls":
                    raise
                log.debug("SMTP %s: EHLO refused (%s), trying HELO", self._where, exc.code)
                await smtp.helo()
        except aiosmtplib.SMTPHeloError as exc:
            raise self._transient(
                f"EHLO refused: {_reply(exc.code, exc.message)}", _code(exc.code)
            ) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._transient(_network_error("connection lost after greeting", exc)) from None

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        config = self._config
        assert config.user is not None
        assert config.password is not None
        if not smtp.supports_extension("auth"):
            raise self._transient("server does not offer AUTH; cannot log in")
        try:
            await smtp.login(config.user, config.password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            # About our configuration, not about the mail: keep it queued until fixed.
            raise self._transient(
                f"login as {config.user} refused: {_reply(exc.code, exc.message)}",
                _code(exc.code),
            ) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            raise self._transient(_network_error("connection lost during login", exc)) from None
        except aiosmtplib.SMTPException as exc:
            raise self._transient(f"cannot log in: {exc.message}") from None

    async def _submit(
        self,
        smtp: aiosmtplib.SMTP,
        raw: bytes,
        sender: str,
        rcpts: list[str],
        progress: _Progress,
    ) -> SendResult:
        utf8 = not all(address.isascii() for address in (sender, *rcpts))
        if utf8 and not smtp.supports_extension("smtputf8"):
            raise self._permanent(None, "not sent: non-ASCII address and no SMTPUTF8 support")
        encoding = "utf-8" if utf8 else "ascii"
        options: list[bytes] = []
        if smtp.supports_extension("size"):
            options.append(b"SIZE=%d" % _wire_size(raw))
        if smtp.supports_extension("8bitmime") and not raw.isascii():
            options.append(b"BODY=8BITMIME")
        if utf8:
            options.append(b"SMTPUTF8")

        reply = await self._command(
            smtp, "MAIL FROM", b"MAIL", b"FROM:<" + sender.encode(encoding) + b">", *options
        )
        if not _ok(reply.code):
            rejected = f"sender <{sender}> refused: {_reply(reply.code, reply.message)}"
            if 500 <= reply.code < 600 and reply.code != _AUTH_REQUIRED:
                raise self._permanent(reply.code, rejected)
            raise self._transient(rejected, reply.code)

        accepted: list[str] = []
        deferred: list[tuple[str, aiosmtplib.SMTPResponse]] = []
        refused: list[tuple[str, aiosmtplib.SMTPResponse]] = []
        for rcpt in rcpts:
            reply = await self._command(
                smtp, "RCPT TO", b"RCPT", b"TO:<" + rcpt.encode(encoding) + b">"
            )
            if _ok(reply.code):
                accepted.append(rcpt)
            elif 500 <= reply.code < 600:
                refused.append((rcpt, reply))
            else:
                deferred.append((rcpt, reply))
        refusals = "; ".join(
            f"<{rcpt}> {_reply(reply.code, reply.message)}" for rcpt, reply in refused + deferred
        )
        if deferred:
            # The mail is one unit: sending it to some now and all again later would duplicate.
            await self._reset(smtp)
            raise self._transient(f"recipients deferred: {refusals}", deferred[0][1].code)
        if not accepted:
            await self._reset(smtp)
            raise self._permanent(refused[0][1].code, f"all recipients refused: {refusals}")

        progress.data = True
        try:
            reply = await smtp.data(raw)
        except aiosmtplib.SMTPDataError as exc:
            rejected = f"message refused: {_reply(exc.code, exc.message)}"
            if 500 <= exc.code < 600:
                raise self._permanent(exc.code, rejected) from None
            raise self._transient(rejected, exc.code) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            # The server may or may not have the mail: retrying may deliver it twice.
            raise self._transient(_network_error("connection lost during DATA", exc)) from None
        text = f"accepted by {self._where}: {_reply(reply.code, reply.message)}"
        if refused:
            text += f"; refused: {refusals}"
        return SendResult(
            True, False, reply.code, self._line(text), tuple(rcpt for rcpt, _ in refused)
        )

    async def _command(
        self, smtp: aiosmtplib.SMTP, name: str, *args: bytes
    ) -> aiosmtplib.SMTPResponse:
        try:
            return await smtp.execute_command(*args)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise self._transient(_network_error(f"connection lost at {name}", exc)) from None

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        with contextlib.suppress(Exception):
            await smtp.execute_command(b"RSET", timeout=min(self._config.timeout, _QUIT_TIMEOUT))

    # -- helpers ---------------------------------------------------------------------------------

    async def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            try:
                self._context = await asyncio.to_thread(_make_tls_context, self._config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise self._transient(
                    f"cannot load ca_file {self._config.ca_file}: {exc}"
                ) from None
        return self._context

    def _line(self, text: str) -> str:
        """One printable line, secrets masked, at most MESSAGE_LIMIT characters."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _UNPRINTABLE.sub(" ", text.replace("\r\n", " / ").replace("\n", " / "))
        if len(text) > MESSAGE_LIMIT:
            text = text[: MESSAGE_LIMIT - 1] + "…"
        return text

    def _transient(self, text: str, code: int | None = None) -> _Stop:
        return _Stop(SendResult(False, False, code, self._line(f"SMTP {self._where}: {text}")))

    def _permanent(self, code: int | None, text: str) -> _Stop:
        return _Stop(SendResult(False, True, code, self._line(f"SMTP {self._where}: {text}")))


def _make_tls_context(ca_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _envelope_address(address: str, *, allow_empty: bool = False) -> str:
    """``address`` as it goes between < and > on MAIL FROM / RCPT TO, or ValueError."""
    if not isinstance(address, str):
        raise ValueError("address is not a string")
    if address == "" and allow_empty:
        return address
    shown = _UNPRINTABLE.sub("?", address)[:80]
    if len(address) > 254 or _ADDRESS_FORBIDDEN.search(address):
        raise ValueError(f"unusable envelope address {shown!r}")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or "@" in local:
        raise ValueError(f"unusable envelope address {shown!r}")
    return address


def _wire_size(raw: bytes) -> int:
    """The size announced in MAIL FROM (RFC 1870): the message with CRLF line endings."""
    return len(_LINE_ENDINGS.sub(b"\r\n", raw)) + (0 if raw.endswith((b"\n", b"\r")) else 2)


def _code(code: int) -> int | None:
    """A reply code for SendResult; None for aiosmtplib's -1 (no valid reply)."""
    return code if code >= 0 else None


def _ok(code: int) -> bool:
    return 200 <= code < 300


def _reply(code: int, message: str) -> str:
    return f"{code} {message}".strip() if code >= 0 else f"bad reply: {message}"


def _network_error(what: str, exc: BaseException) -> str:
    """A short reason for a failure of the connection, TLS named as such."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 5:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"{what}: TLS certificate rejected: {error.verify_message or error.reason}"
        if isinstance(error, ssl.SSLError):
            return f"{what}: TLS handshake failed ({error.reason or error}); is this a TLS port?"
    for error in chain:
        if isinstance(error, ConnectionRefusedError):
            return f"{what}: connection refused"
        if isinstance(error, TimeoutError):
            return f"{what}: timed out"
    for error in chain:
        if isinstance(error, OSError) and error.strerror:
            return f"{what}: {error.strerror}"
    if isinstance(exc, aiosmtplib.SMTPException):
        return f"{what}: {exc.message}"
    return f"{what}: {type(exc).__name__}: {exc}"
