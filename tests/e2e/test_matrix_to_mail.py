"""Messages written in a linked room reach the list by SMTP, threaded, and replies come back.

Real Synapse, real Dovecot; mail leaves through a real Postfix (→ LMTP → Dovecot) for the
round trip, and through an aiosmtpd sink scripted in this process where a test needs the SMTP
server to misbehave (4xx, 5xx, down, slow).
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.harness.dovecot import DovecotServer
from bridge.harness.postfix import PostfixServer
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import (
    PASSWORD,
    MailSetup,
    body_contains,
    bridge_config_with_mailbox,
)
from tests.integration.test_smtp import ScriptedHandler, start_sink

FROM_ADDRESS = "passerelle@achats.gouv.fr"


def thread_reply(root: str, text: str) -> dict[str, Any]:
    """A message in the thread of `root`, as Element sends it."""
    return {
        "msgtype": "m.text",
        "body": text,
        "m.relates_to": {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": root},
        },
    }


def maildir_messages(dovecot: DovecotServer, address: str) -> list[EmailMessage]:
    """Every mail delivered to the mailbox, read from its maildir files."""
    found = []
    root = dovecot.maildir(address)
    for folder in ("new", "cur"):
        for path in sorted((root / folder).glob("*")) if (root / folder).is_dir() else []:
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            found.append(msg)
    return found


async def wait_for(
    probe: Callable[[], Any], what: str, timeout: float = 30, interval: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(msg: EmailMessage) -> str:
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    content = body.get_content()
    assert isinstance(content, str)
    return content


@dataclass
class OutSetup:
    mail: MailSetup
    config: dict[str, Any]

    @property
    def alice(self) -> MatrixTestClient:
        return self.mail.alice


async def start_linked(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    alice: MatrixTestClient,
    db_url: str,
    tmp_path: Path,
    smtp: dict[str, Any],
    *,
    mail_extra: dict[str, Any] | None = None,
    permissions: dict[str, str] | None = None,
) -> OutSetup:
    """A bridge with a linked list mailbox and SMTP out, and a room of Alice's linked to it."""
    user = f"list{uuid.uuid4().hex[:8]}"
    address = dovecot.add_user(user, PASSWORD)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["mail"].update(
        {"smtp": smtp, "from_address": FROM_ADDRESS, "retry_delays": [0.5]} | (mail_extra or {})
    )
    if permissions is not None:
        raw["permissions"] = permissions
    config_path = tmp_path / f"config-{user}.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / f"bridge-{user}.log")
    bridge.start()
    bot = synapse_setup.config.bot_mxid
    room_id = await alice.create_room(invite=[bot], name="Achats")
    await alice.wait_for_membership(room_id, bot, "join")
    await alice.wait_for_event(room_id, message_from(bot))
    setup = MailSetup(bridge, dovecot, address, user, alice, room_id, bot)
    question = await alice.send_text(room_id, f"!passerelle link {address} allow achats.gouv.fr")
    answer = await alice.wait_for_event(room_id, replies_to(question, bot))
    assert "Linked" in answer["content"]["body"], answer["content"]["body"]
    assert (
        f"messages written here are mailed to it from {FROM_ADDRESS}"
        in (answer["content"]["body"])
    )
    return OutSetup(setup, raw)


@pytest.fixture
async def alice(make_user: UserFactory) -> MatrixTestClient:
    client = await make_user("alice")
    await client.set_displayname("Alice Martin")
    return client


