"""Command parsing, the command processor's replies, and the permission table."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from bridge.core.commands import (
    MAX_COMMAND_LENGTH,
    Command,
    CommandProcessor,
    Reply,
    parse_command,
)
from bridge.core.ids import UserID
from bridge.core.permissions import PermissionLevel, PermissionTable, server_of

PREFIX = "!passerelle"

STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "status": "degraded",
    "database": {"dialect": "sqlite", "ok": True},
    "homeserver": {"reachable": False, "last_error": "<b>timeout</b> & more"},
    "queue": {"pending": 2, "done": 7, "dead_letters": 1},
}


async def status_source() -> dict[str, Any]:
    return STATUS


def processor(prefix: str = PREFIX) -> CommandProcessor:
    return CommandProcessor(prefix, status_source)


def visible_text(markup: str) -> str:
    """The text a client shows for reply HTML: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


def assert_html_is_escaped(reply: Reply) -> None:
    """Only the processor's own tags appear in the HTML; everything else is escaped."""
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", reply.html))
    assert tags <= {"p", "ul", "li", "code", "br"}, reply.html


# --- parse_command ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", ["!passerelle help", "!PASSERELLE help", "!Passerelle   help  "])
def test_prefix_is_case_insensitive(body: str) -> None:
    assert parse_command(body, PREFIX, is_direct=False) == Command("help", ())


@pytest.mark.parametrize("is_direct", [True, False])
@pytest.mark.parametrize("body", ["!passerelle", "  !passerelle  ", "!PasseRelle\n"])
def test_prefix_alone_means_help(body: str, is_direct: bool) -> None:
    assert parse_command(body, PREFIX, is_direct=is_direct) == Command("help", ())


def test_direct_chat_without_prefix() -> None:
    assert parse_command("status now", PREFIX, is_direct=True) == Command("status", ("now",))


def test_direct_chat_with_prefix() -> None:
    assert parse_command("!passerelle status", PREFIX, is_direct=True) == Command("status", ())


@pytest.mark.parametrize(
    "body", ["help", "status", "hello !passerelle help", "!passerellehelp", "", "   "]
)
def test_group_room_without_prefix_is_not_a_command(body: str) -> None:
    assert parse_command(body, PREFIX, is_direct=False) is None


def test_command_names_are_casefolded_and_args_kept() -> None:
    assert parse_command("!passerelle STATUS Foo BAR", PREFIX, is_direct=False) == Command(
        "status", ("Foo", "BAR")
    )
    assert parse_command("HeLP", PREFIX, is_direct=True) == Command("help", ())
    assert parse_command("STRAẞE", PREFIX, is_direct=True) == Command("strasse", ())


def test_whitespace_separates_arguments() -> None:
    assert parse_command("!passerelle link\ta\n b", PREFIX, is_direct=False) == Command(
        "link", ("a", "b")
    )


@pytest.mark.parametrize("is_direct", [True, False])
def test_body_longer_than_limit_is_not_a_command(is_direct: bool) -> None:
    assert MAX_COMMAND_LENGTH == 2000
    body = "!passerelle help " + "x" * 2000
    assert len(body) > 2000
    assert parse_command(body, PREFIX, is_direct=is_direct) is None
    at_limit = "!passerelle help " + "x" * (2000 - len("!passerelle help "))
    assert len(at_limit) == 2000
    assert parse_command(at_limit, PREFIX, is_direct=is_direct) is not None
    assert parse_command("help" + " " * 1997, PREFIX, is_direct=True) is None


# --- CommandProcessor ---------------------------------------------------------------------------


async def test_unknown_command_is_quoted_and_truncated() -> None:
    name = "x" * 49 + "ABCDEFGHIJ" + "y" * 40
    reply = await processor().run(Command(name, ()), PermissionLevel.USER, is_direct=False)
    assert f"“{name[:50]}”" in reply.text
    assert name[:51] not in reply.text
    assert "!passerelle help" in reply.text


async def test_unknown_command_hint_in_direct_chat() -> None:
    reply = await processor().run(Command("frobnicate", ()), PermissionLevel.USER, is_direct=True)
    assert "“frobnicate”" in reply.text
    assert "“help”" in reply.text
    assert PREFIX not in reply.text


@pytest.mark.parametrize("name", ["help", "status", "frobnicate"])
@pytest.mark.parametrize("is_direct", [True, False])
async def test_people_without_permission_are_not_allowed(name: str, is_direct: bool) -> None:
    reply = await processor().run(Command(name, ()), PermissionLevel.NONE, is_direct=is_direct)
    assert "not allowed" in reply.text
    assert "status" not in reply.text.lower().replace("not allowed", "")


