"""SmtpSender against real servers: a scripted aiosmtpd sink, and Postfix delivering to Dovecot."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from bridge.core.health import ComponentHealth
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.harness.postfix import PostfixServer
from bridge.mail.smtp import (
    MESSAGE_LIMIT,
    RETRY_SCHEDULE,
    SendResult,
    SmtpConfig,
    SmtpSender,
    retry_delay,
)

USER = "bridge-submit"
PASSWORD = "s3cret-Pa55word"
IMAP_PASSWORD = "imap-secret"
FROM = "bridge@agency.test"
TO = "list@lists.test"


# --- the sink -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    tls: bool
    login: bytes | None
    mail_options: tuple[str, ...] = ()


@dataclass
class ScriptedHandler:
    """An aiosmtpd handler that records what it accepts and answers as scripted.

    It runs in the controller's thread; the test thread scripts it between sends.
    """

    data_replies: list[str] = field(default_factory=list)  # used one per DATA, then 250
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    mail_reply: str | None = None
    drop_at_data: int = 0  # abort the connection (no reply) at the next N DATA commands
    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list)
    mail_commands: int = 0
    connections: int = 0  # connections accepted so far (see CountingSMTP)
    sessions: int = 0  # connections open right now
    # SMTP sessions between EHLO and QUIT right now: never more than the client has open
    # (counting connections instead can see an old one close after a new one opened).
    active: set[int] = field(default_factory=set)
    max_active: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(
        self, server: SMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self.lock:
            self.active.add(id(server))
            self.max_active = max(self.max_active, len(self.active))
        return responses

    async def handle_QUIT(self, server: SMTP, session: Any, envelope: Any) -> str:
        with self.lock:
            self.active.discard(id(server))
        return "221 Bye"

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            self.mail_commands += 1
            if self.mail_reply is not None:
                return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            reply = self.rcpt_replies.get(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        with self.lock:
            if self.drop_at_data:
                self.drop_at_data -= 1
                drop = True
            else:
                drop = False
                reply = self.data_replies.pop(0) if self.data_replies else None
        if drop:
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            await asyncio.sleep(5)  # cancelled by connection_lost; nothing is answered
            raise AssertionError("connection not lost")
        if reply is not None:
            return reply
        auth = session.auth_data
        with self.lock:
            self.messages.append(
                Received(
                    envelope.mail_from,
                    tuple(envelope.rcpt_tos),
                    envelope.original_content,
                    session.ssl is not None,
                    auth.login if isinstance(auth, LoginPassword) else None,
                    tuple(envelope.mail_options),
                )
            )
        return "250 2.0.0 queued"


class CountingSMTP(SMTP):
    """aiosmtpd's server, counting the connections open at once in its handler."""

    def connection_made(self, transport: Any) -> None:
        first = self.transport is None  # STARTTLS calls this again on the same connection
        super().connection_made(transport)
        if first:
            handler: ScriptedHandler = self.event_handler
            with handler.lock:
                handler.connections += 1
                handler.sessions += 1

    def connection_lost(self, error: Exception | None) -> None:
        handler: ScriptedHandler = self.event_handler
        with handler.lock:
            handler.sessions -= 1
            handler.active.discard(id(self))
        super().connection_lost(error)


class Sink(Controller):
    def factory(self) -> SMTP:
        return CountingSMTP(self.handler, **self.SMTP_kwargs)


def start_sink(
    handler: ScriptedHandler, port: int | None = None, **kwargs: Any
) -> tuple[Sink, int]:
    port = port or free_port()
    sink = Sink(handler, hostname="127.0.0.1", port=port, server_hostname="sink.test", **kwargs)
    sink.start()
    # Controller.start() opens a connection of its own to check the server; forget it.
    deadline = time.monotonic() + 5
    while handler.sessions and time.monotonic() < deadline:
        time.sleep(0.005)
    with handler.lock:
        handler.connections = handler.max_active = 0
    return sink, port


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    base = tmp_path_factory.mktemp("tls")
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out",
            str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*tls_files)
    return context


