"""Mail delivered into a real Dovecot appears in a real Synapse room, thread by thread, once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.config import read_yaml_file
from bridge.db.schema import mail_raw
from bridge.harness.dovecot import DovecotServer
from bridge.harness.mailauth import AuthRig
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import AUTHSERV_ID, BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to

PASSWORD = "list-password"
# The agency MTA: mail appended to Dovecot here stands for what it delivered, with its
# Authentication-Results; mail sent through `auth_rig` gets them from the real milters.
MTA = AUTHSERV_ID


def authenticated(raw: bytes) -> bytes:
    """The mail as the agency MTA delivers it after a DMARC pass for its From: domain."""
    headers = BytesHeaderParser().parsebytes(raw)
    domain = parseaddr(str(headers.get("From", "")))[1].rpartition("@")[2]
    line = (
        f"Authentication-Results: {MTA}; dkim=pass header.d={domain}; "
        f"dmarc=pass header.from={domain}\r\n"
    )
    return line.encode() + raw


@dataclass
class MailSetup:
    bridge: BridgeProcess
    dovecot: DovecotServer
    address: str
    user: str
    alice: MatrixTestClient
    room_id: str
    bot: str

    async def deliver(self, raw: bytes, *, auth: bool = True) -> int:
        """Into the list mailbox; `auth`: as the agency MTA delivers a DMARC-passing mail."""
        return await self.dovecot.append(
            self.address, PASSWORD, authenticated(raw) if auth else raw
        )

    def mail(
        self,
        subject: str,
        body: str,
        *,
        sender: str = "Agent Dupont <agent.dupont@achats.gouv.fr>",
        reply_to: str | None = None,
        references: list[str] | None = None,
        html: str | None = None,
    ) -> tuple[str, bytes]:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = self.address
        msg["Subject"] = subject
        msg["Date"] = format_datetime(__import__("datetime").datetime.now().astimezone())
        message_id = make_msgid(domain="example.test")
        msg["Message-ID"] = message_id
        if reply_to:
            msg["In-Reply-To"] = reply_to
        if references:
            msg["References"] = " ".join(references)
        msg.set_content(body)
        if html is not None:
            msg.add_alternative(html, subtype="html")
        return message_id, msg.as_bytes()

    async def posted(self, predicate: Any, timeout: float = 30) -> dict[str, Any]:
        return await self.alice.wait_for_event(self.room_id, predicate, timeout=timeout)

    async def events_from_ghosts(self) -> list[dict[str, Any]]:
        return [
            e
            for e in await self.alice.messages(self.room_id, limit=500)
            if e.get("type") == "m.room.message" and e["sender"].startswith("@passerelle_")
        ]


def bridge_config_with_mailbox(
    synapse_setup: SynapseSetup, dovecot: DovecotServer, address: str
) -> dict[str, Any]:
    """The session's bridge config, plus the Dovecot mailbox of `address` (cleartext, loopback)."""
    raw: dict[str, Any] = read_yaml_file(synapse_setup.config_path)
    raw["mail"] = {
        "mailboxes": {
            address: {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "none",
                "user": address,
                "password": PASSWORD,
            }
        },
        "poll_interval": 2,
        "trust": {"authserv_id": [MTA]},
    }
    return raw


def body_contains(text: str) -> Any:
    return lambda e: e.get("type") == "m.room.message" and text in e["content"].get("body", "")


