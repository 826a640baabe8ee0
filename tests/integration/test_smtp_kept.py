"""SMTP connections kept open between mails (`keep_open`): one connection for many mails, a
connection the server closed replaced without losing or doubling the mail, limits on age and
count, and nothing left open after close()."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

from bridge.core.health import ComponentHealth
from bridge.mail import smtp as smtp_module
from bridge.mail.smtp import SmtpConfig, SmtpSender
from tests.integration.test_smtp import (
    FROM,
    TO,
    ScriptedHandler,
    make_message,
    start_sink,
    wait_until,
)


@dataclass
class OneShotHandler(ScriptedHandler):
    """Answers the next MAIL commands from `mail_once` (then as usual)."""

    mail_once: list[str] = field(default_factory=list)

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        with self.lock:
            reply = self.mail_once.pop(0) if self.mail_once else None
        if reply is not None:
            with self.lock:
                self.mail_commands += 1
            return reply
        return await super().handle_MAIL(server, session, envelope, address, options)


def kept_sender(port: int, keep_open: int = 2) -> SmtpSender:
    config = replace(SmtpConfig("127.0.0.1", port, "none", timeout=5.0))
    return SmtpSender(config, ComponentHealth("smtp"), keep_open=keep_open)


async def test_many_mails_on_one_connection_then_none_left_open() -> None:
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        for n in range(10):
            result = await sender.send(make_message(f"n{n}"), FROM, [TO])
            assert result.accepted, result
        assert len(handler.messages) == 10
        assert handler.connections == 1
        assert handler.sessions == 1  # kept for the next mail
        sender.close()
        await wait_until(lambda: handler.sessions == 0)
    finally:
        sender.close()
        sink.stop()


async def test_without_keep_open_each_mail_has_its_own_connection() -> None:
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port, keep_open=0)
    try:
        for n in range(3):
            assert (await sender.send(make_message(f"n{n}"), FROM, [TO])).accepted
        assert handler.connections == 3
        await wait_until(lambda: handler.sessions == 0)
    finally:
        sink.stop()


async def test_a_kept_connection_the_server_closed_costs_a_new_one_not_the_mail() -> None:
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        assert (await sender.send(make_message("first"), FROM, [TO])).accepted
        sink.stop()  # the server goes away (and comes back): the kept connection is dead
        again = ScriptedHandler()
        sink, _ = start_sink(again, port=port)
        result = await sender.send(make_message("second"), FROM, [TO])
        assert result.accepted, result
        assert [m.content.count(b"Subject: second") for m in again.messages] == [1]
        assert again.connections == 1
    finally:
        sender.close()
        sink.stop()


async def test_a_421_before_data_on_a_kept_connection_retries_on_a_new_one() -> None:
    handler = OneShotHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        assert (await sender.send(make_message("first"), FROM, [TO])).accepted
        with handler.lock:
            handler.mail_once.append("421 4.3.2 closing, too many mails on this session")
        result = await sender.send(make_message("second"), FROM, [TO])
        assert result.accepted, result
        assert len(handler.messages) == 2
        assert handler.connections == 2
    finally:
        sender.close()
        sink.stop()


async def test_a_connection_lost_after_data_is_not_sent_again() -> None:
    """Once DATA went, the server may have the mail: the outcome stands (retried later by
    the outbox, as with a new connection), never resent at once on another connection."""
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        assert (await sender.send(make_message("first"), FROM, [TO])).accepted
        with handler.lock:
            handler.drop_at_data = 1
        result = await sender.send(make_message("second"), FROM, [TO])
        assert not result.accepted
        assert not result.permanent
        assert "connection lost during DATA" in result.message
        assert handler.mail_commands == 2  # no second try of the mail
        assert len(handler.messages) == 1
    finally:
        sender.close()
        sink.stop()


async def test_a_refused_mail_does_not_keep_its_connection() -> None:
    handler = ScriptedHandler(rcpt_replies={"nobody@lists.test": "550 5.1.1 no such user"})
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        result = await sender.send(make_message(), FROM, ["nobody@lists.test"])
        assert result.permanent
        await wait_until(lambda: handler.sessions == 0)
        assert (await sender.send(make_message(), FROM, [TO])).accepted
        assert handler.connections == 2
    finally:
        sender.close()
        sink.stop()


async def test_kept_connections_age_and_wear_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smtp_module, "KEEP_SECONDS", 0.3)
    monkeypatch.setattr(smtp_module, "KEEP_MAILS", 3)
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    sender = kept_sender(port)
    try:
        for n in range(7):
            assert (await sender.send(make_message(f"n{n}"), FROM, [TO])).accepted
        assert handler.connections == 3  # 3 + 3 + 1 mails
        # Unused for longer than KEEP_SECONDS: closed without waiting for another mail.
        await asyncio.sleep(0.5)
        await wait_until(lambda: handler.sessions == 0)
        assert (await sender.send(make_message("later"), FROM, [TO])).accepted
        assert handler.connections == 4
    finally:
        sender.close()
        sink.stop()


async def test_concurrent_mails_keep_at_most_keep_open() -> None:
    handler = ScriptedHandler(data_delay=0.05)
    sink, port = start_sink(handler)
    sender = kept_sender(port, keep_open=2)
    try:
        results = await asyncio.gather(
            *(sender.send(make_message(f"n{n}"), FROM, [TO]) for n in range(4))
        )
        assert all(r.accepted for r in results)
        await wait_until(lambda: handler.sessions == 2)
        for n in range(4):  # sequential now: on the two kept
            assert (await sender.send(make_message(f"m{n}"), FROM, [TO])).accepted
        assert handler.connections == 4
        assert len(handler.messages) == 8
    finally:
        sender.close()
        sink.stop()