def make_message(subject: str = "Hello", body: str = "A reply written in Matrix.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = FROM
    msg["To"] = TO
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@agency.test>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def sender_for(port: int, **overrides: Any) -> tuple[SmtpSender, ComponentHealth]:
    config = replace(SmtpConfig("127.0.0.1", port, "none", timeout=5.0), **overrides)
    health = ComponentHealth("smtp")
    return SmtpSender(config, health), health


def up(health: ComponentHealth) -> bool:
    """health.reachable (read through a call: mypy would narrow the attribute)."""
    return health.reachable


async def wait_until(condition: Callable[[], bool], budget: float = 5.0) -> None:
    """For what the sink's thread does after the client is done (closing, say)."""
    deadline = time.monotonic() + budget
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def assert_one_line(result: SendResult) -> None:
    assert result.message
    assert len(result.message) <= MESSAGE_LIMIT
    assert "\n" not in result.message
    assert "\r" not in result.message
    assert result.message.isprintable()


# --- outcomes -----------------------------------------------------------------------------------


async def test_accepted(sink: int, handler: ScriptedHandler) -> None:
    sender, health = sender_for(sink)
    raw = make_message("accepted")
    result = await sender.send(raw, FROM, [TO])
    assert result.accepted
    assert not result.permanent
    assert result.code == 250
    assert "250 2.0.0 queued" in result.message
    assert_one_line(result)
    assert up(health)
    assert health.last_error is None
    [received] = handler.messages
    assert received.mail_from == FROM
    assert received.rcpt_tos == (TO,)
    assert received.content == raw
    assert handler.connections == 1
    await wait_until(lambda: handler.sessions == 0)  # QUIT closed it


async def test_tempfail_then_accepted_is_delivered_once(
    sink: int, handler: ScriptedHandler
) -> None:
    handler.data_replies = ["451 4.3.0 try later"]
    sender, health = sender_for(sink)
    raw = make_message("tempfail")
    first = await sender.send(raw, FROM, [TO])
    assert not first.accepted
    assert not first.permanent
    assert first.code == 451
    assert "451 4.3.0 try later" in first.message
    assert_one_line(first)
    assert not up(health)
    assert health.last_error == first.message
    assert handler.messages == []

    second = await sender.send(raw, FROM, [TO])
    assert second.accepted
    assert up(health)
    assert [m.content for m in handler.messages] == [raw]


async def test_rcpt_550_is_permanent(sink: int, handler: ScriptedHandler) -> None:
    handler.rcpt_replies[TO] = "550 5.1.1 no such user"
    sender, health = sender_for(sink)
    result = await sender.send(make_message(), FROM, [TO])
    assert not result.accepted
    assert result.permanent
    assert result.code == 550
    assert "550 5.1.1 no such user" in result.message
    assert TO in result.message
    assert_one_line(result)
    assert up(health)  # the server answered; the mail is what is wrong
    assert handler.messages == []


async def test_mail_from_5xx_and_data_5xx_are_permanent(
    sink: int, handler: ScriptedHandler
) -> None:
    sender, _ = sender_for(sink)
    handler.mail_reply = "553 5.7.1 sender not allowed"
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent, result.code) == (False, True, 553)
    assert "sender not allowed" in result.message

    handler.mail_reply = None
    handler.data_replies = ["554 5.6.0 message content rejected"]
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent, result.code) == (False, True, 554)
    assert "message content rejected" in result.message
    assert handler.messages == []


async def test_some_recipients_refused(sink: int, handler: ScriptedHandler) -> None:
    bad = "gone@lists.test"
    handler.rcpt_replies[bad] = "550 5.1.1 no such user"
    sender, _ = sender_for(sink)
    result = await sender.send(make_message(), FROM, [TO, bad])
    assert result.accepted
    assert not result.permanent
    assert result.code == 250
    assert result.refused == (bad,)
    assert bad in result.message
    assert "550 5.1.1 no such user" in result.message
    assert_one_line(result)
    [received] = handler.messages
    assert received.rcpt_tos == (TO,)


async def test_one_recipient_deferred_defers_the_whole_mail(
    sink: int, handler: ScriptedHandler
) -> None:
    slow = "greylisted@lists.test"
    handler.rcpt_replies[slow] = "450 4.2.0 greylisted, come back later"
    sender, _ = sender_for(sink)
    result = await sender.send(make_message(), FROM, [TO, slow])
    assert (result.accepted, result.permanent, result.code) == (False, False, 450)
    assert "greylisted" in result.message
    assert handler.messages == []  # no DATA: a retry must not duplicate it for TO


async def test_connection_dropped_at_data_is_transient(
    sink: int, handler: ScriptedHandler
) -> None:
    handler.drop_at_data = 1
    sender, health = sender_for(sink)
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent, result.code) == (False, False, None)
    assert "DATA" in result.message
    assert_one_line(result)
    assert not up(health)
    assert handler.messages == []
    assert (await sender.send(make_message(), FROM, [TO])).accepted