@pytest.fixture
async def mail_setup(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[MailSetup]:
    user = f"list{uuid.uuid4().hex[:8]}"
    address = dovecot.add_user(user, PASSWORD)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice = await make_user("alice")
        room_id = await alice.create_room(invite=[bot], name="Achats")
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        setup = MailSetup(bridge, dovecot, address, user, alice, room_id, bot)
        # Mail already in the box before the link is not posted: the link starts from now.
        await setup.deliver(setup.mail("Before the link", "old news")[1])
        question = await alice.send_text(
            room_id, f"!passerelle link {address} allow achats.gouv.fr,*.interieur.gouv.fr"
        )
        answer = await alice.wait_for_event(room_id, replies_to(question, bot))
        assert "Linked" in answer["content"]["body"], answer["content"]["body"]
        # No SMTP server configured: the link only brings mail in, and says so.
        assert "messages written here are not mailed" in answer["content"]["body"]
        yield setup
    finally:
        bridge.stop()


async def test_new_thread_reply_and_html(mail_setup: MailSetup) -> None:
    first_id, first = mail_setup.mail("Commande de papier", "Bonjour,\nil faut du papier.")
    await mail_setup.deliver(first)
    root = await mail_setup.posted(body_contains("il faut du papier"))
    content = root["content"]
    assert content["body"].startswith("Commande de papier")
    assert content["m.mentions"] == {}
    assert "m.relates_to" not in content
    assert root["sender"].startswith("@passerelle_agent.dupont=40achats.gouv.fr")

    _, reply = mail_setup.mail(
        "Re: Commande de papier",
        "Commande passée.\n\nLe lundi, Agent a écrit :\n> Bonjour,\n> il faut du papier.",
        sender="Claire Martin <claire.martin@prefecture.interieur.gouv.fr>",
        reply_to=first_id,
        references=[first_id],
        html="<p>Commande <b>passée</b>.<script>alert(1)</script></p>",
    )
    await mail_setup.deliver(reply)
    answer = await mail_setup.posted(body_contains("Commande passée"))
    relates = answer["content"]["m.relates_to"]
    assert relates["rel_type"] == "m.thread"
    assert relates["event_id"] == root["event_id"]
    assert "il faut du papier" not in answer["content"]["body"]  # quoted history trimmed
    assert "<script" not in answer["content"]["formatted_body"]

    # The whole mail is still there, as a file in the thread.
    original = await mail_setup.posted(
        lambda e: e["content"].get("filename") == "original-message.eml"
    )
    assert original["content"]["m.relates_to"]["event_id"] == root["event_id"]

    # Nothing from before the link, nothing twice.
    ghost_events = await mail_setup.events_from_ghosts()
    assert not [e for e in ghost_events if "old news" in e["content"].get("body", "")]
    bodies = [e["content"].get("body", "") for e in ghost_events]
    assert sum("il faut du papier" in b for b in bodies) == 1


async def test_sender_not_allowed_is_told_once(mail_setup: MailSetup) -> None:
    for n in range(2):
        await mail_setup.deliver(
            mail_setup.mail(f"Spam {n}", "buy now", sender="x@protonmail.com")[1]
        )
    # A later, allowed mail proves the refused ones were handled before it.
    await mail_setup.deliver(mail_setup.mail("Légitime", "courrier normal")[1])
    await mail_setup.posted(body_contains("courrier normal"))
    events = await mail_setup.alice.messages(mail_setup.room_id, limit=200)
    notices = [
        e
        for e in events
        if e["sender"] == mail_setup.bot and "x@protonmail.com" in e["content"].get("body", "")
    ]
    assert len(notices) == 1
    assert not [e for e in events if "buy now" in e["content"].get("body", "")]


@pytest.mark.both_databases
async def test_restart_posts_nothing_twice(mail_setup: MailSetup) -> None:
    await mail_setup.deliver(mail_setup.mail("Un", "premier message")[1])
    await mail_setup.posted(body_contains("premier message"))
    mail_setup.bridge.stop(kill=True)
    await mail_setup.deliver(mail_setup.mail("Deux", "second message")[1])
    mail_setup.bridge.start()
    await mail_setup.posted(body_contains("second message"))
    await asyncio.sleep(1)
    bodies = [e["content"].get("body", "") for e in await mail_setup.events_from_ghosts()]
    assert sum("premier message" in b for b in bodies) == 1
    assert sum("second message" in b for b in bodies) == 1


async def _stored_mail(db_url: str) -> int:
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(mail_raw))).scalar())
    finally:
        await engine.dispose()