async def test_help_in_a_room_shows_the_prefix() -> None:
    reply = await processor().run(Command("help", ()), PermissionLevel.USER, is_direct=False)
    assert "• !passerelle help — " in reply.text
    assert "• !passerelle status — " in reply.text
    assert "<code>!passerelle help</code>" in reply.html
    assert_html_is_escaped(reply)


async def test_help_in_a_direct_chat_shows_bare_commands() -> None:
    reply = await processor().run(Command("help", ()), PermissionLevel.ADMIN, is_direct=True)
    assert "• help — " in reply.text
    assert "• status — " in reply.text
    assert "• !passerelle help" not in reply.text
    assert "<code>help</code>" in reply.html
    assert "optional" in reply.text


async def test_status_reply() -> None:
    reply = await processor().run(Command("status", ()), PermissionLevel.USER, is_direct=True)
    assert reply.text.splitlines()[0] == "Passerelle 0.1.0: degraded"
    assert "Database (sqlite): ok" in reply.text
    assert "unreachable (last error: <b>timeout</b> & more)" in reply.text
    assert "2 pending, 7 handled, 1 dead letters" in reply.text
    assert "&lt;b&gt;timeout&lt;/b&gt; &amp; more" in reply.html
    assert_html_is_escaped(reply)
    assert visible_text(reply.html.replace("<br>", "\n")) == reply.text


@pytest.mark.parametrize("is_direct", [True, False])
async def test_script_command_is_escaped(is_direct: bool) -> None:
    command = parse_command("!passerelle <script>alert(1)</script>", PREFIX, is_direct=is_direct)
    assert command is not None
    assert command.name == "<script>alert(1)</script>"
    reply = await processor().run(command, PermissionLevel.USER, is_direct=is_direct)
    assert "<script>" in reply.text
    assert "<script" not in reply.html
    assert "&lt;script&gt;" in reply.html
    assert_html_is_escaped(reply)
    assert visible_text(reply.html) == reply.text


async def test_prefix_with_markup_is_escaped_in_help() -> None:
    proc = processor(prefix="<b>bot")
    for command, is_direct in ((Command("help", ()), False), (Command("nope", ()), False)):
        reply = await proc.run(command, PermissionLevel.USER, is_direct=is_direct)
        assert "<b>" not in reply.html
        assert "&lt;b&gt;bot" in reply.html
        assert_html_is_escaped(reply)


@pytest.mark.parametrize("text", ["a < b & c > d", 'say "hi"', "line one\nline <two>", "", "\n"])
def test_plain_reply_is_escaped_line_by_line(text: str) -> None:
    reply = Reply.plain(text)
    assert reply.text == text
    assert reply.html == "<br>".join(html.escape(line) for line in text.split("\n"))
    assert_html_is_escaped(reply)


# --- PermissionTable ----------------------------------------------------------------------------


def table(**extra: PermissionLevel) -> PermissionTable:
    entries = {
        "@alice:localhost": PermissionLevel.ADMIN,
        "@mallory:localhost": PermissionLevel.NONE,
        "localhost": PermissionLevel.USER,
        "*": PermissionLevel.NONE,
    }
    return PermissionTable(entries | {k.replace("_", "."): v for k, v in extra.items()})


def level(t: PermissionTable, mxid: str) -> PermissionLevel:
    return t.level_for(UserID(mxid))


def test_exact_user_beats_server_beats_star() -> None:
    t = PermissionTable(
        {
            "*": PermissionLevel.USER,
            "localhost": PermissionLevel.ADMIN,
            "@bob:localhost": PermissionLevel.USER,
        }
    )
    assert level(t, "@bob:localhost") is PermissionLevel.USER
    assert level(t, "@carol:localhost") is PermissionLevel.ADMIN
    assert level(t, "@dave:elsewhere.org") is PermissionLevel.USER


def test_user_entry_can_lower_a_server_level() -> None:
    t = table()
    assert level(t, "@alice:localhost") is PermissionLevel.ADMIN
    assert level(t, "@mallory:localhost") is PermissionLevel.NONE
    assert level(t, "@bob:localhost") is PermissionLevel.USER


