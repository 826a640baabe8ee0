"""`passerelle demo`: Synapse, a mail server and the bridge, a demo user and a linked list;
the other ministry's side is in demo_remote, the webhooks and provisioning API in demo_hooks."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import sys
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from bridge.config import ConfigError, load_config, read_yaml_file
from bridge.demo_hooks import config_sections as hook_sections
from bridge.demo_mta import DEMO_AUTHSERV_ID
from bridge.harness.ports import free_port
from bridge.registration import atomic_write, dump_yaml, generate_registration

DEMO_USER = "demo"
SERVER_NAME = "localhost"
LIST_USER = "liste-achats"
LIST_PASSWORD = "demo-list-password"  # a loopback-only Dovecot made for the demo
SENDER = "Agent Dupont <agent.dupont@achats.gouv.fr>"


# The bridge's own sender address: one that passes the bridge's own strict address checks
# (".test" is a special-use name, which they refuse).
DEMO_FROM = "passerelle@achats.gouv.fr"


def _write_demo_config(
    folder: Path,
    synapse_port: int,
    bridge_port: int,
    list_address: str,
    imap_port: int,
    smtp_port: int,
    remotes: dict[str, Any],
    receiver_port: int,
) -> Path:
    """Create or refresh the demo config: new ports each run, the same tokens and database."""
    path = folder / "config.yaml"
    user: Any = read_yaml_file(path, round_trip=True) if path.exists() else None
    if not isinstance(user, dict):
        user = {}
    user.setdefault("homeserver", {}).update(
        {"address": f"http://127.0.0.1:{synapse_port}", "domain": SERVER_NAME}
    )
    user.setdefault("appservice", {}).update(
        {
            "address": f"http://127.0.0.1:{bridge_port}",
            "hostname": "127.0.0.1",
            "port": bridge_port,
        }
    )
    user["database"] = {"url": f"sqlite+aiosqlite:///{(folder / 'passerelle.db').resolve()}"}
    user["permissions"] = {SERVER_NAME: "admin"}
    user["mail"] = {
        "mailboxes": {
            list_address: {
                "host": "127.0.0.1",
                "port": imap_port,
                "tls": "none",
                "user": list_address,
                "password": LIST_PASSWORD,
            }
        },
        # Matrix → mail through the same Postfix: what is written in the linked room reaches
        # the list's mailbox (and, coming back, is recognised and not posted again).
        "smtp": {"host": "127.0.0.1", "port": smtp_port, "tls": "none"},
        "from_address": DEMO_FROM,
        "on_sent": "reaction",
        # The demo MTA's opendkim and opendmarc (demo_mta) vouch for senders.
        "trust": {"authserv_id": [DEMO_AUTHSERV_ID]},
    }
    user["remotes"] = remotes
    user |= hook_sections(folder, receiver_port)
    atomic_write(path, dump_yaml(user))
    return path


def stored_password(folder: Path, name: str = "demo-password") -> str:
    """A password made on the first run and kept in the state folder."""
    path = folder / name
    if path.exists():
        return path.read_text(encoding="utf-8").strip()
    password = secrets.token_urlsafe(12)
    atomic_write(path, password + "\n")
    return password


async def _check_bot_answers(base_url: str, token: str, user_id: str, bot: str) -> str:
    from bridge.harness.synapse import MatrixTestClient

    async with MatrixTestClient(base_url, token, user_id) as client:
        room_id = await client.create_room(invite=[bot], is_direct=True, name="Passerelle demo")
        await client.wait_for_membership(room_id, bot, "join", timeout=30)
        question = await client.send_text(room_id, "help")
        answer = await client.wait_for_event(room_id, reply_to(question, bot), timeout=30)
        return str(answer["content"].get("body", ""))


def reply_to(event_id: str, sender: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        relates = event.get("content", {}).get("m.relates_to", {})
        return bool(
            event.get("sender") == sender
            and relates.get("m.in_reply_to", {}).get("event_id") == event_id
        )

    return match


async def _link_list_room(
    folder: Path,
    base_url: str,
    token: str,
    user_id: str,
    bot: str,
    list_address: str,
    smtp_port: int,
) -> str:
    """A room linked to the demo list (made once, kept in the state folder), and a mail sent
    through Postfix that must show up in it."""
    import aiosmtplib

    from bridge.harness.synapse import MatrixTestClient

    saved = folder / "list-room"
    async with MatrixTestClient(base_url, token, user_id) as client:
        if saved.exists():
            room_id = saved.read_text(encoding="utf-8").strip()
        else:
            room_id = await client.create_room(invite=[bot], name="Liste achats (demo)")
            await client.wait_for_membership(room_id, bot, "join", timeout=30)
            question = await client.send_text(
                room_id, f"!passerelle link {list_address} allow achats.gouv.fr"
            )
            answer = await client.wait_for_event(room_id, reply_to(question, bot), timeout=30)
            if "Linked" not in answer["content"].get("body", ""):
                raise RuntimeError(f"linking failed: {answer['content'].get('body')}")
            atomic_write(saved, room_id + "\n")
            await asyncio.sleep(1)  # the watcher notes where the mailbox ends before new mail
        message = EmailMessage()
        message["From"] = SENDER
        message["To"] = list_address
        message["Subject"] = "Bienvenue sur la liste achats"
        message["Message-ID"] = make_msgid(domain="achats.gouv.fr")
        marker = secrets.token_hex(4)
        message.set_content(
            f"Bonjour à tous,\nce message ({marker}) est arrivé par SMTP, IMAP puis Matrix."
        )
        await aiosmtplib.send(message, hostname="127.0.0.1", port=smtp_port)
        posted = await client.wait_for_event(
            room_id,
            lambda e: marker in str(e.get("content", {}).get("body", "")),
            timeout=30,
        )
        # And back: a reply in that thread goes out by mail; the bot reacts ✉️ once Postfix
        # accepted it.
        reply = await client.send_event(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": f"Bien reçu ({marker}), réponse envoyée depuis Matrix.",
                "m.relates_to": {
                    "rel_type": "m.thread",
                    "event_id": posted["event_id"],
                    "is_falling_back": True,
                    "m.in_reply_to": {"event_id": posted["event_id"]},
                },
            },
        )
        await client.wait_for_event(room_id, _reacted_sent(reply, bot), timeout=30)
        return room_id


def _reacted_sent(event_id: str, bot: str) -> Any:
    def match(event: dict[str, Any]) -> bool:
        relates = event.get("content", {}).get("m.relates_to", {})
        return (
            event.get("type") == "m.reaction"
            and event.get("sender") == bot
            and relates.get("event_id") == event_id
        )

    return match


async def _serve(
    folder: Path,
    config_path: Path,
    synapse: Any,
    ministry: Any,
    mail: tuple[str, int],
    receiver_port: int,
    check_only: bool,
) -> int:
    from bridge.app import Bridge
    from bridge.demo_hooks import LegacyReceiver, print_summary, run_hooks
    from bridge.demo_remote import (
        AGENCY_NAME,
        AGENCY_ROOM_NAME,
        MINISTRY_NAME,
        MINISTRY_ROOM_NAME,
        MINISTRY_SERVER_NAME,
        REMOTE,
        link_remote_room,
        set_displayname,
    )
    from bridge.harness.synapse import MatrixTestClient

    config = load_config(config_path)
    bridge = Bridge(config)
    receiver = LegacyReceiver(receiver_port)
    await bridge.start()
    try:
        await receiver.start()
        password = stored_password(folder)
        user_id = await asyncio.to_thread(synapse.register_user, DEMO_USER, password, True)
        token = await asyncio.to_thread(synapse.login, DEMO_USER, password)
        ministry_password = stored_password(folder, "ministere-demo-password")
        list_address, smtp_port = mail
        async with MatrixTestClient(synapse.base_url, token, user_id) as agency:
            # Before any room: the name shows on both sides ("… (Agence) : …") and in mail.
            await set_displayname(agency, AGENCY_NAME)
            answer = await _check_bot_answers(synapse.base_url, token, user_id, config.bot_mxid)
            await _link_list_room(
                folder, synapse.base_url, token, user_id, config.bot_mxid, list_address, smtp_port
            )
            remote = await link_remote_room(folder, config, agency, ministry, ministry_password)
            hooks = await run_hooks(folder, config, agency, receiver)
        account = config.remotes[REMOTE].user_id
        print("\nPasserelle demo is running.")
        print(f"  Homeserver:  {synapse.base_url}  (server name {SERVER_NAME}: the agency)")
        print(f"  Log in as:   {user_id}  password: {password}")
        print(f"  Bridge bot:  {config.bot_mxid}  (health: {config.appservice.address}/health)")
        print(f"  Config:      {config_path}")
        print(
            f"  Mail:        {list_address}, SMTP 127.0.0.1:{smtp_port} (Postfix with "
            f"opendkim and opendmarc, authserv-id {DEMO_AUTHSERV_ID} → Dovecot)"
        )
        print(
            "\nAnother ministry's homeserver, not federated with the agency's (the bridge uses an "
            f"ordinary account there, {account}):"
        )
        print(f"  Homeserver:  {ministry.base_url}  (server name {MINISTRY_SERVER_NAME})")
        print(f"  Log in as:   {remote.user_id}  password: {ministry_password}")
        print("\nA direct chat 'Passerelle demo' was opened; the bot answered “help” with:\n")
        print("    " + answer.replace("\n", "\n    "))
        print(
            f"\nThe room 'Liste achats (demo)' is linked to {list_address}; a first mail sent "
            "through Postfix is in it. Send more, e.g.:\n"
            f"    python -c \"import smtplib; smtplib.SMTP('127.0.0.1', {smtp_port}).sendmail("
            f"'agent.dupont@achats.gouv.fr', ['{list_address}'], "
            f"'From: Agent Dupont <agent.dupont@achats.gouv.fr>\\nTo: {list_address}\\n"
            "Subject: Test\\n\\nBonjour')\""
        )
        print(
            f"Postfix's milters write the Authentication-Results the bridge trusts (authserv-id "
            f"{DEMO_AUTHSERV_ID}): in the demo's DNS, achats.gouv.fr's SPF record allows this "
            "machine and asks for DMARC, so that mail is authenticated and posted under its "
            'sender\'s ghost, with "fr.passerelle.auth" in its content. Change its From: to '
            "a@presidence.gouv.fr and it is not posted (not an allowed sender); a mail for "
            "achats.gouv.fr the milters cannot authenticate is refused the same way, and the "
            'room is told (see "Trust" in the README).'
        )
        print(
            "What you write in that room is mailed to the list from "
            f"“<your name> via Passerelle” <{DEMO_FROM}>, in the right mail conversation; the "
            "bot reacts ✉️ once Postfix took it (a reply to the first mail already went out)."
        )
        print(
            f"\nThe room '{AGENCY_ROOM_NAME}' ({user_id}) is linked to '{MINISTRY_ROOM_NAME}' "
            f"on {MINISTRY_SERVER_NAME} ({remote.user_id}): {MINISTRY_NAME}'s message there "
            f"arrived here from the ghost “{remote.ghost_name}” ({remote.ghost}), "
            f"and the reply went back from {account} as “{remote.relayed_as}”. Log in on both "
            "sides (e.g. two browser profiles) to go on."
        )
        print_summary(hooks, user_id)
        print(
            "\nUse any Matrix client with the homeserver URLs above (e.g. Element's 'custom "
            "server'), invite the bot to a room and write “!passerelle help”."
        )
        if check_only:
            return 0
        print("\nCtrl-C stops both Synapses, the mail server and the bridge.", flush=True)
        receiver.echo = True
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0
    finally:
        await bridge.stop()
        await receiver.stop()


def run_demo(folder: Path, *, check_only: bool = False) -> int:
    try:
        from bridge.demo_mta import demo_mta
        from bridge.demo_remote import bridge_account, ministry_server, remote_section
        from bridge.harness.dovecot import DovecotServer
        from bridge.harness.synapse import SynapseServer
    except ImportError:
        print(
            "passerelle demo needs Synapse: pip install -e '.[demo]' (or run `make demo`)",
            file=sys.stderr,
        )
        return 2
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    dovecot = DovecotServer(folder / "dovecot")
    list_address = dovecot.add_user(LIST_USER, LIST_PASSWORD)
    synapse_port, bridge_port, receiver_port = free_port(), free_port(), free_port()
    mta = demo_mta(folder / "mta", dovecot.lmtp_port)
    postfix = mta.postfix
    registration = folder / "registration.yaml"
    synapse = SynapseServer(
        data_dir=folder / "synapse",
        server_name=SERVER_NAME,
        port=synapse_port,
        app_service_config_files=[registration],
    )
    synapse.data_dir.mkdir(exist_ok=True)
    ministry = ministry_server(folder)
    print(
        f"Starting Dovecot, Postfix, the ministry's Synapse ({ministry.base_url}) and the "
        f"agency's ({synapse.base_url}) …"
    )
    try:
        dovecot.start()
        mta.start()
        # First: the bridge's config names a token for its account on the ministry's server.
        ministry.start()
        password = stored_password(folder, "ministere-bridge-password")
        account = bridge_account(folder, ministry, password)
        config_path = _write_demo_config(
            folder,
            synapse_port,
            bridge_port,
            list_address,
            dovecot.imap_port,
            postfix.smtp_port,
            remote_section(ministry, account),
            receiver_port,
        )
        try:
            generate_registration(config_path, registration)
        except ConfigError as e:
            print(f"passerelle demo: config error: {e}", file=sys.stderr)
            return 10
        synapse.start()
        mail = (list_address, postfix.smtp_port)
        return asyncio.run(
            _serve(folder, config_path, synapse, ministry, mail, receiver_port, check_only)
        )
    except KeyboardInterrupt:
        return 0
    finally:
        for server in (synapse, ministry, mta, dovecot):
            with contextlib.suppress(Exception):
                server.stop()
