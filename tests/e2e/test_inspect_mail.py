"""`passerelle inspect-mail` as the administrator runs it: a real `python -m bridge` process.

Whatever the mail, the tool prints exactly one JSON document and exits 0; only usage errors
(missing file, unknown --link) exit non-zero, with one line on stderr and no traceback.
"""

from __future__ import annotations

import asyncio
import base64
import html.parser
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bridge.config import DatabaseConfig
from bridge.core.authentication import CONTENT_KEY, MARKS, UNVERIFIED
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.db import links as link_db
from bridge.db.engine import open_database
from bridge.registration import dump_yaml
from tests.conftest import bridge_config_dict, run_cli, run_program

LIST = "list@agency.example.org"
MTA = "mx.agency.example.org"
ROOM = "!r:localhost"
MXC_INSPECT = re.compile(r"mxc://inspect/[0-9]+")
BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
# Generous: a process start costs about a second; a quadratic or recursive parser on the
# hostile MIME structures below costs minutes (or a RecursionError traceback).
QUICK = 15.0


@dataclass
class Inspected:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def report(self) -> dict[str, Any]:
        document = json.loads(self.stdout)  # exactly one document, or this raises
        assert isinstance(document, dict)
        return document


def run_inspect(*args: str | Path) -> Inspected:
    started = time.monotonic()
    result = run_cli("inspect-mail", *args)
    return Inspected(
        result.returncode,
        result.stdout.decode("utf-8"),
        result.stderr,
        time.monotonic() - started,
    )


def inspect_bytes(tmp_path: Path, raw: bytes, *options: str | Path) -> dict[str, Any]:
    """Inspect `raw` and check the contract every mail shares: exit 0, one well-formed JSON
    document, nothing alarming on stderr."""
    path = tmp_path / f"mail-{len(list(tmp_path.iterdir()))}.eml"
    path.write_bytes(raw)
    result = run_inspect(*options, path)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    report = result.report
    assert set(report) == {"accepted", "reason", "sender", "auth", "events"}
    assert isinstance(report["accepted"], bool)
    assert isinstance(report["events"], list)
    if report["accepted"]:
        assert report["reason"] is None
        assert report["events"], "an accepted mail posts at least one event"
    else:
        assert isinstance(report["reason"], str)
        assert report["reason"].strip()
        assert report["events"] == []
    if report["sender"] is not None:
        assert set(report["sender"]) == {"address", "ghost", "display_name"}
    for event in report["events"]:
        assert set(event) == {"type", "content"}
        assert event["type"] == "m.room.message"
        assert event["content"]["m.mentions"] == {}
    return report


def mail(
    body: str | bytes = "Bonjour,\nla réunion est à 10h.\n",
    *,
    sender: bytes = b"Agent Dupont <agent@gouv.fr>",
    subject: bytes = b"Reunion de service",
    headers: bytes = b"",
    content_type: bytes = b"text/plain; charset=utf-8",
) -> bytes:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return (
        b"From: " + sender + b"\r\n"
        b"To: " + LIST.encode() + b"\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        b"Message-ID: <inspect-1@gouv.fr>\r\n"
        b"MIME-Version: 1.0\r\n" + headers + b"Content-Type: " + content_type + b"\r\n"
        b"\r\n" + data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    )


def multipart(boundary: bytes, parts: list[bytes]) -> bytes:
    return (
        b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
        + b"--"
        + boundary
        + b"--\r\n"
    )


def main_content(report: dict[str, Any]) -> dict[str, Any]:
    content = report["events"][0]["content"]
    assert content["msgtype"] == "m.text"
    assert isinstance(content, dict)
    return content


