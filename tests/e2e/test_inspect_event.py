"""`passerelle inspect-event` as an administrator runs it: a real `python -m bridge` process.

For any event it prints either exactly the RFC 5322 message the bridge would send, or one
line "not sent: <reason>", and exits 0; only usage errors exit non-zero.
"""

from __future__ import annotations

import email
import email.policy
import json
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_config
from bridge.mail.compose import is_own_message_id
from bridge.registration import dump_yaml
from tests.conftest import CliRun, bridge_config_dict, run_cli, run_program

LIST = "achats@agency.example.org"
FROM = "passerelle@agency.example.org"


def run(*args: str | Path) -> CliRun:
    return run_cli("inspect-event", *args)


def event(content: Any, **fields: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": "$abc:localhost",
        "sender": "@alice:localhost",
        "room_id": "!r:localhost",
        "origin_server_ts": 1,
        "content": content,
    } | fields


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    raw = bridge_config_dict(8008, 29330, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    raw["mail"] = {
        "mailboxes": {LIST: {"host": "127.0.0.1", "tls": "none", "user": "a", "password": "p"}},
        "smtp": {"host": "127.0.0.1", "port": 2525, "tls": "none"},
        "from_address": FROM,
    }
    raw["links"] = [{"room": "!r:localhost", "address": LIST}]
    raw["permissions"] = {"@alice:localhost": "user"}
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(raw), encoding="utf-8")
    return path


def inspect(tmp_path: Path, ev: Any, *options: str | Path) -> bytes:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(ev), encoding="utf-8")
    result = run(*options, path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result.stdout


def parsed(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_the_program_prints_what_the_tests_see(tmp_path: Path, config_path: Path) -> None:
    """These tests run the command in this process (`run_cli`); as a program it gives the
    same output and exit codes."""
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event({"msgtype": "m.notice", "body": "bot"})), encoding="utf-8")
    for args in (("-c", config_path, path), ("-c", config_path, tmp_path / "none.json")):
        program = run_program("inspect-event", *args)
        here = run(*args)
        assert (program.returncode, program.stdout) == (here.returncode, here.stdout)
        assert program.stderr == here.stderr
    assert program.returncode != 0


def test_a_text_message_becomes_this_mail(tmp_path: Path, config_path: Path) -> None:
    ev = event({"msgtype": "m.text", "body": "Réunion à 10 h\nsalle B"})
    raw = inspect(tmp_path, ev, "-c", config_path, "--sender-name", "Alice Martin")
    assert raw.isascii()
    assert b"\r\n" in raw
    msg = parsed(raw)
    (sender,) = msg["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ("Alice Martin via Passerelle", FROM)
    assert str(msg["To"]) == LIST
    assert str(msg["Reply-To"]) == LIST
    assert str(msg["Subject"]) == "Réunion à 10 h"
    config = load_config(config_path, env={})
    message_id = str(msg["Message-ID"]).strip("<>")
    assert is_own_message_id(message_id, "agency.example.org", config.message_id_secret)
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    assert "salle B" in body.get_content()


@pytest.mark.parametrize(
    ("ev", "reason"),
    [
        (event({"msgtype": "m.notice", "body": "bot"}), "m.notice"),
        (event({"msgtype": "m.text", "body": "!passerelle help"}), "command"),
        (event({"m.relates_to": {"rel_type": "m.annotation"}}, type="m.reaction"), "reaction"),
        (event({"msgtype": "m.text", "body": "x"}, sender="@mallory:localhost"), "permitted"),
        (event({"msgtype": "m.text", "body": 42}), ""),
        (event("not an object"), ""),
        (event({"msgtype": "m.text", "body": "hi"}, sender="@passerelle:localhost"), "bridge"),
    ],
)
def test_not_sent_is_one_line(
    tmp_path: Path, config_path: Path, ev: dict[str, Any], reason: str
) -> None:
    out = inspect(tmp_path, ev, "-c", config_path).decode()
    assert out.startswith("not sent: ")
    assert out.count("\n") == 1
    assert reason in out


def test_hostile_event_yields_one_recipient_and_no_injected_header(tmp_path: Path) -> None:
    ev = event(
        {
            "msgtype": "m.file",
            "body": "..\\/..\\/x\u202egpj.exe",
            "filename": "..\\/..\\/x\u202egpj.exe",
            "url": "mxc://localhost/abcDEF",
            "info": {"mimetype": "application/x-msdownload", "size": 12},
        }
    )
    raw = inspect(tmp_path, ev, "--sender-name", "Eve\r\nBcc: victim@example.org")
    msg = parsed(raw)
    assert msg.get_all("Bcc") is None
    assert b"\r\nBcc:" not in raw
    (attachment,) = list(msg.iter_attachments())
    filename = attachment.get_filename()
    assert filename is not None
    assert "/" not in filename
    assert "\\" not in filename
    assert "\u202e" not in filename
    assert b"placeholder" in attachment.get_content()


def test_without_a_config_it_uses_placeholders(tmp_path: Path) -> None:
    msg = parsed(inspect(tmp_path, event({"msgtype": "m.emote", "body": "waves"})))
    assert str(msg["To"]) == "list@example.invalid"
    body = msg.get_body(preferencelist=("plain",))
    assert body is not None
    assert body.get_content().startswith("* @alice:localhost waves")


def test_smtp_off_is_not_sent(tmp_path: Path) -> None:
    raw = bridge_config_dict(8008, 29330, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(raw), encoding="utf-8")
    out = inspect(tmp_path, event({"msgtype": "m.text", "body": "hello"}), "-c", path)
    assert out.decode().startswith("not sent: Matrix")


@pytest.mark.parametrize("content", ["{", "[]", "42"])
def test_usage_errors(tmp_path: Path, content: str) -> None:
    path = tmp_path / "event.json"
    path.write_text(content, encoding="utf-8")
    result = run(path)
    assert result.returncode == 2
    assert result.stdout == b""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_unknown_link_and_missing_file_are_usage_errors(tmp_path: Path, config_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event({"msgtype": "m.text", "body": "x"})), encoding="utf-8")
    unknown = run("-c", config_path, "--link", "other@example.org", path)
    assert unknown.returncode == 2
    assert "no link" in unknown.stderr
    missing = run(tmp_path / "nope.json")
    assert missing.returncode == 2