async def test_server_down_is_transient() -> None:
    sender, health = sender_for(free_port())  # nothing listens there
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent, result.code) == (False, False, None)
    assert "connection refused" in result.message
    assert_one_line(result)
    assert not up(health)
    assert health.last_error == result.message


async def test_unusable_envelope_is_refused_before_connecting(
    sink: int, handler: ScriptedHandler
) -> None:
    sender, health = sender_for(sink)
    for mail_from, rcpts in [
        (FROM, ["a@b.test>\r\nRCPT TO:<evil@b.test"]),
        (FROM, ["two words@b.test"]),
        ("<x@y.test>", [TO]),
        (FROM, ["no-at-sign"]),
        (FROM, []),
    ]:
        result = await sender.send(make_message(), mail_from, rcpts)
        assert (result.accepted, result.permanent, result.code) == (False, True, None)
        assert_one_line(result)
    assert handler.connections == 0
    assert health.checked_at is None  # says nothing about the server
    with pytest.raises(TypeError):
        await sender.send(make_message(), FROM, TO)


async def test_non_ascii_address_and_8bit_body(handler: ScriptedHandler) -> None:
    rcpt = "élise@lists.test"
    raw = make_message("8 bit").replace(b"A reply", "Une réponse".encode())
    assert not raw.isascii()
    controller, port = start_sink(handler)
    try:
        sender, _ = sender_for(port)
        result = await sender.send(raw, FROM, [rcpt])
        assert result.accepted, result.message
        [received] = handler.messages
        assert received.rcpt_tos == (rcpt,)
        assert received.content == raw
        assert {"SMTPUTF8", "BODY=8BITMIME"} <= set(received.mail_options)
        assert any(option.startswith("SIZE=") for option in received.mail_options)
    finally:
        controller.stop()

    handler.messages.clear()
    controller, port = start_sink(handler, enable_SMTPUTF8=False)
    try:
        sender, _ = sender_for(port)
        result = await sender.send(raw, FROM, [rcpt])
        assert (result.accepted, result.permanent) == (False, True)
        assert "SMTPUTF8" in result.message
        assert handler.mail_commands == 1  # the first server's only
    finally:
        controller.stop()


# --- TLS ----------------------------------------------------------------------------------------


async def test_starttls_required_but_not_offered(sink: int, handler: ScriptedHandler) -> None:
    sender, health = sender_for(sink, tls="starttls")
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent) == (False, False)
    assert "STARTTLS" in result.message
    assert not up(health)
    assert handler.mail_commands == 0  # not even the envelope went out in clear
    assert handler.messages == []


async def test_implicit_tls_against_plaintext_port(sink: int, handler: ScriptedHandler) -> None:
    sender, health = sender_for(sink, tls="tls")
    result = await sender.send(make_message(), FROM, [TO])
    assert (result.accepted, result.permanent, result.code) == (False, False, None)
    assert "TLS" in result.message
    assert_one_line(result)
    assert not up(health)
    assert handler.mail_commands == 0
    assert handler.messages == []


async def test_starttls_verifies_the_certificate(
    handler: ScriptedHandler, tls_files: tuple[Path, Path]
) -> None:
    controller, port = start_sink(
        handler, tls_context=server_context(tls_files), require_starttls=True
    )
    try:
        untrusted, _ = sender_for(port, tls="starttls")
        result = await untrusted.send(make_message(), FROM, [TO])
        assert (result.accepted, result.permanent) == (False, False)
        assert "certificate" in result.message
        assert handler.messages == []

        trusted, _ = sender_for(port, tls="starttls", ca_file=str(tls_files[0]))
        result = await trusted.send(make_message(), FROM, [TO])
        assert result.accepted, result.message
        [received] = handler.messages
        assert received.tls
    finally:
        controller.stop()


async def test_implicit_tls_with_ca_file(
    handler: ScriptedHandler, tls_files: tuple[Path, Path]
) -> None:
    controller, port = start_sink(handler, ssl_context=server_context(tls_files))
    try:
        sender, _ = sender_for(port, tls="tls", ca_file=str(tls_files[0]))
        result = await sender.send(make_message(), FROM, [TO])
        assert result.accepted, result.message
        assert len(handler.messages) == 1

        missing, _ = sender_for(port, tls="tls", ca_file=str(tls_files[0].with_name("nope")))
        result = await missing.send(make_message(), FROM, [TO])
        assert (result.accepted, result.permanent) == (False, False)
        assert "ca_file" in result.message
        assert len(handler.messages) == 1
    finally:
        controller.stop()


