"""Integration tests for the Dovecot and Postfix launchers: APPEND, FETCH, IDLE, SMTP → IMAP."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aioimaplib
import aiosmtplib
import pytest

from bridge.harness.dovecot import DovecotServer
from bridge.harness.postfix import PostfixServer

PASSWORD = "harness-secret"


@pytest.fixture(scope="module")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotServer]:
    server = DovecotServer(tmp_path_factory.mktemp("dovecot"))
    try:
        server.add_user("bridge", PASSWORD)
        started = time.monotonic()
        server.start()
        print(f"Dovecot start: {time.monotonic() - started:.3f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def postfix(
    tmp_path_factory: pytest.TempPathFactory, dovecot: DovecotServer
) -> Iterator[PostfixServer]:
    server = PostfixServer(tmp_path_factory.mktemp("postfix"), lmtp_port=dovecot.lmtp_port)
    try:
        started = time.monotonic()
        server.start()
        print(f"Postfix start: {time.monotonic() - started:.3f} s")
        yield server
    finally:
        server.stop()


def make_message(subject: str, body: str = "Hello from the harness.\n") -> bytes:
    msg = EmailMessage()
    msg["From"] = "sender@elsewhere.test"
    msg["To"] = "bridge@example.test"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@elsewhere.test>"
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


async def fetch_body(client: aioimaplib.IMAP4, uid: int) -> bytes:
    response = await client.uid("fetch", str(uid), "BODY.PEEK[]")
    assert response.result == "OK", response.lines
    literals = [bytes(line) for line in response.lines if isinstance(line, bytearray)]
    assert len(literals) == 1, response.lines
    return literals[0]


async def search_subject(client: aioimaplib.IMAP4, subject: str) -> list[int]:
    response = await client.uid_search("HEADER", "Subject", f'"{subject}"', charset=None)
    assert response.result == "OK", response.lines
    return [int(uid) for uid in response.lines[0].split()]


def address(server: DovecotServer, localpart: str = "bridge") -> str:
    return f"{localpart}@{server.domain}"


# --- Dovecot ------------------------------------------------------------------------------------


async def test_append_then_fetch(dovecot: DovecotServer) -> None:
    raw = make_message("append-then-fetch")
    uid = await dovecot.append(address(dovecot), PASSWORD, raw)
    assert uid >= 1
    assert await dovecot.append(address(dovecot), PASSWORD, raw) == uid + 1
    async with dovecot.session(address(dovecot), PASSWORD) as client:
        assert await fetch_body(client, uid) == raw
    assert await dovecot.uidvalidity(address(dovecot), PASSWORD) > 0


async def test_idle_announces_appended_message(dovecot: DovecotServer) -> None:
    async with dovecot.session(address(dovecot), PASSWORD) as client:
        idle = await client.idle_start(timeout=20)
        started = time.monotonic()
        uid = await dovecot.append(address(dovecot), PASSWORD, make_message("idle"))
        pushed: list[bytes] = []
        while not any(line.endswith(b"EXISTS") for line in pushed):
            pushed += [bytes(line) for line in await client.wait_server_push(timeout=5)]
        print(f"APPEND → IDLE EXISTS: {time.monotonic() - started:.3f} s")
        client.idle_done()
        await asyncio.wait_for(idle, 5)
        assert (await search_subject(client, "idle"))[-1] == uid


async def test_users_added_while_running(dovecot: DovecotServer) -> None:
    late = dovecot.add_user("late", "first-password")
    assert await dovecot.append(late, "first-password", make_message("late")) == 1
    # A password change on a running server is seen too (Dovecot re-stats once a second).
    dovecot.add_user("late", "second-password")
    assert await dovecot.append(late, "second-password", make_message("late 2")) == 2
    assert (dovecot.maildir(late) / "cur").is_dir()


@pytest.mark.slow
async def test_restart_keeps_mail_and_uidvalidity(tmp_path: Path) -> None:
    server = DovecotServer(tmp_path / "dovecot")
    try:
        user = server.add_user("restart", PASSWORD)
        server.start()
        raw = make_message("before restart")
        uid = await server.append(user, PASSWORD, raw)
        validity = await server.uidvalidity(user, PASSWORD)
        port = server.imap_port
        started = time.monotonic()
        server.restart()
        print(f"Dovecot restart: {time.monotonic() - started:.3f} s")
        assert server.imap_port == port
        assert await server.uidvalidity(user, PASSWORD) == validity
        async with server.session(user, PASSWORD) as client:
            assert await fetch_body(client, uid) == raw
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not server.running


# --- Postfix → LMTP → Dovecot ------------------------------------------------------------------


async def wait_for_subject(server: DovecotServer, subject: str, budget: float = 15) -> int:
    """Poll INBOX (one session, NOOP between searches) until a message with ``subject`` shows."""
    deadline = time.monotonic() + budget
    async with server.session(address(server), PASSWORD) as client:
        while True:
            uids = await search_subject(client, subject)
            if uids:
                return uids[-1]
            assert time.monotonic() < deadline, f"{subject!r} not delivered within {budget} s"
            await asyncio.sleep(0.05)
            await client.noop()


async def test_smtp_to_imap(dovecot: DovecotServer, postfix: PostfixServer) -> None:
    subject = f"smtp-{uuid.uuid4().hex[:8]}"
    raw = make_message(subject, "Delivered by Postfix over LMTP.\n")
    started = time.monotonic()
    errors, _ = await aiosmtplib.send(
        raw,
        sender="sender@elsewhere.test",
        recipients=[address(dovecot)],
        hostname="127.0.0.1",
        port=postfix.smtp_port,
    )
    accepted = time.monotonic()
    assert errors == {}
    uid = await wait_for_subject(dovecot, subject)
    print(
        f"SMTP accept: {accepted - started:.3f} s; "
        f"SMTP send → visible over IMAP: {time.monotonic() - started:.3f} s"
    )
    async with dovecot.session(address(dovecot), PASSWORD) as client:
        body = await fetch_body(client, uid)
    assert b"Delivered by Postfix over LMTP." in body
    assert re.search(rb"^Received: from ", body, re.MULTILINE)


async def test_smtp_refuses_other_domains_and_unknown_users(
    dovecot: DovecotServer, postfix: PostfixServer
) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=postfix.smtp_port)
    async with smtp:
        await smtp.mail("sender@elsewhere.test")
        with pytest.raises(aiosmtplib.SMTPRecipientRefused):
            await smtp.rcpt("someone@elsewhere.test")
    # Unknown users of the domain are accepted by Postfix and bounced by Dovecot's LMTP; the
    # known user in the same transaction still gets the mail.
    subject = f"mixed-{uuid.uuid4().hex[:8]}"
    errors, _ = await aiosmtplib.send(
        make_message(subject),
        sender="sender@elsewhere.test",
        recipients=[address(dovecot), address(dovecot, "nobody-here")],
        hostname="127.0.0.1",
        port=postfix.smtp_port,
    )
    assert errors == {}
    await wait_for_subject(dovecot, subject)


@pytest.mark.slow
async def test_two_postfix_instances(
    tmp_path: Path, dovecot: DovecotServer, postfix: PostfixServer
) -> None:
    second = PostfixServer(tmp_path / "postfix2", lmtp_port=dovecot.lmtp_port)
    try:
        second.start()
        assert second.queue_dir != postfix.queue_dir
        assert second.smtp_port != postfix.smtp_port
        subjects = [f"pair-{n}-{uuid.uuid4().hex[:8]}" for n in range(2)]
        for server, subject in zip((postfix, second), subjects, strict=True):
            await aiosmtplib.send(
                make_message(subject),
                sender="sender@elsewhere.test",
                recipients=[address(dovecot)],
                hostname="127.0.0.1",
                port=server.smtp_port,
            )
        for subject in subjects:
            await wait_for_subject(dovecot, subject)
    finally:
        second.stop()
    assert not second.running
    assert postfix.running


@pytest.mark.slow
def test_postfix_start_failure_shows_fatal_line(tmp_path: Path) -> None:
    server = PostfixServer(tmp_path / "postfix", lmtp_port=24)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", server.smtp_port))
        squatter.listen()
        try:
            with pytest.raises(RuntimeError, match=r"fatal: bind 127\.0\.0\.1 port \d+"):
                server.start()
        finally:
            server.stop()
    assert not server.running