@pytest.mark.both_databases
async def test_killed_after_fetch_before_send_posts_exactly_once(
    mail_setup: MailSetup, synapse_setup: SynapseSetup, db_url: str
) -> None:
    before = await _stored_mail(db_url)
    synapse = synapse_setup.synapse
    synapse.stop()
    try:
        await mail_setup.deliver(mail_setup.mail("Pendant la panne", "arrivé pendant la panne")[1])
        deadline = asyncio.get_running_loop().time() + 20
        while await _stored_mail(db_url) == before:  # fetched and stored, not yet posted
            assert asyncio.get_running_loop().time() < deadline, mail_setup.bridge.log_tail()
            await asyncio.sleep(0.2)
        mail_setup.bridge.stop(kill=True)
    finally:
        await asyncio.to_thread(synapse.start)
    mail_setup.bridge.start()
    await mail_setup.posted(body_contains("arrivé pendant la panne"), timeout=40)
    await asyncio.sleep(1)
    bodies = [e["content"].get("body", "") for e in await mail_setup.events_from_ghosts()]
    assert sum("arrivé pendant la panne" in b for b in bodies) == 1


@pytest.mark.both_databases
async def test_synapse_down_for_a_while_then_all_mail_once_in_order(
    mail_setup: MailSetup, synapse_setup: SynapseSetup
) -> None:
    synapse = synapse_setup.synapse
    synapse.stop()
    try:
        for n in range(5):
            await mail_setup.deliver(mail_setup.mail(f"Lot {n}", f"lot numéro {n}")[1])
        await asyncio.sleep(3)  # the bridge fetched them and waits for the homeserver
    finally:
        await asyncio.to_thread(synapse.start)
    await mail_setup.posted(body_contains("lot numéro 4"), timeout=60)
    bodies = [e["content"].get("body", "") for e in await mail_setup.events_from_ghosts()]
    posted = [b for b in bodies if "lot numéro" in b]
    assert posted == [f"Lot {n}\n\nlot numéro {n}" for n in range(5)]


async def test_attachment_inline_image_and_charset(mail_setup: MailSetup) -> None:
    msg = EmailMessage()
    msg["From"] = "Agent Dupont <agent.dupont@achats.gouv.fr>"
    msg["To"] = mail_setup.address
    msg["Subject"] = "Devis joint"
    msg["Message-ID"] = make_msgid(domain="achats.gouv.fr")
    msg.set_content("Voir le devis ci-joint, déjà validé.", charset="iso-8859-1")
    png = bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
    msg.add_alternative(
        '<p>Voir le <b>devis</b>, déjà validé.<img src="cid:logo@x"></p>'
        '<img src="http://tracker.example/pixel.gif">',
        subtype="html",
        charset="iso-8859-1",
    )
    html_part = msg.get_payload()[1]
    html_part.add_related(png, "image", "png", cid="<logo@x>", filename="logo.png")
    msg.add_attachment(
        b"%PDF-1.4 devis", maintype="application", subtype="pdf", filename="../../devis\u202e.pdf"
    )
    await mail_setup.deliver(msg.as_bytes())
    text = await mail_setup.posted(body_contains("déjà validé"))
    formatted = text["content"]["formatted_body"]
    assert "tracker.example" not in formatted
    assert 'src="mxc://' in formatted  # the inline image, uploaded
    attachment = await mail_setup.posted(lambda e: e["content"].get("msgtype") == "m.file")
    name = attachment["content"]["body"]
    assert "/" not in name
    assert "\u202e" not in name
    assert name.endswith(".pdf")
    url = attachment["content"]["url"]
    data = await mail_setup.alice.download(url)
    assert data == b"%PDF-1.4 devis"