@pytest.mark.parametrize(
    "mxid",
    [
        "@eve:evil-localhost",
        "@eve:localhost.evil.com",
        "@eve:evil.localhost",
        "@eve:localhost:8448",
        "@eve:localhostx",
        "@localhost:evil.com",
        "@eve:evil.com:localhost",
    ],
)
def test_server_match_is_exact(mxid: str) -> None:
    assert level(table(), mxid) is PermissionLevel.NONE
    assert level(table(**{"*": PermissionLevel.USER}), mxid) is PermissionLevel.USER


def test_server_match_ignores_case() -> None:
    assert level(table(), "@bob:LocalHost") is PermissionLevel.USER
    assert server_of("@bob:LocalHost") == "localhost"


def test_user_match_is_exact() -> None:
    assert level(table(), "@alice:localhost") is PermissionLevel.ADMIN
    assert level(table(), "@alicex:localhost") is PermissionLevel.USER
    assert level(table(), "@Alice:localhost") is PermissionLevel.USER


@pytest.mark.parametrize("mxid", ["@alice", "alice", "", "@", "localhost@alice"])
def test_user_id_without_colon_gets_star_or_none(mxid: str) -> None:
    assert level(table(), mxid) is PermissionLevel.NONE
    star = PermissionTable({"*": PermissionLevel.USER, "localhost": PermissionLevel.ADMIN})
    assert level(star, mxid) is PermissionLevel.USER
    assert level(PermissionTable({}), mxid) is PermissionLevel.NONE


def test_bare_server_name_is_not_a_user() -> None:
    t = PermissionTable({"localhost": PermissionLevel.ADMIN})
    assert level(t, "localhost") is PermissionLevel.NONE


def test_empty_table_allows_nobody() -> None:
    assert level(PermissionTable({}), "@alice:localhost") is PermissionLevel.NONE


def test_as_dict_uses_level_names() -> None:
    assert table().as_dict() == {
        "@alice:localhost": "admin",
        "@mallory:localhost": "none",
        "localhost": "user",
        "*": "none",
    }


@pytest.mark.parametrize(
    ("value", "expected"),
    [("user", PermissionLevel.USER), ("ADMIN", PermissionLevel.ADMIN)],
)
def test_parse_level(value: str, expected: PermissionLevel) -> None:
    assert PermissionLevel.parse(value) is expected


@pytest.mark.parametrize("value", ["root", "none", "", None, 10, True])
def test_parse_bad_level(value: object) -> None:
    with pytest.raises(ValueError, match="unknown permission level"):
        PermissionLevel.parse(value)


async def test_status_reply_shows_the_outbox() -> None:
    report = STATUS | {
        "outbox": {
            "pending": 3,
            "sent": 40,
            "failed": 1,
            "smtp": {"reachable": False, "last_error": "connection refused"},
        }
    }

    async def source() -> dict[str, Any]:
        return report

    reply = await CommandProcessor(PREFIX, source).run(
        Command("status", ()), PermissionLevel.USER, is_direct=True
    )
    assert "Mail out: 3 waiting, 40 sent, 1 failed (SMTP last error: connection refused)" in (
        reply.text
    )
    # Without an SMTP server configured there is no outbox section and no line.
    plain = await processor().run(Command("status", ()), PermissionLevel.USER, is_direct=True)
    assert "Mail out" not in plain.text


async def test_status_reply_shows_each_remote() -> None:
    report = STATUS | {
        "remotes": {
            "interieur": {"reachable": True, "rooms": 2},
            "armees": {"reachable": False, "last_error": "timeout", "rooms": 1},
            "culture": {"reachable": False, "stopped": "M_UNKNOWN_TOKEN", "rooms": 1},
            "broken": "not a mapping",
        },
        "remote_outbox": {"pending": 2, "sent": 9, "failed": 0},
    }

    async def source() -> dict[str, Any]:
        return report

    reply = await CommandProcessor(PREFIX, source).run(
        Command("status", ()), PermissionLevel.USER, is_direct=True
    )
    assert "Remote interieur: reachable; 2 linked room(s)" in reply.text
    assert "Remote armees: unreachable (last error: timeout); 1 linked room(s)" in reply.text
    assert "Remote culture: stopped: M_UNKNOWN_TOKEN; 1 linked room(s)" in reply.text
    assert "broken" not in reply.text
    assert "To remote rooms: 2 waiting, 9 sent, 0 failed" in reply.text
    plain = await processor().run(Command("status", ()), PermissionLevel.USER, is_direct=True)
    assert "Remote" not in plain.text
