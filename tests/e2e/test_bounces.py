"""A Matrix message mailed to a list one of whose members is gone: the real Postfix bounces it
with a real delivery report to the VERP envelope sender, the bridge reads it back over IMAP and
tells the room next to the message, and never posts the report as mail.

Real Synapse, Dovecot (IMAP + LMTP) and Postfix; the list is a Postfix virtual alias expanding
to its own mailbox and to an address Dovecot does not know (550 5.1.1 at LMTP time).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.harness.dovecot import DovecotServer
from bridge.harness.postfix import PostfixServer
from bridge.harness.synapse import MatrixTestClient
from bridge.registration import atomic_write, dump_yaml
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import PASSWORD, bridge_config_with_mailbox
from tests.e2e.test_matrix_to_mail import FROM_ADDRESS, maildir_messages, wait_for


class BounceSetup:
    def __init__(self, dovecot: DovecotServer, tag: str) -> None:
        self.list = dovecot.add_user(f"list{tag}", PASSWORD)
        self.bounces = dovecot.add_user(f"bounces{tag}", PASSWORD)
        self.gone = f"gone{tag}@{dovecot.domain}"  # never added: Dovecot refuses it


@pytest.fixture
async def alice(make_user: UserFactory) -> MatrixTestClient:
    client = await make_user("alice")
    await client.set_displayname("Alice Martin")
    return client


@pytest.fixture
def bounce_setup(dovecot: DovecotServer) -> BounceSetup:
    return BounceSetup(dovecot, uuid.uuid4().hex[:8])


@pytest.fixture
def list_postfix(
    tmp_path: Path, dovecot: DovecotServer, bounce_setup: BounceSetup
) -> Iterator[PostfixServer]:
    server = PostfixServer(
        tmp_path / "postfix",
        lmtp_port=dovecot.lmtp_port,
        aliases={bounce_setup.list: [bounce_setup.list, bounce_setup.gone]},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["bounce mailbox", "list mailbox"])
async def test_a_bounce_is_told_next_to_its_message_and_never_posted(
    where: str,
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    list_postfix: PostfixServer,
    bounce_setup: BounceSetup,
    alice: MatrixTestClient,
    db_url: str,
    tmp_path: Path,
) -> None:
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, bounce_setup.list)
    mailbox = dict(raw["mail"]["mailboxes"][bounce_setup.list])
    if where == "bounce mailbox":
        raw["mail"]["mailboxes"][bounce_setup.bounces] = mailbox | {"user": bounce_setup.bounces}
        bounces = {"address": bounce_setup.bounces, "mailbox": bounce_setup.bounces}
    else:  # the reports come back to the list's own mailbox
        bounces = {"address": bounce_setup.list}
    raw["mail"].update(
        {
            "smtp": {"host": "127.0.0.1", "port": list_postfix.smtp_port, "tls": "none"},
            "from_address": FROM_ADDRESS,
            "retry_delays": [0.5],
            "bounces": bounces,
        }
    )
    config_path = tmp_path / "config.yaml"
    atomic_write(config_path, dump_yaml(raw))
    bridge = BridgeProcess(config_path, db_url, tmp_path / "bridge.log")
    bridge.start()
    try:
        bot = synapse_setup.config.bot_mxid
        room_id = await alice.create_room(invite=[bot], name="Achats")
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        link = await alice.send_text(room_id, f"!passerelle link {bounce_setup.list}")
        answer = await alice.wait_for_event(room_id, replies_to(link, bot))
        assert "Linked" in answer["content"]["body"], answer["content"]["body"]

        sent = await alice.send_text(room_id, "Bonjour la liste, qui a le devis ?")
        notice = await alice.wait_for_event(room_id, replies_to(sent, bot), timeout=60)
        body = notice["content"]["body"]
        assert notice["content"]["msgtype"] == "m.notice"
        assert body.startswith(f"Not delivered to {bounce_setup.gone}: 5.1.1 "), body
        assert "User doesn't exist" in body
        assert len(body) < 300

        # The mail went out with a VERP envelope sender, and reached the list's mailbox.
        (copy,) = await wait_for(
            lambda: [
                m
                for m in maildir_messages(dovecot, bounce_setup.list)
                if "qui a le devis" in str(m.get_body(preferencelist=("plain",)).get_content())
            ],
            "the list's copy",
        )
        base = bounces["address"].partition("@")[0]
        assert str(copy["Return-Path"]).startswith(f"<{base}+b")
        # The report itself was delivered where it was expected, and nobody posted it.
        box = bounce_setup.bounces if where == "bounce mailbox" else bounce_setup.list
        reports = [
            m for m in maildir_messages(dovecot, box) if m.get_content_type() == "multipart/report"
        ]
        assert len(reports) == 1
        events = await alice.messages(room_id)
        assert not [
            e
            for e in events
            if e.get("type") == "m.room.message" and e.get("sender") not in (bot, alice.user_id)
        ]
        bot_bodies = [e["content"].get("body", "") for e in events if e.get("sender") == bot]
        assert sum("Not delivered" in b for b in bot_bodies) == 1
        assert "about outbox item" in bridge.log_text()
    finally:
        bridge.stop()