def follow_ups(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [event["content"] for event in report["events"][1:]]


class _Tags(html.parser.HTMLParser):
    """Every tag and attribute of an HTML fragment, as a browser's tokenizer sees them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def tags_of(fragment: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    parser = _Tags()
    parser.feed(fragment)
    parser.close()
    return parser.tags


def link_config(tmp_path: Path) -> Path:
    raw = bridge_config_dict(
        8008,
        8009,
        f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
        mail={
            "mailboxes": {
                LIST: {"host": "127.0.0.1", "tls": "none", "user": "list", "password": "secret"}
            }
        },
    )
    raw["mail"]["trust"] = {"authserv_id": [MTA]}
    raw["links"] = [{"room": ROOM, "address": LIST, "allowed_senders": ["gouv.fr", "*.gouv.fr"]}]
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(raw), encoding="utf-8")
    return path


# --- ordinary mail ------------------------------------------------------------------------------


def test_the_program_prints_what_the_tests_see(tmp_path: Path) -> None:
    """These tests run the command in this process (`run_cli`); as a program it gives the
    same report and exit codes."""
    path = tmp_path / "mail.eml"
    path.write_bytes(mail())
    for args in ((path,), (tmp_path / "none.eml",)):
        program = run_program("inspect-mail", *args)
        here = run_cli("inspect-mail", *args)
        assert (program.returncode, program.stdout) == (here.returncode, here.stdout)
        assert program.stderr == here.stderr
    assert program.returncode != 0


def test_a_plain_text_mail_becomes_one_text_event(tmp_path: Path) -> None:
    report = inspect_bytes(tmp_path, mail())
    assert report["accepted"] is True
    assert report["reason"] is None
    assert report["sender"]["address"] == "agent@gouv.fr"
    assert report["sender"]["display_name"] == "Agent Dupont (agent@gouv.fr)"
    assert report["sender"]["ghost"].startswith("@")
    assert "agent=40gouv.fr" in report["sender"]["ghost"]
    assert len(report["events"]) == 1
    content = main_content(report)
    # No config, so no trusted MTA: the sender is unverified, and the event says so first.
    assert report["auth"]["verdict"] == "unverified"
    assert content["body"].startswith(f"{MARKS[UNVERIFIED]}\n\nReunion de service")
    assert content[CONTENT_KEY] == {"verdict": "unverified", "method": None, "domain": None}
    assert "la réunion est à 10h." in content["body"]
    assert content["m.mentions"] == {}
    assert "m.relates_to" not in content


def test_hostile_html_never_reaches_formatted_body(tmp_path: Path) -> None:
    hostile = (
        "<div><p>Bonjour <b>tout le monde</b></p>"
        "<script>alert(1)</script><SCRIPT SRC=//evil.example/x.js></SCRIPT>"
        '<img src=x onerror="alert(2)"><img src="mxc://a.example/b" OnError=alert(3)>'
        '<a href="javascript:alert(4)">a</a><a href=" JaVaScRiPt:alert(5)">b</a>'
        '<a href="java&#x09;script:alert(6)">c</a><a href="&#106;avascript:alert(7)">d</a>'
        '<svg onload="alert(8)"><script>alert(9)</script></svg>'
        '<p style="background:url(javascript:alert(10))" onmouseover="alert(11)">s</p>'
        '<form action="javascript:alert(12)"><input onfocus=alert(13) autofocus></form>'
        '<a href="https://www.example.org/doc">lien</a></div>'
    )
    report = inspect_bytes(
        tmp_path, mail(hostile, content_type=b"text/html; charset=utf-8", subject=b"HTML")
    )
    assert report["accepted"] is True
    content = main_content(report)
    formatted: str = content["formatted_body"]
    lowered = formatted.lower()
    assert "<script" not in lowered
    assert "onerror" not in lowered
    assert "javascript:" not in lowered
    for tag, attributes in tags_of(formatted):
        assert tag not in ("script", "iframe", "form", "input", "svg", "style"), tag
        for name, value in attributes:
            assert not name.startswith("on"), (tag, name)
            squeezed = re.sub(r"[\x00-\x20]", "", value or "").lower()
            assert not squeezed.startswith(("javascript:", "vbscript:", "data:")), (tag, value)
    assert "tout le monde" in formatted
    assert 'href="https://www.example.org/doc"' in formatted
    assert "alert" not in content["body"]


PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40)


def test_inline_image_and_attachments_get_placeholder_urls(tmp_path: Path) -> None:
    related = b"Content-Type: multipart/related; boundary=REL\r\n\r\n" + multipart(
        b"REL",
        [
            b'Content-Type: text/html; charset=utf-8\r\n\r\n<p>Voici le logo : <img src="cid:'
            b'logo@gouv.fr" alt="logo"></p>',
            b"Content-Type: image/png\r\nContent-ID: <logo@gouv.fr>\r\n"
            b"Content-Disposition: inline\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(PNG),
        ],
    )
    pdf = (
        b'Content-Type: application/pdf; name="rapport.pdf"\r\n'
        b'Content-Disposition: attachment; filename="rapport.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"%PDF-1.4 rapport")
    )
    photo = (
        b'Content-Type: image/png\r\nContent-Disposition: attachment; filename="photo.png"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(PNG)
    )
    raw = mail(
        multipart(b"OUT", [related, pdf, photo]),
        subject=b"Images",
        content_type=b"multipart/mixed; boundary=OUT",
    )
    report = inspect_bytes(tmp_path, raw)
    assert report["accepted"] is True
    content = main_content(report)
    formatted: str = content["formatted_body"]
    images = [dict(attrs) for tag, attrs in tags_of(formatted) if tag == "img"]
    assert len(images) == 1
    inline_url = images[0]["src"]
    assert inline_url is not None
    assert MXC_INSPECT.fullmatch(inline_url), inline_url
    assert "cid:" not in formatted
    assert "passerelle.invalid" not in formatted

    files = follow_ups(report)
    by_name = {c["filename"]: c for c in files}
    assert set(by_name) == {"rapport.pdf", "photo.png"}, "the inline image has no own event"
    assert by_name["rapport.pdf"]["msgtype"] == "m.file"
    assert by_name["rapport.pdf"]["info"]["mimetype"] == "application/pdf"
    assert by_name["rapport.pdf"]["info"]["size"] == len(b"%PDF-1.4 rapport")
    assert by_name["photo.png"]["msgtype"] == "m.image"
    urls = [inline_url] + [c["url"] for c in files]
    assert all(MXC_INSPECT.fullmatch(url) for url in urls), urls
    assert len(set(urls)) == 3
    for follow_up in files:
        assert follow_up["body"] == follow_up["filename"]
        assert follow_up["m.relates_to"]["m.in_reply_to"]["event_id"] == "$inspect-main"


@pytest.mark.parametrize(
    ("charset", "encoded", "expected"),
    [
        (
            b"ISO-8859-1",
            b"Caf\xe9 cr\xe8me \xe0 l'\xe9t\xe9, \xe7a co\xfbte 5 \xa3",
            "Café crème à l'été, ça coûte 5 £",
        ),
        (
            b"windows-1252",
            b"\x93Bonjour\x94 \x96 co\xfbt : 5 \x80, \x85 \x9cuvre",
            "“Bonjour” – coût : 5 €, … œuvre",
        ),
    ],
)
def test_legacy_charsets_are_decoded(
    tmp_path: Path, charset: bytes, encoded: bytes, expected: str
) -> None:
    report = inspect_bytes(
        tmp_path,
        mail(
            encoded,
            content_type=b"text/plain; charset=" + charset,
            headers=b"Content-Transfer-Encoding: 8bit\r\n",
        ),
    )
    assert report["accepted"] is True
    content = main_content(report)
    assert expected in content["body"]
    assert "\ufffd" not in content["body"]


def test_a_quoted_reply_is_trimmed_and_the_original_attached(tmp_path: Path) -> None:
    body = (
        "D'accord, je serai là.\n\n"
        "Le lun. 1 janv. 2024 à 09:00, Bob <bob@gouv.fr> a écrit :\n"
        "> Texte original de Bob\n"
        "> deuxième ligne\n"
    )
    raw = mail(body, subject=b"Re: Reunion", headers=b"In-Reply-To: <inspect-0@gouv.fr>\r\n")
    report = inspect_bytes(tmp_path, raw)
    assert report["accepted"] is True
    content = main_content(report)
    assert "D'accord, je serai là." in content["body"]
    assert "Texte original de Bob" not in content["body"]
    assert "Texte original de Bob" not in content["formatted_body"]
    originals = [c for c in follow_ups(report) if c.get("filename") == "original-message.eml"]
    assert len(originals) == 1
    original = originals[0]
    assert original["msgtype"] == "m.file"
    assert original["info"]["mimetype"] == "message/rfc822"
    assert original["info"]["size"] == len(raw)
    assert MXC_INSPECT.fullmatch(original["url"])


def test_an_untrimmed_mail_has_no_original_attached(tmp_path: Path) -> None:
    report = inspect_bytes(tmp_path, mail("Une seule ligne, sans citation."))
    assert [c.get("filename") for c in follow_ups(report)] == []


# --- hostile senders ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sender",
    [
        b"x@protonmail.com@gouv.fr",
        b"agent@gouv.fr, x@evil.com",
        b"Agent <agent@gouv.fr>, Evil <x@evil.com>",
        b"<agent@gouv.fr> <x@evil.com>",
        b"agent@gouv.fr <x@evil.com>",
    ],
)
def test_ambiguous_senders_are_rejected(tmp_path: Path, sender: bytes) -> None:
    report = inspect_bytes(tmp_path, mail(sender=sender))
    assert report["accepted"] is False
    assert report["events"] == []
    if report["sender"] is not None:
        # Whatever it says, it never credits the mail to the agent.
        assert report["sender"]["address"] != "agent@gouv.fr"


def test_a_second_from_header_is_rejected(tmp_path: Path) -> None:
    raw = mail(sender=b"agent@gouv.fr\r\nFrom: x@evil.com")
    report = inspect_bytes(tmp_path, raw)
    assert report["accepted"] is False


def test_an_address_as_display_name_is_not_the_identity(tmp_path: Path) -> None:
    report = inspect_bytes(tmp_path, mail(sender=b'"agent@gouv.fr" <x@evil.com>'))
    assert report["accepted"] is True
    assert report["sender"]["address"] == "x@evil.com"
    assert report["sender"]["display_name"] == "x@evil.com"
    assert "gouv.fr" not in report["sender"]["ghost"]


def test_a_look_alike_domain_is_not_allowed_by_the_link(tmp_path: Path) -> None:
    config = link_config(tmp_path)
    report = inspect_bytes(
        tmp_path,
        mail(sender=b"Agent <agent@gouv.fr.evil.com>"),
        "-c",
        config,
        "--link",
        LIST,
    )
    assert report["accepted"] is False
    assert "not" in report["reason"]
    assert "allowed" in report["reason"]
    assert report["sender"]["address"] == "agent@gouv.fr.evil.com"
    assert report["events"] == []


def passed(domain: str, authserv_id: str = "mx.agency.example.org") -> bytes:
    return (
        f"Authentication-Results: {authserv_id}; dkim=pass header.d={domain}; "
        f"dmarc=pass header.from={domain}\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("sender", "domain"),
    [(b"agent@gouv.fr", "gouv.fr"), (b"Agent <agent@achats.gouv.fr>", "achats.gouv.fr")],
)
def test_the_links_own_domains_are_accepted(tmp_path: Path, sender: bytes, domain: str) -> None:
    config = link_config(tmp_path)
    raw = passed(domain) + mail(sender=sender)
    report = inspect_bytes(tmp_path, raw, "-c", config, "--link", LIST.upper())
    assert report["accepted"] is True
    assert report["auth"] == {
        "verdict": "authenticated",
        "method": "dmarc",
        "domain": domain,
        "reason": "DMARC pass",
    }
    assert "⚠" not in main_content(report)["body"]


@pytest.mark.parametrize(
    "results",
    [
        b"",  # nothing
        passed("achats.gouv.fr", "mx.attacker.example"),  # another server's word
        passed("gouv.fr"),  # about another domain (gouv.fr is a public suffix)
        passed("achats.gouv.fr").replace(b"dmarc=pass", b"dmarc=fail"),
    ],
)
def test_an_unauthenticated_sender_of_a_required_domain_is_refused(
    tmp_path: Path, results: bytes
) -> None:
    config = link_config(tmp_path)
    raw = results + mail(sender=b"Agent <agent@achats.gouv.fr>")
    report = inspect_bytes(tmp_path, raw, "-c", config, "--link", LIST)
    assert report["accepted"] is False
    assert report["auth"]["verdict"] in ("unverified", "failed")
    assert "requires" in report["reason"]
    assert report["events"] == []


def test_a_link_made_in_a_room_is_found_in_the_database(tmp_path: Path) -> None:
    config = link_config(tmp_path)
    made = "made-in-room@agency.example.org"

    async def make_link() -> None:
        db = await open_database(
            DatabaseConfig(url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", pool_size=1)
        )
        try:
            await link_db.save_link(
                db,
                room_id=RoomID(ROOM),
                kind="mail",
                remote=made,
                settings=LinkSettings(allowed_senders=("example.org",)),
                source="bot",
                created_by=None,
            )
        finally:
            await db.close()

    asyncio.run(make_link())
    outsider = inspect_bytes(tmp_path, mail(), "-c", config, "--link", made)
    assert outsider["accepted"] is False
    assert "allowed senders" in outsider["reason"]
    unknown = run_inspect("-c", config, "--link", "nobody@agency.example.org", tmp_path / "x")
    assert unknown.returncode == 2


def test_an_unknown_link_is_a_usage_error_naming_both_places(tmp_path: Path) -> None:
    config = link_config(tmp_path)
    path = tmp_path / "m.eml"
    path.write_bytes(mail())
    result = run_inspect("-c", config, "--link", "nobody@agency.example.org", path)
    assert result.returncode == 2
    assert "config's links" in result.stderr
    assert "Traceback" not in result.stderr


# --- hostile structure --------------------------------------------------------------------------


def nested_multipart(levels: int) -> bytes:
    opening = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i - 1, i)
        for i in range(1, levels)
    )
    closing = b"".join(b"\r\n--b%d--" % i for i in reversed(range(levels)))
    body = opening + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep" % (levels - 1) + closing
    return mail(body, content_type=b"multipart/mixed; boundary=b0")


def many_parts(count: int) -> bytes:
    parts = [b"Content-Type: text/plain\r\n\r\npart %d" % i for i in range(count)]
    return mail(multipart(b"B", parts), content_type=b"multipart/mixed; boundary=B")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(nested_multipart(1000), id="1000-levels"),
        pytest.param(many_parts(20_000), id="20000-parts"),
    ],
)
def test_hostile_mime_structures_are_refused_quickly(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "hostile.eml"
    path.write_bytes(raw)
    result = run_inspect(path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    report = result.report
    assert report["accepted"] is False
    assert report["events"] == []
    assert "could not be parsed" not in report["reason"], "refused by a limit, not a crash"
    assert result.elapsed < QUICK


@pytest.mark.parametrize(
    "header",
    [b"Auto-Submitted: auto-replied", b"Auto-Submitted: auto-generated", b"X-Autoreply: yes"],
)
def test_automatic_replies_are_not_accepted(tmp_path: Path, header: bytes) -> None:
    report = inspect_bytes(tmp_path, mail("Je suis absent.", headers=header + b"\r\n"))
    assert report["accepted"] is False
    assert "automatic" in report["reason"].lower()
    assert report["sender"]["address"] == "agent@gouv.fr"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(random.Random(7).randbytes(64 * 1024), id="random"),
        pytest.param(PNG + random.Random(8).randbytes(4096), id="png"),
        pytest.param(b"PK\x03\x04" + random.Random(9).randbytes(4096), id="zip"),
        pytest.param(bytes(10_000), id="nul"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00\r\n\r\n\x00From: a@gouv.fr\r\n", id="bom"),
    ],
)
def test_a_file_that_is_not_a_mail_is_not_accepted(tmp_path: Path, raw: bytes) -> None:
    report = inspect_bytes(tmp_path, raw)
    assert report["accepted"] is False


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            mail(b"bonjour +2AA- monde", content_type=b"text/plain; charset=utf-7"), id="body"
        ),
        pytest.param(mail(subject=b"=?utf-7?Q?+2AA-?="), id="subject"),
    ],
)
def test_a_utf7_lone_surrogate_still_gives_one_json_document(tmp_path: Path, raw: bytes) -> None:
    inspect_bytes(tmp_path, raw)


def test_file_names_come_out_safe(tmp_path: Path) -> None:
    def attachment(disposition: bytes, data: bytes = b"data") -> bytes:
        return (
            b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
            + disposition
            + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.b64encode(data)
        )

    forwarded = (
        b"Content-Type: message/rfc822\r\n\r\n"
        b"From: bob@gouv.fr\r\nSubject: ../../\xe2\x80\xaeftp.exe\r\n\r\ninner body\r\n"
    )
    parts = [
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nVoir les pieces jointes.",
        attachment(b'filename="../../etc/passwd"'),
        attachment(b'filename="..\\\\..\\\\Windows\\\\win.ini"'),
        attachment(b"filename*=utf-8''facture%E2%80%AEfdp.exe"),
        attachment(
            b'filename="=?utf-8?b?' + base64.b64encode("\u2067x\u2069.txt".encode()) + b'?="'
        ),
        attachment(b'filename="..."'),
        attachment(b'filename=".bashrc"'),
        attachment(b"filename*=utf-8''..%2F..%2F%0D%0Aevil%00.sh"),
        forwarded,
    ]
    raw = mail(multipart(b"B", parts), content_type=b"multipart/mixed; boundary=B")
    report = inspect_bytes(tmp_path, raw)
    assert report["accepted"] is True
    files = follow_ups(report)
    assert len(files) == len(parts) - 1
    for content in files:
        for name in (content["filename"], content["body"]):
            assert name, content
            assert "/" not in name, name
            assert "\\" not in name, name
            assert not name.startswith("."), name
            assert name not in (".", ".."), name
            assert not BIDI.search(name), ascii(name)
            assert not CONTROLS.search(name), ascii(name)
    names = [c["filename"] for c in files]
    assert "passwd" in names
    assert "win.ini" in names
    assert any(name.endswith(".eml") for name in names)


# --- usage errors -------------------------------------------------------------------------------


def assert_usage_error(result: Inspected, mentions: str) -> None:
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert mentions in lines[0]


def test_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.eml"
    assert_usage_error(run_inspect(missing), "nowhere.eml")


def test_an_unknown_link_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.eml"
    path.write_bytes(mail())
    config = link_config(tmp_path)
    assert_usage_error(
        run_inspect("-c", config, "--link", "other@agency.example.org", path),
        "other@agency.example.org",
    )


def test_a_link_without_a_config_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "ok.eml"
    path.write_bytes(mail())
    assert_usage_error(run_inspect("--link", LIST, path), LIST)