# --- AUTH ---------------------------------------------------------------------------------------


def authenticator(
    server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (
        USER.encode(),
        PASSWORD.encode(),
    )
    # handled=False: aiosmtpd answers 535 itself (with the default handled=True it says nothing).
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_auth(handler: ScriptedHandler, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    controller, port = start_sink(
        handler, authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    try:
        anonymous, _ = sender_for(port)
        result = await anonymous.send(make_message(), FROM, [TO])
        assert (result.accepted, result.permanent, result.code) == (False, False, 530)

        good, health = sender_for(port, user=USER, password=PASSWORD)
        result = await good.send(make_message(), FROM, [TO])
        assert result.accepted, result.message
        assert up(health)
        assert [m.login for m in handler.messages] == [USER.encode()]

        wrong = "wr0ng-Pa55word"
        bad, health = sender_for(port, user=USER, password=wrong)
        result = await bad.send(make_message(), FROM, [TO])
        assert not result.accepted
        assert not result.permanent  # a configuration problem: keep the mail queued
        assert result.code == 535
        assert USER in result.message
        assert_one_line(result)
        assert wrong not in result.message
        assert wrong not in (health.last_error or "")
        assert len(handler.messages) == 1
    finally:
        controller.stop()
    assert "Pa55word" not in repr(SmtpConfig("h", 25, "none", USER, PASSWORD))
    # The client never logs a password, at any level (aiosmtpd's own logger is the server's).
    ours = [r for r in caplog.records if not r.name.startswith("mail.log")]
    assert ours
    assert not any("Pa55word" in r.getMessage() for r in ours)


async def test_no_body_in_logs_above_debug(
    sink: int, handler: ScriptedHandler, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="passerelle")
    marker = f"body-marker-{uuid.uuid4().hex}"
    handler.data_replies = ["451 4.3.0 try later"]
    sender, _ = sender_for(sink)
    for _ in range(2):
        await sender.send(make_message(body=marker), FROM, [TO])
    assert not any(marker in r.getMessage() for r in caplog.records)


# --- the retry schedule -------------------------------------------------------------------------


def test_retry_delay_schedule() -> None:
    expected = [30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 14400, 14400]
    assert list(RETRY_SCHEDULE) == expected[:9]
    for attempt, base in enumerate(expected, start=1):
        delays = [retry_delay(attempt) for _ in range(200)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays), attempt
        assert len(set(delays)) > 1  # jittered
    assert retry_delay(1000) <= 14400 * 1.1
    with pytest.raises(ValueError, match="attempt"):
        retry_delay(0)


# --- Postfix → LMTP → Dovecot -------------------------------------------------------------------


async def test_postfix_delivers_to_dovecot(dovecot: DovecotServer, postfix: PostfixServer) -> None:
    mailbox = dovecot.add_user(f"smtp{uuid.uuid4().hex[:8]}", IMAP_PASSWORD)
    subject = f"outbox-{uuid.uuid4().hex[:8]}"
    raw = make_message(subject, "Sent through SmtpSender.\n")
    sender, health = sender_for(postfix.smtp_port)
    started = time.monotonic()
    result = await sender.send(raw, FROM, [mailbox])
    assert result.accepted, result.message
    assert result.code == 250
    assert up(health)
    deadline = time.monotonic() + 15
    async with dovecot.session(mailbox, IMAP_PASSWORD) as client:
        while True:
            response = await client.uid_search("HEADER", "Subject", f'"{subject}"', charset=None)
            assert response.result == "OK"
            if uids := response.lines[0].split():
                break
            assert time.monotonic() < deadline, "not delivered to Dovecot"
            await asyncio.sleep(0.05)
            await client.noop()
        fetched = await client.uid("fetch", uids[-1].decode(), "BODY.PEEK[]")
    body = next(bytes(line) for line in fetched.lines if isinstance(line, bytearray))
    assert b"Sent through SmtpSender." in body
    assert f"Subject: {subject}".encode() in body
    print(f"SmtpSender → Postfix → visible over IMAP: {time.monotonic() - started:.3f} s")

    # The harness's Postfix refuses other domains at RCPT with a 5xx: permanent.
    refused = await sender.send(raw, FROM, ["someone@elsewhere.test"])
    assert (refused.accepted, refused.permanent, refused.code) == (False, True, 550)
    assert "Recipient address rejected" in refused.message