async def test_link_commands_need_power_and_a_configured_mailbox(
    mail_setup: MailSetup, make_user: UserFactory
) -> None:
    alice, room_id, bot = mail_setup.alice, mail_setup.room_id, mail_setup.bot
    bob = await make_user("bob")
    await alice.invite(room_id, bob.user_id)
    await bob.join(room_id)

    async def ask(client: MatrixTestClient, text: str) -> str:
        question = await client.send_text(room_id, text)
        answer = await client.wait_for_event(room_id, replies_to(question, bot))
        return str(answer["content"]["body"])

    assert "power level 50" in await ask(bob, f"!passerelle unlink {mail_setup.address}")
    assert "power level 50" in await ask(bob, "!passerelle link other@achats.gouv.fr")
    listed = await ask(bob, "!passerelle links")
    assert mail_setup.address in listed
    assert "achats.gouv.fr, *.interieur.gouv.fr" in listed
    assert "not a mailbox this bridge may read" in await ask(
        alice, "!passerelle link unknown@achats.gouv.fr"
    )
    assert "Not linked" in await ask(alice, f"!passerelle link {mail_setup.address} allow *")
    # With the power to, the bot tells clients about the link in m.bridge state.
    levels = await alice.request(
        "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels"
    )
    levels.setdefault("users", {})[bot] = 50
    await alice.send_state(room_id, "m.room.power_levels", levels)
    assert "Linked" in await ask(alice, f"!passerelle link {mail_setup.address}")
    state = await alice.request(
        "GET",
        f"/_matrix/client/v3/rooms/{room_id}/state/m.bridge/passerelle:{mail_setup.address}",
    )
    assert state["channel"]["id"] == mail_setup.address
    assert "Unlinked" in await ask(alice, f"!passerelle unlink {mail_setup.address}")
    state = await alice.request(
        "GET",
        f"/_matrix/client/v3/rooms/{room_id}/state/m.bridge/passerelle:{mail_setup.address}",
    )
    assert state == {}
    assert "No list or remote room is linked" in await ask(alice, "!passerelle links")


async def test_mail_sent_over_smtp_reaches_the_room(
    mail_setup: MailSetup, auth_rig: AuthRig
) -> None:
    """The real path: SMTP to Postfix (whose opendkim and opendmarc check the signature), LMTP
    to Dovecot, IDLE wakes the bridge, the room."""
    _, raw = mail_setup.mail("Par SMTP", "livré par Postfix")
    signed = auth_rig.sign(raw.replace(b"\n", b"\r\n"), "achats.gouv.fr")
    await asyncio.to_thread(
        auth_rig.send, signed, "agent.dupont@achats.gouv.fr", mail_setup.address
    )
    event = await mail_setup.posted(body_contains("livré par Postfix"))
    assert event["content"]["body"].startswith("Par SMTP")
    assert event["content"]["fr.passerelle.auth"]["verdict"] == "authenticated"


async def test_config_link_waits_for_the_bot_to_be_invited(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    address = dovecot.add_user(f"cfg{uuid.uuid4().hex[:8]}", PASSWORD)
    alice = await make_user("alice")
    room_id = await alice.create_room(name="Pinned by the admin")  # the bot is not invited
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["links"] = [{"room": room_id, "address": address, "allowed_senders": ["achats.gouv.fr"]}]
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        await asyncio.sleep(1)  # the new link notes where the mailbox ends
        msg = EmailMessage()
        msg["From"] = "Agent Dupont <agent.dupont@achats.gouv.fr>"
        msg["To"] = address
        msg["Subject"] = "En attente"
        msg["Message-ID"] = make_msgid(domain="achats.gouv.fr")
        msg.set_content("posté dès que le bot est invité")
        await dovecot.append(address, PASSWORD, authenticated(msg.as_bytes()))
        await asyncio.sleep(2)
        assert "waits until someone invites it" in bridge.log_text()
        assert not [
            e for e in await alice.messages(room_id) if "posté dès" in str(e.get("content"))
        ]
        await alice.invite(room_id, synapse_setup.config.bot_mxid)
        await alice.wait_for_event(room_id, body_contains("posté dès que le bot est invité"))
    finally:
        bridge.stop()