@pytest.fixture
async def via_postfix(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    postfix: PostfixServer,
    alice: MatrixTestClient,
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[OutSetup]:
    smtp = {"host": "127.0.0.1", "port": postfix.smtp_port, "tls": "none"}
    setup = await start_linked(synapse_setup, dovecot, alice, db_url, tmp_path, smtp)
    try:
        yield setup
    finally:
        setup.mail.bridge.stop()


@pytest.mark.both_databases
async def test_round_trip_through_postfix(via_postfix: OutSetup) -> None:
    """Mail → thread; a Matrix reply in the thread → mail threaded under it; a mail reply to
    that → the same thread. The bridge's own mail, back in the watched box, is not reposted."""
    setup = via_postfix.mail
    first_id, first = setup.mail("Commande de papier", "Bonjour,\nil faut du papier.")
    await setup.deliver(first)
    root = await setup.posted(body_contains("il faut du papier"))

    file_bytes = b"%PDF-1.4 bon de commande\x00\x01" * 10
    mxc = await setup.alice.upload(file_bytes, "application/pdf", "bon.pdf")
    await setup.alice.send_event(
        setup.room_id, "m.room.message", thread_reply(root["event_id"], "Je m'en occupe.")
    )
    file_content = thread_reply(root["event_id"], "bon.pdf")
    file_content.update(
        {
            "msgtype": "m.file",
            "url": mxc,
            "info": {"mimetype": "application/pdf", "size": len(file_bytes)},
        }
    )
    await setup.alice.send_event(setup.room_id, "m.room.message", file_content)

    def sent_by_bridge() -> list[EmailMessage]:
        return [
            m
            for m in maildir_messages(setup.dovecot, setup.address)
            if "via Passerelle" in str(m["From"])
        ]

    mails = await wait_for(lambda: len(sent_by_bridge()) >= 2 and sent_by_bridge(), "two mails")
    reply = next(m for m in mails if "Je m'en occupe" in text_of(m))
    (sender,) = reply["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Alice Martin via Passerelle", FROM_ADDRESS)
    assert str(reply["To"]) == setup.address
    assert str(reply["Reply-To"]) == setup.address
    assert str(reply["Subject"]) == "Re: Commande de papier"
    assert str(reply["In-Reply-To"]) == first_id
    assert first_id in str(reply["References"])
    assert reply["X-Passerelle-Loop"].startswith("achats.gouv.fr; ")

    with_file = next(m for m in mails if m is not reply)
    attachments = list(with_file.iter_attachments())
    assert [a.get_filename() for a in attachments] == ["bon.pdf"]
    assert attachments[0].get_content() == file_bytes
    assert str(with_file["In-Reply-To"]) == first_id

    # A list member answers the bridge's mail: it lands in the same Matrix thread.
    bridge_id = str(reply["Message-ID"])
    _, answer = setup.mail(
        "Re: Commande de papier",
        "Merci Alice.",
        reply_to=bridge_id,
        references=[first_id, bridge_id],
    )
    await setup.deliver(answer)
    posted = await setup.posted(body_contains("Merci Alice"))
    assert posted["content"]["m.relates_to"]["event_id"] == root["event_id"]

    # The bridge's own mails came back through the list's box before that answer (same box,
    # earlier UIDs) and were not posted again.
    ghost_bodies = [e["content"].get("body", "") for e in await setup.events_from_ghosts()]
    assert not [b for b in ghost_bodies if "Je m'en occupe" in b or "bon.pdf" in b]
    assert sum("Merci Alice" in b for b in ghost_bodies) == 1


# --- a scripted SMTP server ------------------------------------------------------------------


@pytest.fixture
async def via_sink(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    alice: MatrixTestClient,
    tmp_path: Path,
) -> AsyncIterator[tuple[OutSetup, ScriptedHandler, int]]:
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    smtp = {"host": "127.0.0.1", "port": port, "tls": "none"}
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    setup = await start_linked(synapse_setup, dovecot, alice, db_url, tmp_path, smtp)
    try:
        yield setup, handler, port
    finally:
        setup.mail.bridge.stop()
        sink.stop()


def received_with(handler: ScriptedHandler, text: str) -> list[Any]:
    with handler.lock:
        return [m for m in handler.messages if text.encode() in m.content]


async def test_deferred_then_accepted_is_delivered_once(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    handler.data_replies = ["451 4.3.0 try again later"]
    await setup.alice.send_text(setup.mail.room_id, "Réunion demain à 10 h.")
    got = await wait_for(lambda: received_with(handler, "union demain"), "the retried mail")
    await asyncio.sleep(1.5)  # a second (duplicate) attempt would come within the retry delay
    assert len(received_with(handler, "union demain")) == 1
    assert list(got[0].rcpt_tos) == [setup.mail.address]
    # The envelope sender names the mail (VERP, mail.bounces.verp), at the From address.
    local, _, domain = FROM_ADDRESS.partition("@")
    assert re.fullmatch(
        rf"{local}\+b[0-9a-z]+-[a-z2-7]{{10}}@{re.escape(domain)}", got[0].mail_from
    )


async def test_refused_mail_is_told_in_the_room(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    handler.data_replies = ["550 5.7.1 message content rejected"]
    event_id = await setup.alice.send_text(setup.mail.room_id, "Un message refusé.")
    notice = await setup.alice.wait_for_event(
        setup.mail.room_id, replies_to(event_id, setup.mail.bot)
    )
    body = notice["content"]["body"]
    assert notice["content"]["msgtype"] == "m.notice"
    assert "could not be mailed" in body
    assert setup.mail.address in body
    assert "550" in body
    assert "content rejected" in body
    assert received_with(handler, "refus") == []


async def test_smtp_down_then_up_delivers_after(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    alice: MatrixTestClient,
    tmp_path: Path,
) -> None:
    from bridge.harness.ports import free_port

    port = free_port()
    smtp = {"host": "127.0.0.1", "port": port, "tls": "none"}
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    setup = await start_linked(synapse_setup, dovecot, alice, db_url, tmp_path, smtp)
    handler = ScriptedHandler()
    sink = None
    try:
        await setup.alice.send_text(setup.mail.room_id, "Envoyé pendant la panne.")
        log = setup.mail.bridge.log_path
        await wait_for(
            lambda: "attempt 1 failed" in log.read_text(errors="replace"), "a failed attempt"
        )
        sink, _ = start_sink(handler, port=port)
        got = await wait_for(lambda: received_with(handler, "pendant la panne"), "the mail")
        assert len(got) == 1
    finally:
        setup.mail.bridge.stop()
        if sink is not None:
            sink.stop()


async def test_killed_mid_send_resends_with_the_same_message_id(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    """The bridge dies while the server holds the mail's DATA: after a restart it is sent again,
    and every copy carries the same Message-ID (mail readers show one message)."""
    setup, handler, _ = via_sink
    handler.data_delay = 5.0
    await setup.alice.send_text(setup.mail.room_id, "Message pendant l'arrêt.")
    await wait_for(lambda: handler.mail_commands >= 1, "the bridge to start sending")
    await asyncio.sleep(0.5)
    setup.mail.bridge.stop(kill=True)
    handler.data_delay = 0.0
    setup.mail.bridge.start()
    await wait_for(lambda: received_with(handler, "pendant l"), "the mail after the restart")
    await asyncio.sleep(1.0)
    got = received_with(handler, "pendant l")
    ids = {email.message_from_bytes(m.content)["Message-ID"] for m in got}
    assert len(ids) == 1, ids
    assert 1 <= len(got) <= 2


async def test_what_is_not_mailed(via_sink: tuple[OutSetup, ScriptedHandler, int]) -> None:
    """Notices, reactions and bridge commands never go out; an edit sends a correction in
    the same conversation; a redaction is answered: mail cannot be unsent."""
    setup, handler, _ = via_sink
    room = setup.mail.room_id
    original = await setup.alice.send_text(room, "Livraison lundi.")
    first = await wait_for(lambda: received_with(handler, "Livraison lundi"), "the first mail")
    first_id = email.message_from_bytes(first[0].content)["Message-ID"]

    await setup.alice.send_event(
        room, "m.room.message", {"msgtype": "m.notice", "body": "notice: not for mail"}
    )
    await setup.alice.send_event(
        room,
        "m.reaction",
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": original, "key": "👍"}},
    )
    await setup.alice.send_text(room, "!passerelle links")
    await setup.alice.send_event(
        room,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "* Livraison mardi.",
            "m.new_content": {"msgtype": "m.text", "body": "Livraison mardi."},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    )
    correction = await wait_for(
        lambda: received_with(handler, "Livraison mardi"), "the correction mail"
    )
    parsed = email.message_from_bytes(correction[0].content, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert text_of(parsed).startswith("Correction: Livraison mardi.")
    assert str(parsed["In-Reply-To"]) == first_id
    assert str(parsed["Subject"]) == "Re: Livraison lundi."

    redaction = await setup.alice.request(
        "PUT",
        f"/_matrix/client/v3/rooms/{room}/redact/{original}/{uuid.uuid4().hex}",
        json_body={},
    )
    assert redaction.get("event_id")
    notice = await setup.alice.wait_for_event(room, replies_to(original, setup.mail.bot))
    assert "cannot unsend" in notice["content"]["body"]
    with handler.lock:
        contents = [m.content for m in handler.messages]
    assert len(contents) == 2, [c[:300] for c in contents]
    # A linked room with one person and the bot is not a direct chat: plain text there is
    # not taken as a command (the bot used to answer "Unknown command" to every message).
    bot_bodies = [
        e["content"].get("body", "")
        for e in await setup.alice.messages(room, limit=100)
        if e["sender"] == setup.mail.bot
    ]
    assert not [b for b in bot_bodies if "Unknown command" in b], bot_bodies
    assert not [c for c in contents if b"not for mail" in c or b"passerelle links" in c]


async def test_sender_without_permission_is_told_once_a_day(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    alice: MatrixTestClient,
    make_user: UserFactory,
    tmp_path: Path,
) -> None:
    handler = ScriptedHandler()
    sink, port = start_sink(handler)
    bob = await make_user("bob")
    smtp = {"host": "127.0.0.1", "port": port, "tls": "none"}
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    permissions = {alice.user_id: "admin"}
    setup = await start_linked(
        synapse_setup, dovecot, alice, db_url, tmp_path, smtp, permissions=permissions
    )
    try:
        room = setup.mail.room_id
        await alice.invite(room, bob.user_id)
        await bob.join(room)
        first = await bob.send_text(room, "Bob's first message")
        notice = await alice.wait_for_event(room, replies_to(first, setup.mail.bot))
        assert "not mailed" in notice["content"]["body"]
        await bob.send_text(room, "Bob's second message")
        await alice.send_text(room, "Alice's message")
        await wait_for(lambda: received_with(handler, "Alice's message"), "Alice's mail")
        bot_notices = [
            e
            for e in await alice.messages(room, limit=100)
            if e["sender"] == setup.mail.bot and "not mailed" in e["content"].get("body", "")
        ]
        assert len(bot_notices) == 1
        assert received_with(handler, "Bob's") == []
    finally:
        setup.mail.bridge.stop()
        sink.stop()


async def test_hostile_display_name_and_body_stay_in_the_body(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    await setup.alice.set_displayname("Eve\r\nBcc: victim@example.org")
    await setup.alice.send_event(
        setup.mail.room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "=?utf-8?q?=0D=0ABcc:_victim2@example.org?= hostile\r\nBcc: v3@example.org",
            "format": "org.matrix.custom.html",
            "formatted_body": (
                '<p>hi<script>alert(1)</script><a href="javascript:alert(1)">x</a></p>'
            ),
        },
    )
    got = await wait_for(lambda: received_with(handler, "hostile"), "the hostile mail")
    assert list(got[0].rcpt_tos) == [setup.mail.address]
    parsed = email.message_from_bytes(got[0].content, policy=email.policy.default)
    assert parsed.get_all("Bcc") is None
    assert parsed.get_all("Cc") is None
    assert [str(a) for a in parsed["To"].addresses] == [setup.mail.address]
    assert "victim@example.org" not in str(parsed["From"].addresses[0].addr_spec)
    html = parsed.get_body(preferencelist=("html",))
    assert html is not None
    assert "<script" not in html.get_content()
    assert "javascript:" not in html.get_content()


async def test_two_members_with_one_name_are_told_apart(
    via_sink: tuple[OutSetup, ScriptedHandler, int], make_user: UserFactory
) -> None:
    """Another member takes Alice's display name: her mail names her MXID too (the bridge
    rereads the members when someone joins or changes their name)."""
    setup, handler, _ = via_sink
    room = setup.mail.room_id
    await setup.alice.send_text(room, "Avant l'homonyme.")
    await wait_for(lambda: received_with(handler, "Avant l"), "the first mail")
    twin = await make_user("twin")
    await twin.set_displayname("Alice Martin")
    await setup.alice.invite(room, twin.user_id)
    await twin.join(room)
    await setup.alice.wait_for_membership(room, twin.user_id, "join")
    await setup.alice.send_text(room, "Après l'homonyme.")
    got = await wait_for(lambda: received_with(handler, "Apr"), "the second mail")

    def sender_name(content: bytes) -> str:
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        (address,) = parsed["From"].addresses
        return str(address.display_name)

    first = received_with(handler, "Avant l")[0]
    assert sender_name(first.content) == "Alice Martin via Passerelle"
    assert sender_name(got[0].content) == f"Alice Martin ({setup.alice.user_id}) via Passerelle"


async def test_after_unlink_nothing_is_mailed(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    room = setup.mail.room_id
    await setup.alice.send_text(room, "Encore lié.")
    await wait_for(lambda: received_with(handler, "Encore li"), "the mail while linked")
    question = await setup.alice.send_text(room, f"!passerelle unlink {setup.mail.address}")
    answer = await setup.alice.wait_for_event(room, replies_to(question, setup.mail.bot))
    assert "Unlinked" in answer["content"]["body"]
    await setup.alice.send_text(room, "Plus lié du tout.")
    # Handled in room order: once the bot answered a later command, the message was handled.
    probe = await setup.alice.send_text(room, "!passerelle links")
    await setup.alice.wait_for_event(room, replies_to(probe, setup.mail.bot))
    await asyncio.sleep(1.0)  # the outbox worker would have sent it by now
    assert received_with(handler, "Plus li") == []


async def test_a_thread_started_in_matrix_is_one_mail_conversation(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    setup, handler, _ = via_sink
    room = setup.mail.room_id
    root = await setup.alice.send_text(room, "Inventaire des fournitures\nListe jointe demain.")
    first = await wait_for(lambda: received_with(handler, "Inventaire"), "the first mail")
    await setup.alice.send_event(
        room, "m.room.message", thread_reply(root, "Ajoutez les cartouches.")
    )
    second = await wait_for(lambda: received_with(handler, "cartouches"), "the thread reply")
    opening = parsed_mail(first[0].content)
    answer = parsed_mail(second[0].content)
    assert str(opening["Subject"]) == "Inventaire des fournitures"
    assert str(answer["Subject"]) == "Re: Inventaire des fournitures"
    assert str(answer["In-Reply-To"]) == str(opening["Message-ID"])
    assert str(answer["References"]) == str(opening["Message-ID"])


async def test_a_burst_queued_in_one_commit_keeps_its_threads(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    """A room's events arriving together (one appservice transaction) are queued in one
    commit: the reply and the correction find the mail of the message just before them,
    not committed yet when they are composed."""
    setup, handler, _ = via_sink
    bridge, room = setup.mail.bridge, setup.mail.room_id
    now = int(time.time() * 1000)
    run = uuid.uuid4().hex[:8]

    def event(n: int, content: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "m.room.message",
            "room_id": room,
            "sender": setup.alice.user_id,
            "event_id": f"$burst-{run}-{n}",
            "origin_server_ts": now + n,
            "content": content,
        }

    root = f"$burst-{run}-0"
    events = [
        event(0, {"msgtype": "m.text", "body": "Rapport annuel\nVersion de travail."}),
        event(1, thread_reply(root, "Relu, deux coquilles.")),
        event(
            2,
            {
                "msgtype": "m.text",
                "body": "* Rapport annuel, version 2",
                "m.new_content": {"msgtype": "m.text", "body": "Rapport annuel, version 2"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": root},
            },
        ),
        event(3, {"msgtype": "m.text", "body": "Autre sujet : les congés."}),
    ]
    token = bridge.config.appservice.hs_token
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.put(
            f"{bridge.base_url}/_matrix/app/v1/transactions/burst-{run}",
            json={"events": events},
        ) as response,
    ):
        assert response.status == 200
    await wait_for(lambda: received_with(handler, "les cong"), "the last mail of the burst")
    first = parsed_mail(received_with(handler, "Version de travail")[0].content)
    reply = parsed_mail(received_with(handler, "coquilles")[0].content)
    correction = parsed_mail(received_with(handler, "version 2")[0].content)
    assert str(reply["In-Reply-To"]) == str(first["Message-ID"])
    assert str(reply["Subject"]) == "Re: Rapport annuel"
    assert str(correction["In-Reply-To"]) == str(first["Message-ID"])
    assert "committed together" in bridge.log_path.read_text()


async def test_a_mail_that_never_goes_is_given_up_and_told(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    alice: MatrixTestClient,
    tmp_path: Path,
) -> None:
    from bridge.harness.ports import free_port

    smtp = {"host": "127.0.0.1", "port": free_port(), "tls": "none"}  # nobody listens
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'bridge.db'}"
    setup = await start_linked(
        synapse_setup, dovecot, alice, db_url, tmp_path, smtp, mail_extra={"give_up_after": 2}
    )
    try:
        event_id = await alice.send_text(setup.mail.room_id, "Jamais envoyé.")
        notice = await alice.wait_for_event(
            setup.mail.room_id, replies_to(event_id, setup.mail.bot), timeout=30
        )
        body = notice["content"]["body"]
        assert "could not be mailed" in body
        assert "gave up after" in body
    finally:
        setup.mail.bridge.stop()


def parsed_mail(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


async def test_encryption_turned_on_pauses_the_link_both_ways(
    via_sink: tuple[OutSetup, ScriptedHandler, int],
) -> None:
    """Nothing crosses in clear once a linked room expects encryption: the bot says so once,
    list mail is kept instead of posted, and what is written there is not mailed."""
    setup, handler, _ = via_sink
    room, bot = setup.mail.room_id, setup.mail.bot
    await setup.alice.send_state(room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    said = "encryption was turned on"
    notice = await setup.alice.wait_for_event(
        room, lambda e: e["sender"] == bot and said in e["content"].get("body", "")
    )
    assert setup.mail.address in notice["content"]["body"]
    assert notice["content"]["msgtype"] == "m.notice"

    _, raw = setup.mail.mail("Après le chiffrement", "Ce mail ne doit pas être posté.")
    await setup.mail.deliver(raw)
    await setup.alice.send_text(room, "Écrit après le chiffrement.")
    await asyncio.sleep(3.0)  # an IDLE push, a relay pass and an outbox pass would be done
    assert received_with(handler, "chiffrement") == []
    bodies = [e["content"].get("body", "") for e in await setup.alice.messages(room, limit=100)]
    assert not [b for b in bodies if "ne doit pas" in b]
    assert sum(said in b for b in bodies) == 1
