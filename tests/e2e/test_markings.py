"""Classification markings end to end: a room linked DIFFUSION RESTREINTE shows it (topic,
m.bridge), marks every mail it sends, and refuses mail marked higher (header or subject tag).

Real Synapse, Dovecot and Postfix: mail in goes SMTP → Postfix → LMTP → Dovecot → IMAP → the
bridge; mail out goes the bridge → Postfix → Dovecot, read back from the maildir.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

import pytest

from bridge.harness.dovecot import DovecotServer
from bridge.harness.mailauth import AuthRig
from bridge.harness.postfix import PostfixServer
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import PASSWORD, body_contains, bridge_config_with_mailbox
from tests.e2e.test_matrix_to_mail import maildir_messages, text_of, wait_for

DR = "DIFFUSION RESTREINTE"
FROM_ADDRESS = "passerelle@achats.gouv.fr"
TOPIC = "Achats du ministère"


@dataclass
class Marked:
    bridge: BridgeProcess
    dovecot: DovecotServer
    postfix: PostfixServer
    alice: MatrixTestClient
    address: str
    room_id: str
    bot: str
    rig: AuthRig

    async def send_mail(self, subject: str, text: str, **headers: str) -> None:
        """A mail from an allowed sender to the list, signed by its domain, through the agency
        MTA (the real Postfix with opendkim and opendmarc)."""
        msg = EmailMessage()
        msg["From"] = "Agent Dupont <agent.dupont@achats.gouv.fr>"
        msg["To"] = self.address
        msg["Subject"] = subject
        msg["Message-ID"] = make_msgid(domain="achats.gouv.fr")
        msg["Date"] = format_datetime(datetime.now(UTC))  # signed: Postfix must not add one
        for name, value in headers.items():
            msg[name.replace("_", "-")] = value
        msg.set_content(text)
        signed = self.rig.sign(msg.as_bytes().replace(b"\n", b"\r\n"), "achats.gouv.fr")
        await asyncio.to_thread(self.rig.send, signed, "agent.dupont@achats.gouv.fr", self.address)

    async def state(self, event_type: str, state_key: str = "") -> dict[str, Any]:
        return await self.alice.request(
            "GET", f"/_matrix/client/v3/rooms/{self.room_id}/state/{event_type}/{state_key}"
        )


@pytest.fixture
async def marked(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    postfix: PostfixServer,
    auth_rig: AuthRig,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> AsyncIterator[Marked]:
    """A bridge mailing through Postfix, and Alice's room (with a topic, the bot at power
    level 50) linked to a list with `marking DIFFUSION RESTREINTE`."""
    user = f"list{uuid.uuid4().hex[:8]}"
    address = dovecot.add_user(user, PASSWORD)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["mail"].update(
        {
            "smtp": {"host": "127.0.0.1", "port": postfix.smtp_port, "tls": "none"},
            "from_address": FROM_ADDRESS,
            "retry_delays": [0.5],
        }
    )
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        alice = await make_user("alice")
        await alice.set_displayname("Alice Martin")
        room_id = await alice.create_room(invite=[bot], name="Achats")
        await alice.send_state(room_id, "m.room.topic", {"topic": TOPIC})
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        levels = await alice.request(
            "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels"
        )
        levels.setdefault("users", {})[bot] = 50
        await alice.send_state(room_id, "m.room.power_levels", levels)
        question = await alice.send_text(
            room_id,
            f"!passerelle link {address} allow achats.gouv.fr marking diffusion restreinte",
        )
        answer = await alice.wait_for_event(room_id, replies_to(question, bot))
        assert "Linked" in answer["content"]["body"], answer["content"]["body"]
        assert f"marked {DR}" in answer["content"]["body"]
        yield Marked(bridge, dovecot, postfix, alice, address, room_id, bot, auth_rig)
    finally:
        bridge.stop()


async def test_the_room_shows_its_marking(marked: Marked) -> None:
    state = await marked.state("m.bridge", f"passerelle:{marked.address}")
    assert state["fr.passerelle.marking"] == DR
    assert state["channel"]["id"] == marked.address
    topic = await marked.state("m.room.topic")
    assert topic["topic"] == f"[{DR}]\n{TOPIC}"
    question = await marked.alice.send_text(marked.room_id, "!passerelle links")
    answer = await marked.alice.wait_for_event(marked.room_id, replies_to(question, marked.bot))
    assert f"marked {DR}" in answer["content"]["body"]
    # Linked again without a marking: the marking line goes, the rest of the topic stays.
    again = await marked.alice.send_text(
        marked.room_id, f"!passerelle link {marked.address} allow achats.gouv.fr"
    )
    await marked.alice.wait_for_event(marked.room_id, replies_to(again, marked.bot))
    for _ in range(100):
        if (await marked.state("m.room.topic"))["topic"] == TOPIC:
            break
        await asyncio.sleep(0.1)
    assert (await marked.state("m.room.topic"))["topic"] == TOPIC


async def test_a_matrix_message_is_mailed_with_the_marking(marked: Marked) -> None:
    await marked.alice.send_text(marked.room_id, "Le budget est validé.")

    def sent() -> list[EmailMessage]:
        return [
            m
            for m in maildir_messages(marked.dovecot, marked.address)
            if "via Passerelle" in str(m["From"]) and "budget" in text_of(m)
        ]

    (mail,) = await wait_for(sent, "the marked mail")
    assert str(mail["X-Classification"]) == DR
    assert text_of(mail).splitlines()[0] == DR
    assert str(mail["Subject"]) == "Le budget est validé."


async def test_mail_marked_higher_is_refused_and_the_room_told(marked: Marked) -> None:
    await marked.send_mail(
        "Plan de charge", "contenu secret par en-tête", X_Classification="SECRET"
    )
    await marked.send_mail("[SECRET] Réunion", "contenu secret par objet")
    await marked.send_mail("Note", "marquée par objet", X_Classification="Diffusion Restreinte")
    await marked.send_mail("[NON PROTÉGÉ] Menu", "menu de la cantine")
    await marked.send_mail("Sans marque", "courrier ordinaire")

    for text in ("marquée par objet", "menu de la cantine", "courrier ordinaire"):
        await marked.alice.wait_for_event(marked.room_id, body_contains(text), timeout=40)

    def refusals(events: list[dict[str, Any]]) -> list[str]:
        return [
            e["content"]["body"]
            for e in events
            if e.get("sender") == marked.bot
            and "was not posted here" in e.get("content", {}).get("body", "")
        ]

    async def told() -> list[str]:
        found = refusals(await marked.alice.messages(marked.room_id, limit=200))
        return found if len(found) >= 2 else []

    notices: list[str] = []
    for _ in range(100):
        notices = await told()
        if notices:
            break
        await asyncio.sleep(0.3)
    assert len(notices) == 2, notices
    for notice in notices:
        assert f"it is marked SECRET, above this room's {DR}" in notice
        assert "agent.dupont@achats.gouv.fr" in notice
        assert "Réunion" not in notice
        assert "Plan de charge" not in notice
    events = await marked.alice.messages(marked.room_id, limit=200)
    bodies = " ".join(str(e.get("content", {}).get("body", "")) for e in events)
    assert "contenu secret" not in bodies


async def test_a_config_link_marks_the_topic_at_start_up_once(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    db_url: str,
    tmp_path: Path,
) -> None:
    """A marked link of the config file: the topic gets its line when the bridge starts, and
    not a second one when it starts again."""
    address = dovecot.add_user(f"cfg{uuid.uuid4().hex[:8]}", PASSWORD)
    alice = await make_user("alice")
    bot = synapse_setup.config.bot_mxid
    room_id = await alice.create_room(invite=[bot], name="Pinned by the admin")
    await alice.send_state(room_id, "m.room.topic", {"topic": TOPIC})
    levels = await alice.request(
        "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels"
    )
    levels.setdefault("users", {})[bot] = 50
    await alice.send_state(room_id, "m.room.power_levels", levels)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["links"] = [
        {"room": room_id, "address": address, "allowed_senders": ["achats.gouv.fr"]}
        | {"marking": "Diffusion Restreinte"}
    ]
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))

    async def topic() -> str:
        content = await alice.request(
            "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.topic/"
        )
        return str(content.get("topic"))

    for run in (1, 2):
        bridge = BridgeProcess(config_path, db_url, tmp_path / f"bridge-{run}.log")
        bridge.start()
        try:
            for _ in range(100):
                if (await topic()).startswith(f"[{DR}]"):
                    break
                await asyncio.sleep(0.2)
            state = await alice.request(
                "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.bridge/passerelle:{address}"
            )
            assert state["fr.passerelle.marking"] == DR
            await asyncio.sleep(1)  # time to mark it twice, if it were to
            assert await topic() == f"[{DR}]\n{TOPIC}"
        finally:
            bridge.stop()
