"""`passerelle inspect-remote` as an administrator runs it: a real `python -m bridge` process.

Whatever the event, the tool prints exactly one JSON document and exits 0; only usage errors
(unknown --remote, missing or unreadable file) exit 2, and a bad config 10, each with one line
on stderr and no traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import load_config
from bridge.core.matrix_event import MAX_TEXT
from bridge.registration import dump_yaml
from tests.conftest import bridge_config_dict, run_cli, run_program

REMOTE = "interieur"
SERVER = "interieur.example.org"
OWN = f"@passerelle:{SERVER}"
ALICE = f"@alice:{SERVER}"
HTML = "org.matrix.custom.html"
UNKNOWN = "$unknown:interieur.example.org"


@dataclass
class Inspected:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str | Path) -> Inspected:
    result = run_cli("inspect-remote", *args)
    return Inspected(result.returncode, result.stdout.decode("utf-8"), result.stderr)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    raw = bridge_config_dict(8008, 29330, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    raw["remotes"] = {
        REMOTE: {
            "address": "https://matrix.interieur.example.org",
            "server_name": SERVER,
            "user_id": OWN,
            "access_token": "syt_inspect_remote_token",
            "allowed_servers": [SERVER, "allowed.example.org"],
            "max_media_size": 1000,
        },
        "armees": {
            "address": "https://matrix.armees.example.org",
            "server_name": "armees.example.org",
            "user_id": "@passerelle:armees.example.org",
            "access_token": "syt_other_token",
            "display_suffix": "[Armées]",
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(raw), encoding="utf-8")
    return path


def ghost_of(config_path: Path, user_id: str) -> str:
    config = load_config(config_path, env={}, require_tokens=False)
    return config.remote_ghost_mxid(REMOTE, user_id)


def event(content: Any, **fields: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": "$ev1:interieur.example.org",
        "sender": ALICE,
        "room_id": "!room:interieur.example.org",
        "origin_server_ts": 1_700_000_000_000,
        "content": content,
    } | fields


def inspect_raw(tmp_path: Path, raw: bytes, config_path: Path) -> dict[str, Any]:
    """Inspect `raw` and check the contract every event shares: exit 0, exactly one JSON
    document of the four fields, nothing on stderr."""
    path = tmp_path / f"event-{len(list(tmp_path.iterdir()))}.json"
    path.write_bytes(raw)
    result = run("-c", config_path, "--remote", REMOTE, path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    assert set(report) == {"accepted", "reason", "ghost", "events"}
    if report["accepted"]:
        assert report["reason"] is None
        assert set(report["ghost"]) == {"user_id", "displayname"}
    else:
        assert isinstance(report["reason"], str)
        assert report["reason"].strip()
        assert report["ghost"] is None
        assert report["events"] == []
    for ev in report["events"]:
        assert set(ev) == {"type", "content"}
    return report


def inspect(tmp_path: Path, ev: Any, config_path: Path) -> dict[str, Any]:
    return inspect_raw(tmp_path, json.dumps(ev).encode(), config_path)


def refused(report: dict[str, Any]) -> str:
    assert report["accepted"] is False
    reason: str = report["reason"]
    return reason


# --- messages ---------------------------------------------------------------------------------


def test_the_program_prints_what_the_tests_see(tmp_path: Path, config_path: Path) -> None:
    """These tests run the command in this process (`run_cli`); as a program it gives the
    same report and exit codes."""
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event({"msgtype": "m.text", "body": "Bonjour"})), encoding="utf-8")
    for args in (
        ("-c", config_path, "--remote", REMOTE, path),
        ("-c", config_path, "--remote", "nowhere", path),
    ):
        program = run_program("inspect-remote", *args)
        here = run_cli("inspect-remote", *args)
        assert (program.returncode, program.stdout) == (here.returncode, here.stdout)
        assert program.stderr == here.stderr
    assert program.returncode != 0


def test_a_plain_text_message(tmp_path: Path, config_path: Path) -> None:
    report = inspect(tmp_path, event({"msgtype": "m.text", "body": "Réunion à 10 h"}), config_path)
    assert report["ghost"] == {
        "user_id": ghost_of(config_path, ALICE),
        "displayname": "alice (interieur.example.org)",  # no room name offline: the localpart
    }
    assert report["events"] == [
        {
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": "Réunion à 10 h", "m.mentions": {}},
        }
    ]


def test_html_is_sanitised(tmp_path: Path, config_path: Path) -> None:
    html = (
        '<p>Bonjour <script>alert("x")</script><a href="javascript:alert(1)">ici</a> '
        '<a href="https://example.org/ordre">ordre</a></p>'
    )
    ev = event(
        {"msgtype": "m.text", "body": "Bonjour ici ordre", "format": HTML, "formatted_body": html}
    )
    (sent,) = inspect(tmp_path, ev, config_path)["events"]
    content = sent["content"]
    assert content["format"] == HTML
    assert content["body"] == "Bonjour ici ordre"
    formatted = content["formatted_body"]
    assert "<script" not in formatted
    assert "alert" not in formatted
    assert "javascript:" not in formatted
    assert "ici</a>" in formatted
    assert 'href="https://example.org/ordre"' in formatted


def test_a_mention_of_an_allowed_user_is_their_ghost(tmp_path: Path, config_path: Path) -> None:
    bob, eve = f"@bob:{SERVER}", "@eve:evil.org"
    ev = event({"msgtype": "m.text", "body": "bob, eve", "m.mentions": {"user_ids": [bob, eve]}})
    (sent,) = inspect(tmp_path, ev, config_path)["events"]
    assert sent["content"]["m.mentions"] == {"user_ids": [ghost_of(config_path, bob)]}


def test_an_edit_of_an_unknown_message_is_shown_plainly(tmp_path: Path, config_path: Path) -> None:
    ev = event(
        {
            "msgtype": "m.text",
            "body": "* Réunion à 11 h",
            "m.new_content": {"msgtype": "m.text", "body": "Réunion à 11 h"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": UNKNOWN},
        }
    )
    report = inspect(tmp_path, ev, config_path)
    assert report["events"] == [
        {
            "type": "m.room.message",
            "content": {"msgtype": "m.text", "body": "Réunion à 11 h", "m.mentions": {}},
        }
    ]


def test_a_reply_to_an_unknown_message_loses_its_fallback(
    tmp_path: Path, config_path: Path
) -> None:
    ev = event(
        {
            "msgtype": "m.text",
            "body": f"> <{ALICE}> avant\n\naprès",
            "m.relates_to": {"m.in_reply_to": {"event_id": UNKNOWN}},
        }
    )
    (sent,) = inspect(tmp_path, ev, config_path)["events"]
    assert sent["content"] == {"msgtype": "m.text", "body": "après", "m.mentions": {}}


def test_a_file_gets_the_placeholder_url(tmp_path: Path, config_path: Path) -> None:
    ev = event(
        {
            "msgtype": "m.file",
            "body": "ordre.pdf",
            "url": f"mxc://{SERVER}/abc",
            "info": {"mimetype": "application/pdf", "size": 999},
        }
    )
    (sent,) = inspect(tmp_path, ev, config_path)["events"]
    assert sent["content"] == {
        "msgtype": "m.file",
        "body": "ordre.pdf",
        "info": {"mimetype": "application/pdf", "size": 999},
        "url": "mxc://inspect/1",
        "m.mentions": {},
    }


def test_a_file_over_the_limit_becomes_a_notice(tmp_path: Path, config_path: Path) -> None:
    ev = event(
        {
            "msgtype": "m.file",
            "body": "big.iso",
            "url": f"mxc://{SERVER}/abc",
            "info": {"size": 1001},
        }
    )
    (sent,) = inspect(tmp_path, ev, config_path)["events"]
    assert sent["content"] == {
        "msgtype": "m.notice",
        "body": "[big.iso: too large to copy here (limit 1000 bytes)]",
        "m.mentions": {},
    }


# --- who may be relayed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    ["@mallory:evil.org", "@x:allowed.example.org.evil.org", "@x:Interieur.example.org"],
)
def test_senders_of_other_servers_are_refused(
    tmp_path: Path, config_path: Path, sender: str
) -> None:
    report = inspect(
        tmp_path, event({"msgtype": "m.text", "body": "x"}, sender=sender), config_path
    )
    assert refused(report) == (
        f"{sender} is not on a server this link relays (the room is told, once a day per sender)"
    )


def test_a_user_of_another_allowed_server_is_relayed(tmp_path: Path, config_path: Path) -> None:
    sender = "@x:allowed.example.org"
    report = inspect(
        tmp_path, event({"msgtype": "m.text", "body": "x"}, sender=sender), config_path
    )
    assert report["accepted"] is True
    assert report["ghost"]["user_id"] == ghost_of(config_path, sender)


def test_the_bridges_own_account_is_not_relayed_back(tmp_path: Path, config_path: Path) -> None:
    report = inspect(tmp_path, event({"msgtype": "m.text", "body": "x"}, sender=OWN), config_path)
    assert refused(report) == "sent by the bridge's own account"


def test_an_encrypted_message_is_refused(tmp_path: Path, config_path: Path) -> None:
    ev = event(
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA"}, type="m.room.encrypted"
    )
    assert refused(inspect(tmp_path, ev, config_path)) == (
        "an encrypted message cannot be relayed (the room is told, once a day per sender)"
    )


def test_an_encrypted_file_is_refused_and_told(tmp_path: Path, config_path: Path) -> None:
    ev = event({"msgtype": "m.file", "body": "x.pdf", "file": {"url": f"mxc://{SERVER}/abc"}})
    # Regression: the refusal named no sender, so the relay told nobody.
    assert refused(inspect(tmp_path, ev, config_path)) == (
        "encrypted media (the room is told, once a day per sender)"
    )


# --- reactions, redactions, members, the room -------------------------------------------------


def test_a_reaction_becomes_the_notice_for_an_unknown_message(
    tmp_path: Path, config_path: Path
) -> None:
    ev = event(
        {"m.relates_to": {"rel_type": "m.annotation", "event_id": UNKNOWN, "key": "👍"}},
        type="m.reaction",
    )
    report = inspect(tmp_path, ev, config_path)
    assert report["ghost"]["user_id"] == ghost_of(config_path, ALICE)
    assert report["events"] == [
        {
            "type": "m.room.message",
            "content": {
                "msgtype": "m.notice",
                "body": "reacted 👍 to a message that was not relayed here",
                "m.mentions": {},
            },
        }
    ]


def test_a_redaction_is_of_something_never_relayed(tmp_path: Path, config_path: Path) -> None:
    ev = event({}, type="m.room.redaction", redacts=UNKNOWN)
    assert refused(inspect(tmp_path, ev, config_path)) == "a redaction of something never relayed"


def test_a_member_name_is_neutralised(tmp_path: Path, config_path: Path) -> None:
    # Bidi controls to reverse what follows, and the agency's suffix "(localhost)" (the
    # homeserver domain) and another remote's to pass for someone else.
    name = "\u202eAlice\u2066 (LOCALHOST)\u2069 [Armées] Martin"
    bob = f"@bob:{SERVER}"
    ev = event(
        {"membership": "join", "displayname": name},
        type="m.room.member",
        state_key=bob,
        sender=bob,
    )
    report = inspect(tmp_path, ev, config_path)
    assert report["events"] == []
    assert report["ghost"] == {
        "user_id": ghost_of(config_path, bob),
        "displayname": "Alice Martin (interieur.example.org)",
    }


def test_a_member_leaving(tmp_path: Path, config_path: Path) -> None:
    bob = f"@bob:{SERVER}"
    ev = event({"membership": "leave"}, type="m.room.member", state_key=bob, sender=bob)
    report = inspect(tmp_path, ev, config_path)
    assert report["ghost"] == {"user_id": ghost_of(config_path, bob), "displayname": None}
    assert report["events"] == []


@pytest.mark.parametrize(
    ("ev", "reason"),
    [
        (
            event({"algorithm": "m.megolm.v1.aes-sha2"}, type="m.room.encryption", state_key=""),
            "end-to-end encryption was turned on in the remote room: the relay would tell the "
            "room and pause the link",
        ),
        (
            event({"membership": "ban"}, type="m.room.member", state_key=OWN),
            "the bridge's account was banned from the remote room: the relay would tell the "
            "room and pause the link",
        ),
        (
            event(
                {"replacement_room": "!new:interieur.example.org", "body": "upgraded"},
                type="m.room.tombstone",
                state_key="",
            ),
            "the remote room was upgraded to !new:interieur.example.org: the relay would tell "
            "the room (linking the new room is left to someone who may manage links)",
        ),
    ],
)
def test_room_changes_say_what_the_relay_would_do(
    tmp_path: Path, config_path: Path, ev: dict[str, Any], reason: str
) -> None:
    assert refused(inspect(tmp_path, ev, config_path)) == reason


# --- hostile JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ev", "reason"),
    [
        ([event({"msgtype": "m.text", "body": "x"})], "the event is not a JSON object"),
        ("event", "the event is not a JSON object"),
        (None, "the event is not a JSON object"),
        (event({"msgtype": "m.text", "body": "x"}, sender=42), "the event has no valid sender"),
        (
            event({"msgtype": "m.text", "body": "x"}, event_id=["$x"]),
            "the event has no valid event_id",
        ),
        (event({"msgtype": "m.text", "body": "x"}, type=None), "the event has no type"),
        (event(["body"]), "the event content is not a JSON object"),
        (event({"msgtype": "m.text", "body": 42}), "the message body is not text"),
        (event({"msgtype": "m.text", "body": {"a": 1}}), "the message body is not text"),
        (
            event({"msgtype": "m.text", "body": "x"}, sender="@" + "a" * 1_000_000 + f":{SERVER}"),
            "the event has no valid sender",
        ),
        (
            event({"msgtype": "m.text", "body": "x"}, event_id="$" + "e" * 1_000_000),
            "the event has no valid event_id",
        ),
        (
            event(
                {
                    "m.relates_to": {
                        "rel_type": "m.annotation",
                        "event_id": UNKNOWN,
                        "key": "k" * 10**6,
                    }
                },
                type="m.reaction",
            ),
            "a reaction without a valid key",
        ),
    ],
)
def test_wrong_types_and_huge_strings_are_refused(
    tmp_path: Path, config_path: Path, ev: Any, reason: str
) -> None:
    assert refused(inspect(tmp_path, ev, config_path)) == reason


def test_a_huge_body_is_cut_as_the_relay_cuts_it(tmp_path: Path, config_path: Path) -> None:
    # The relay posts a huge message cut to MAX_TEXT characters; so does inspect-remote.
    report = inspect(tmp_path, event({"msgtype": "m.text", "body": "é" * 3_000_000}), config_path)
    (sent,) = report["events"]
    assert sent["content"]["body"] == "é" * MAX_TEXT


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        # Too deep is read as null past 100 levels (as the relay reads /sync), then refused
        # for what it is: not an event.
        (b"[" * 100_000 + b"]" * 100_000, "the event is not a JSON object"),
        (b'{"a": ' * 30_000 + b"1" + b"}" * 30_000, "the event has no valid event_id"),
        (b'{"type": "m.room.message", "sender": "\xff\xfe"}', "not valid JSON ("),
        (
            b'{"content": {"body": "x", "info": {"size": NaN}}}',
            "not valid JSON (JSON constant NaN",
        ),
        (b'{"origin_server_ts": -Infinity}', "not valid JSON (JSON constant -Infinity"),
        (b"", "not valid JSON ("),
        (b'{"type": "m.room.message"', "not valid JSON ("),
        (b'{"a": 1} {"b": 2}', "not valid JSON (Extra data"),
    ],
    # Short IDs: the test ID reaches the subprocess's environment (PYTEST_CURRENT_TEST).
    ids=[
        "100k-nested-lists",
        "30k-nested-objects",
        "invalid-utf8",
        "nan",
        "infinity",
        "empty",
        "truncated",
        "two-documents",
    ],
)
def test_hostile_json_is_refused(
    tmp_path: Path, config_path: Path, raw: bytes, reason: str
) -> None:
    assert refused(inspect_raw(tmp_path, raw, config_path)).startswith(reason)


def test_a_lone_surrogate_still_gives_one_json_document(tmp_path: Path, config_path: Path) -> None:
    raw = json.dumps(event({"msgtype": "m.text", "body": "a\ud800b"})).encode()
    (sent,) = inspect_raw(tmp_path, raw, config_path)["events"]
    assert sent["content"]["body"] == "a?b"


# --- usage and config errors ------------------------------------------------------------------


def one_line_error(result: Inspected, code: int) -> str:
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    return result.stderr


def test_an_unknown_remote_is_a_usage_error(tmp_path: Path, config_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event({"msgtype": "m.text", "body": "x"})), encoding="utf-8")
    stderr = one_line_error(run("-c", config_path, "--remote", "justice", path), 2)
    assert stderr == (
        "passerelle: usage: no remote 'justice' in the config's remotes "
        "(known: armees, interieur)\n"
    )
    # Without a config there is no remote at all.
    assert "pass -c" in one_line_error(run("--remote", REMOTE, path), 2)


def test_a_missing_or_unreadable_file_is_a_usage_error(tmp_path: Path, config_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert one_line_error(run("-c", config_path, "--remote", REMOTE, missing), 2) == (
        f"passerelle: usage: {missing}: no such file\n"
    )
    assert "no such file" in one_line_error(
        run("-c", config_path, "--remote", REMOTE, tmp_path), 2
    )
    # A regular file whose reading fails even for root (tests may run as root).
    unreadable = Path("/proc/self/mem")
    if unreadable.is_file():
        stderr = one_line_error(run("-c", config_path, "--remote", REMOTE, unreadable), 2)
        assert stderr.startswith(f"passerelle: usage: {unreadable}: ")


def test_a_bad_config_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event({"msgtype": "m.text", "body": "x"})), encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("remotes: 42\n", encoding="utf-8")
    assert one_line_error(run("-c", bad, "--remote", REMOTE, path), 10).startswith(
        "passerelle: config error: "
    )
    missing = one_line_error(run("-c", tmp_path / "none.yaml", "--remote", REMOTE, path), 10)
    assert missing.startswith("passerelle: config error: ")


def test_remote_is_required(tmp_path: Path) -> None:
    result = run(tmp_path / "event.json")
    assert result.returncode == 2
    assert "--remote" in result.stderr
    assert "Traceback" not in result.stderr
