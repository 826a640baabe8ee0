"""Composing mail from Matrix messages: hostile names, subjects, bodies, HTML, IDs, files."""

from __future__ import annotations

import dataclasses
import email
import email.message
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.core.message import Attachment
from bridge.mail import compose as compose_module
from bridge.mail.compose import (
    ComposeError,
    OutgoingMail,
    compose,
    has_loop_marker,
    is_own_message_id,
    loop_marker,
    own_message_id,
)

SECRET = b"0123456789abcdef0123456789abcdef"
FROM = "passerelle@agency.example.org"
LIST = "list@lists.example.org"
DOMAIN = "agency.example.org"
NOW = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
MXID = "@alice:agency.example.org"
KNOWN_HEADERS = {
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "x-passerelle-loop",
    "x-auto-response-suppress",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
}
# Every way of ending a line a parser might honour, and encoded ones (CVE-2024-6923).
NEWLINES = ["\r\n", "\r", "\n", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x00"]
ENCODED_NEWLINE = "=?utf-8?q?x=0D=0ABcc:_victim@example.org?="
ENCODED_NEWLINE_B = "=?utf-8?b?eA0KQmNjOiB2aWN0aW1AZXhhbXBsZS5vcmc=?="


def outgoing(**overrides: object) -> OutgoingMail:
    fields: dict[str, object] = {
        "event_id": "$event1:agency.example.org",
        "sender_mxid": MXID,
        "sender_name": "Alice Martin",
        "body_text": "Hello list.",
        "body_html": None,
        "subject": "",
        "in_reply_to": None,
        "references": (),
    }
    fields.update(overrides)
    return OutgoingMail(**fields)  # type: ignore[arg-type]


def build(mail: OutgoingMail, **kwargs: object) -> bytes:
    options: dict[str, object] = {
        "from_address": FROM,
        "list_address": LIST,
        "domain": DOMAIN,
        "secret": SECRET,
        "now": NOW,
    }
    options.update(kwargs)
    return compose(mail, **options)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def header_block(raw: bytes) -> list[bytes]:
    head, separator, _ = raw.partition(b"\r\n\r\n")
    assert separator
    return head.split(b"\r\n")


def header_names(raw: bytes) -> list[str]:
    """The top-level field names, after checking the block line by line: every line is a
    known field or a folded continuation, with no stray CR or LF."""
    names: list[str] = []
    for line in header_block(raw):
        assert b"\r" not in line
        assert b"\n" not in line
        if line[:1] in (b" ", b"\t"):
            assert names, "continuation before the first field"
            continue
        name, colon, _ = line.partition(b":")
        assert colon, line
        assert name.decode("ascii").lower() in KNOWN_HEADERS, line
        names.append(name.decode("ascii").lower())
    return names


def assert_safe(raw: bytes) -> email.message.EmailMessage:
    """The checks every composed mail must pass: ASCII, CRLF only, known fields once each, one
    From with the bridge's address, the list as the only recipient, no header injected in any
    MIME part either."""
    assert raw.isascii()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    names = header_names(raw)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert len(names) == len(set(names))
    assert names.count("from") == 1
    assert names.count("to") == 1
    msg = parse(raw)
    assert [a.addr_spec for a in msg["From"].addresses] == [FROM]
    assert [a.addr_spec for a in msg["To"].addresses] == [LIST]
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == [LIST]
    for name in ("Cc", "Bcc", "Resent-To", "Resent-Cc", "Resent-Bcc", "Sender"):
        assert msg.get_all(name) is None
    for part in msg.walk():
        if part is not msg:
            assert {k.lower() for k in part} <= {
                "content-type",
                "content-transfer-encoding",
                "content-disposition",
            }
    return msg


def display_name(raw: bytes) -> str:
    name = parse(raw)["From"].addresses[0].display_name
    assert isinstance(name, str)
    return name


def text_part(msg: email.message.EmailMessage) -> str:
    """The text/plain body with its CRLF line ends read as LF (no bare CR may be left)."""
    part = msg.get_body(("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def html_part(msg: email.message.EmailMessage) -> str | None:
    part = msg.get_body(("html",))
    if part is None:
        return None
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def raw_header(raw: bytes, name: str) -> str:
    """A top-level field's raw value, continuation lines unfolded (CRLF removed)."""
    lines = header_block(raw)
    prefix = name.lower().encode("ascii") + b":"
    for index, line in enumerate(lines):
        if line.lower().startswith(prefix):
            value = line[len(prefix) :]
            for more in lines[index + 1 :]:
                if more[:1] not in (b" ", b"\t"):
                    break
                value += more
            return value.decode("ascii").strip()
    raise AssertionError(f"no {name} header")


# --- the basics -------------------------------------------------------------------------------


def test_plain_message_headers() -> None:
    raw = build(outgoing())
    msg = assert_safe(raw)
    assert raw_header(raw, "From") == f"Alice Martin via Passerelle <{FROM}>"
    assert msg["Subject"] == "Hello list."
    assert msg["Message-ID"] == f"<{own_message_id('$event1:agency.example.org', DOMAIN, SECRET)}>"
    assert msg["X-Passerelle-Loop"] == DOMAIN
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime == NOW
    for absent in ("Precedence", "Auto-Submitted", "In-Reply-To", "References"):
        assert msg[absent] is None
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert text_part(msg) == "Hello list.\n"


def test_html_gives_multipart_alternative() -> None:
    raw = build(outgoing(body_text="Hello *list*", body_html="<p>Hello <em>list</em></p>"))
    msg = assert_safe(raw)
    assert msg.get_content_type() == "multipart/alternative"
    assert text_part(msg) == "Hello *list*\n"
    assert html_part(msg) == "<p>Hello <em>list</em></p>\n"


def test_non_ascii_body_is_encoded_for_7bit_transport() -> None:
    raw = build(outgoing(body_text="Réunion à 14 h — salle 3 ✓" + " long" * 40))
    msg = assert_safe(raw)
    assert text_part(msg).startswith("Réunion à 14 h — salle 3 ✓")
    body = raw.partition(b"\r\n\r\n")[2]
    assert all(len(line) <= 78 for line in body.split(b"\r\n"))
    assert all(len(line) <= 78 for line in header_block(raw) if b"Message-ID" not in line)


def test_custom_bridge_header_and_other_timezone() -> None:
    paris = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    raw = build(outgoing(), bridge_header="X-Bridge-Loop", now=paris)
    assert parse(raw)["X-Bridge-Loop"] == DOMAIN
    assert parse(raw)["Date"].datetime == paris
    assert "x-passerelle-loop" not in {k.lower() for k in parse(raw)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"from_address": "Eve <eve@evil.example>"},
        {"from_address": "a@b.org, c@d.org"},
        {"list_address": "list@lists.example.org\r\nBcc: victim@example.org"},
        {"list_address": '"quoted"@lists.example.org'},
        {"list_address": "=?utf-8?q?a?=@lists.example.org"},
        {"domain": "agency.example.org\r\nBcc: x"},
        {"bridge_header": "X-Loop\r\nBcc"},
        {"bridge_header": "To"},
        {"now": datetime(2024, 5, 1, 12, 0)},  # naive
        {"secret": b"short"},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"."):
        build(outgoing(), **kwargs)


# --- hostile display names --------------------------------------------------------------------


def test_display_name_with_crlf_bcc() -> None:
    raw = build(outgoing(sender_name="Eve\r\nBcc: victim@example.org"))
    msg = assert_safe(raw)
    assert b"bcc" not in raw.lower()
    assert b"victim" not in raw
    assert len(msg.get_all("From") or []) == 1
    # It looks like an address once on one line: the MXID stands in for it.
    assert display_name(raw) == f"{MXID} via Passerelle"


def test_display_name_with_encoded_newline_cve_2024_6923() -> None:
    raw = build(outgoing(sender_name="=?utf-8?q?Eve=0D=0ABcc:_victim@example.org?="))
    msg = assert_safe(raw)
    assert b"bcc" not in raw.lower()
    assert len(msg.get_all("From") or []) == 1
    assert display_name(raw) == f"{MXID} via Passerelle"


@pytest.mark.parametrize(
    "encoded", ["=?utf-8?q?Eve=0D=0ABcc:_victim?=", "=?utf-8?b?RXZlDQpCY2M6IHY=?="]
)
def test_encoded_words_without_at_are_neutralised(encoded: str) -> None:
    raw = build(outgoing(sender_name=encoded))
    assert_safe(raw)
    name = display_name(raw)
    assert "\r" not in name
    assert "\n" not in name
    assert "=?" not in name  # no client decodes it either
    assert name.endswith(" via Passerelle")


@pytest.mark.parametrize("newline", NEWLINES)
def test_display_name_with_any_line_break(newline: str) -> None:
    raw = build(outgoing(sender_name=f"Eve{newline}Bcc: victim"))
    assert_safe(raw)
    assert display_name(raw) == "Eve Bcc: victim via Passerelle" or display_name(raw) == (
        "EveBcc: victim via Passerelle"
    )


@pytest.mark.parametrize(
    "name",
    [
        '"',
        '"Boss" "',
        'Eve" <x@evil.com>, "y',
        "<x@evil.com>",
        "x@evil.com",
        "boss\uff20agency.example.org",  # FULLWIDTH COMMERCIAL AT
        "@",
        "Eve \u202emoc.live\u202c",
        "\u202e\u2066\u200b",
        "A" * 10_000,
        "é" * 10_000,
        "Eve; (comment) \\ , :",
        "Eve\x00\x07\x1b[31m",
    ],
)
def test_hostile_display_names_give_a_sane_from(name: str) -> None:
    raw = build(outgoing(sender_name=name))
    msg = assert_safe(raw)
    shown = display_name(raw)
    assert shown.endswith(" via Passerelle")
    assert "evil.com" not in shown
    assert "\u202e" not in shown
    assert "\u2066" not in shown
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown)
    assert len(shown) < 200
    assert len(msg["From"].addresses) == 1
    if "@" in name or "\uff20" in name or not name.strip("\u202e\u2066\u200b"):
        assert shown == f"{MXID} via Passerelle"


@pytest.mark.parametrize(
    "name",
    [
        "Martin, Jean (DGFiP/SI/Bureau SI-2B) - Ministry of Finance, Paris",
        'Dr. J.-P. "Jean-Pierre" Dupont; Head of Unit [Budget] <Finance> \\ Paris',
        "a.b" + "x" * 97,
    ],
)
def test_long_ascii_names_needing_quotes_keep_their_quotes(name: str) -> None:
    # Python 3.11 drops the quotes of a quoted-string display name it splits across lines;
    # the name must come back exactly, as one mailbox, without defects.
    raw = build(outgoing(sender_name=name, disambiguate=True))
    msg = assert_safe(raw)
    assert msg["From"].defects == ()
    assert display_name(raw) == f"{name} ({MXID}) via Passerelle"


def test_long_mxid_when_disambiguating() -> None:
    mxid = "@jean-baptiste.de-la-rochefoucauld.consultant:agency.interieur.example.org"
    raw = build(outgoing(sender_name="Jean", sender_mxid=mxid, disambiguate=True))
    assert_safe(raw)
    assert display_name(raw) == f"Jean ({mxid}) via Passerelle"


def test_disambiguate_adds_the_mxid() -> None:
    raw = build(outgoing(sender_name="Alice", disambiguate=True))
    assert_safe(raw)
    assert display_name(raw) == f"Alice ({MXID}) via Passerelle"


def test_hostile_mxid_is_cleaned_too() -> None:
    raw = build(outgoing(sender_name="", sender_mxid="@eve:x.org\r\nBcc: victim@example.org"))
    assert_safe(raw)
    assert display_name(raw) == "@eve:x.org Bcc: victim@example.org via Passerelle"


# --- hostile subjects and bodies --------------------------------------------------------------


@pytest.mark.parametrize("newline", [*NEWLINES, ENCODED_NEWLINE, ENCODED_NEWLINE_B])
def test_hostile_thread_subject(newline: str) -> None:
    subject = f"Budget{newline}Bcc: victim@example.org{newline}To: x@evil.example"
    raw = build(outgoing(subject=subject, in_reply_to="m1@lists.example.org"))
    msg = assert_safe(raw)
    assert msg["Subject"].startswith("Re: Budget")
    assert not any(c in msg["Subject"] for c in "\r\n\x00\u2028\u2029\x85")
    assert "=?" not in msg["Subject"]


@pytest.mark.parametrize("newline", [*NEWLINES, ENCODED_NEWLINE, ENCODED_NEWLINE_B])
def test_hostile_body_first_line_becomes_a_safe_subject(newline: str) -> None:
    body = f"Hi{newline}Bcc: victim@example.org{newline}{newline}Subject: x\r\n\r\nrest"
    raw = build(outgoing(body_text=body))
    msg = assert_safe(raw)
    assert not any(c in msg["Subject"] for c in "\r\n\x00\u2028\u2029\x85")
    assert "=?" not in msg["Subject"]
    text = text_part(msg)
    assert "\x00" not in text
    assert "\r" not in text
    assert "rest" in text


def test_hostile_body_stays_in_the_body() -> None:
    body = "Hello\r\nBcc: victim@example.org\r\n\r\nTo: x@evil.example\n.\nFrom me\x00\u2028end"
    raw = build(outgoing(body_text=body, subject="Thread", in_reply_to="m1@x.org"))
    msg = assert_safe(raw)
    assert text_part(msg) == (
        "Hello\nBcc: victim@example.org\n\nTo: x@evil.example\n.\nFrom me\nend\n"
    )


def test_lone_surrogates_do_not_break_composition() -> None:
    raw = build(
        outgoing(
            sender_name="Eve\ud800",
            body_text="a\udfffb",
            body_html="<p>\ud800</p>",
            subject="s\udc80",
            attachments=(Attachment("f\ud800.txt", "text/plain", b"x"),),
        )
    )
    assert_safe(raw)


def test_new_conversation_subject_is_the_first_line() -> None:
    raw = build(outgoing(body_text="\n  \nQuarterly   figures are in " + "x" * 100 + "\nmore"))
    subject = parse(raw)["Subject"]
    assert subject.startswith("Quarterly figures are in xxx")
    assert len(subject) == 78


@pytest.mark.parametrize("body", ["", "   \n\n", "\x00\u202e"])
def test_empty_body_gives_no_subject(body: str) -> None:
    raw = build(outgoing(body_text=body))
    assert_safe(raw)
    assert parse(raw)["Subject"] == "(no subject)"


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Budget", "Re: Budget"),
        ("Re: Budget", "Re: Budget"),
        ("Re: Re: x", "Re: x"),
        ("RE: re: Re:x", "Re: x"),
        ("Re [2]: Re[3] : x", "Re: x"),
        ("Re：x", "Re: x"),
        ("Regarding: x", "Re: Regarding: x"),
        ("Fwd: Re: x", "Re: Fwd: Re: x"),
    ],
)
def test_reply_subject_is_not_doubled(subject: str, expected: str) -> None:
    raw = build(outgoing(subject=subject, in_reply_to="m1@lists.example.org"))
    assert parse(raw)["Subject"] == expected


def test_long_subject_without_spaces_is_still_decodable() -> None:
    raw = build(outgoing(subject="Ω" + "x" * 400, in_reply_to="m1@x.org"))
    assert_safe(raw)
    assert parse(raw)["Subject"] == "Re: Ω" + "x" * 299


# --- HTML and reply fallbacks -----------------------------------------------------------------


def test_formatted_body_is_resanitised() -> None:
    html = (
        '<mx-reply><blockquote><a href="https://matrix.to/#/!r:x/$e">In reply to</a>'
        '<a href="https://matrix.to/#/@bob:x">@bob:x</a><br>the secret plan</blockquote>'
        "</mx-reply>"
        "<p onclick=alert(1)>Real <script>alert('x')</script>answer</p>"
        '<a href="javascript:alert(1)">click</a>'
        '<a href="JaVaScRiPt&#58;alert(1)">click2</a>'
        '<img src="http://tracker.example/pixel.png" alt="pixel">'
        '<img src="mxc://x/y">'
        '<style>body{}</style><iframe src="https://evil.example"></iframe>'
        '<a href="https://ok.example/">ok</a>'
    )
    raw = build(outgoing(body_text="Real answer", body_html=html))
    msg = assert_safe(raw)
    out = html_part(msg)
    assert out is not None
    lowered = out.lower()
    for forbidden in (
        "<script",
        "javascript",
        "<img",
        "tracker.example",
        "mx-reply",
        "the secret plan",
        "in reply to",
        "onclick",
        "<style",
        "<iframe",
        "mxc://",
    ):
        assert forbidden not in lowered, forbidden
    assert "Real answer" in out
    assert '<a href="https://ok.example/"' in out


@pytest.mark.parametrize(
    "html",
    [
        "<MX-REPLY class=x>quoted</Mx-Reply >answer",
        "<mx-reply><mx-reply>nested</mx-reply>quoted</mx-reply>answer",
        "<mx-reply\n>quoted</mx-reply\t>answer",
    ],
)
def test_mx_reply_variants_are_removed(html: str) -> None:
    msg = assert_safe(build(outgoing(body_text="answer", body_html=html)))
    assert html_part(msg) == "answer\n"


def test_unterminated_mx_reply_drops_the_rest() -> None:
    msg = assert_safe(build(outgoing(body_text="answer", body_html="<mx-reply>quoted answer")))
    assert html_part(msg) is None  # nothing left: text only
    assert text_part(msg) == "answer\n"


def test_html_that_sanitises_to_nothing_gives_text_only() -> None:
    raw = build(outgoing(body_text="hi", body_html="<script>x</script>"))
    assert parse(raw).get_content_type() == "text/plain"


def test_text_from_html_when_body_is_empty() -> None:
    msg = assert_safe(build(outgoing(body_text="", body_html="<p>From <b>HTML</b></p>")))
    assert "From HTML" in text_part(msg)
    assert msg["Subject"] == "From HTML"


def test_text_reply_fallback_is_stripped() -> None:
    raw = build(
        outgoing(
            body_text="> <@bob:x> quoted\n\nreal answer",
            subject="Plan",
            in_reply_to="m1@lists.example.org",
        )
    )
    assert text_part(parse(raw)) == "real answer\n"


@pytest.mark.parametrize(
    "body",
    [
        "> <@bob:x> quoted\n> second line\n>\n> third\n\nreal answer",
        "> * <@bob:x> waves\r\n\r\nreal answer",
    ],
)
def test_multi_line_and_emote_fallbacks_are_stripped(body: str) -> None:
    raw = build(outgoing(body_text=body, subject="Plan", in_reply_to="m1@x.org"))
    assert text_part(parse(raw)) == "real answer\n"


def test_fallback_kept_when_not_a_reply_or_not_a_fallback() -> None:
    not_reply = build(outgoing(body_text="> <@bob:x> quoted\n\nreal answer"))
    assert text_part(parse(not_reply)) == "> <@bob:x> quoted\n\nreal answer\n"
    own_quote = build(
        outgoing(body_text="> a quote\n\nmy answer", subject="P", in_reply_to="m@x.org")
    )
    assert text_part(parse(own_quote)) == "> a quote\n\nmy answer\n"
    no_blank = build(outgoing(body_text="> <@bob:x> quoted", subject="P", in_reply_to="m@x.org"))
    assert text_part(parse(no_blank)) == "> <@bob:x> quoted\n"


# --- corrections ------------------------------------------------------------------------------


def test_correction_in_a_thread() -> None:
    raw = build(
        outgoing(
            body_text="The meeting is at 3 pm",
            body_html="<p>The meeting is at <b>3 pm</b></p>",
            subject="Re: Meeting",
            in_reply_to="m1@lists.example.org",
            correction=True,
        )
    )
    msg = assert_safe(raw)
    assert msg["Subject"] == "Re: Meeting"
    assert text_part(msg) == "Correction: The meeting is at 3 pm\n"
    html = html_part(msg)
    assert html is not None
    assert html.startswith("Correction: <p>The meeting is at <b>3 pm</b></p>")


def test_correction_of_a_new_conversation() -> None:
    msg = assert_safe(build(outgoing(body_text="Meeting at 3 pm", correction=True)))
    assert msg["Subject"] == "Re: Meeting at 3 pm"
    assert text_part(msg) == "Correction: Meeting at 3 pm\n"


# --- Message-IDs ------------------------------------------------------------------------------


def test_own_message_id_is_deterministic_and_shaped() -> None:
    first = own_message_id("$abc", DOMAIN, SECRET)
    assert first == own_message_id("$abc", DOMAIN, SECRET)
    assert re.fullmatch(r"[a-z2-7]{32}\.[0-9a-f]{16}@agency\.example\.org", first)
    assert own_message_id("$abd", DOMAIN, SECRET) != first
    other_secret = own_message_id("$abc", DOMAIN, b"another secret, 16+ bytes")
    assert other_secret.split(".")[0] == first.split(".")[0]
    assert other_secret != first
    assert own_message_id("$abc", "Agency.Example.ORG", SECRET) == first
    assert is_own_message_id(first, DOMAIN, SECRET)


def test_own_message_id_recognition_refuses_forgeries() -> None:
    good = own_message_id("$abc", DOMAIN, SECRET)
    first, rest = good.split(".", 1)
    tag = rest.split("@")[0]
    flipped = tag[:-1] + ("0" if tag[-1] != "0" else "1")
    forged_first = "a" * 32
    cases = [
        f"{first}.{flipped}@{DOMAIN}",  # tampered tag
        own_message_id("$abc", "other.example.org", SECRET),  # another domain...
        f"{first}.{tag}@other.example.org",  # ... or ours moved there
        f"{forged_first}.{'0' * 16}@{DOMAIN}",  # right shape, wrong HMAC
        f"{forged_first}.{tag}@{DOMAIN}",  # a real tag on another first part
        own_message_id("$abc", DOMAIN, b"not our secret at all"),
        good.upper(),
        f"<{good}>",
        good + " ",
        f"{first}.{tag}@{DOMAIN}.evil.example",
        f"{first}.{tag[:15]}@{DOMAIN}",
        "",
        "x" * 10_000,
    ]
    for candidate in cases:
        assert not is_own_message_id(candidate, DOMAIN, SECRET), candidate


def test_message_ids_refuse_weak_secrets_and_bad_domains() -> None:
    with pytest.raises(ValueError, match="secret"):
        own_message_id("$e", DOMAIN, b"")
    with pytest.raises(ValueError, match="secret"):
        is_own_message_id("x@y", DOMAIN, b"short")
    with pytest.raises(ValueError, match="domain"):
        own_message_id("$e", "bad domain", SECRET)


def test_message_id_header_is_one_unencoded_line() -> None:
    raw = build(outgoing())
    line = next(x for x in header_block(raw) if x.startswith(b"Message-ID:"))
    assert line == f"Message-ID: <{own_message_id(outgoing().event_id, DOMAIN, SECRET)}>".encode()


# --- threading headers ------------------------------------------------------------------------


def test_in_reply_to_and_references() -> None:
    raw = build(
        outgoing(
            subject="Plan",
            in_reply_to="m3@lists.example.org",
            references=("m1@lists.example.org", "m2@lists.example.org"),
        )
    )
    msg = assert_safe(raw)
    assert raw_header(raw, "In-Reply-To") == "<m3@lists.example.org>"
    assert msg["References"].split() == [
        "<m1@lists.example.org>",
        "<m2@lists.example.org>",
        "<m3@lists.example.org>",
    ]


def test_references_capped_to_the_last_twenty() -> None:
    refs = tuple(f"m{i}@lists.example.org" for i in range(30))
    raw = build(outgoing(subject="P", in_reply_to="m29@lists.example.org", references=refs))
    assert_safe(raw)
    ids = raw_header(raw, "References").split()
    assert ids == [f"<m{i}@lists.example.org>" for i in range(10, 30)]


def test_in_reply_to_goes_last_and_duplicates_go() -> None:
    refs = ("a@x.org", "b@x.org", "a@x.org", "c@x.org")
    raw = build(outgoing(subject="P", in_reply_to="b@x.org", references=refs))
    assert raw_header(raw, "References").split() == ["<a@x.org>", "<c@x.org>", "<b@x.org>"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "no-at-sign",
        "a@b@c",
        "a b@c.org",
        "<a@c.org>",
        "a@c.org>",
        "a@c.org\r\nBcc: victim@example.org",
        "a@c.org\nBcc: victim@example.org",
        "a\x00@c.org",
        "a\u2028@c.org",
        "é@c.org",
        '"quoted"@c.org',
        "a@[127.0.0.1]",
        "a(comment)@c.org",
        "=?utf-8?q?a=0D=0ABcc:_v?=@c.org",
        "x=?utf-8?q?a?=@c.org",
        "a" * 300 + "@c.org",
    ],
)
def test_invalid_ids_are_dropped(bad: str) -> None:
    raw = build(outgoing(subject="P", in_reply_to=bad, references=(bad, "ok@x.org")))
    msg = assert_safe(raw)
    assert msg["In-Reply-To"] is None
    assert raw_header(raw, "References") == "<ok@x.org>"


def test_only_invalid_ids_give_no_threading_headers() -> None:
    raw = build(outgoing(subject="P", in_reply_to="bad", references=("also bad",)))
    names = header_names(raw)
    assert "in-reply-to" not in names
    assert "references" not in names


def test_long_ids_are_never_encoded_or_split() -> None:
    long_ids = tuple(f"{i}{'a' * 200}@{'b' * 30}.example.org" for i in range(5))
    raw = build(outgoing(subject="P", in_reply_to=long_ids[-1], references=long_ids))
    assert_safe(raw)
    assert b"=?" not in b"\r\n".join(header_block(raw))
    assert raw_header(raw, "In-Reply-To") == f"<{long_ids[-1]}>"
    assert raw_header(raw, "References").split() == [f"<{i}>" for i in long_ids]
    lines = header_block(raw)
    start = next(i for i, x in enumerate(lines) if x.startswith(b"References:"))
    assert all(b" <" in line or line.startswith(b" <") for line in lines[start : start + 5])


def test_many_short_references_are_folded_within_78() -> None:
    refs = tuple(f"id{i}@x.org" for i in range(20))
    raw = build(outgoing(subject="P", references=refs))
    lines = header_block(raw)
    start = next(i for i, x in enumerate(lines) if x.startswith(b"References:"))
    folded = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(b" "):
            break
        folded.append(line)
    assert len(folded) > 1
    assert all(len(line) <= 78 for line in folded)
    assert raw_header(raw, "References").split() == [f"<{r}>" for r in refs]


# --- attachments ------------------------------------------------------------------------------


def test_attachment_with_hostile_filename() -> None:
    attachment = Attachment(
        filename="..\\/..\\/x\u202egpj.exe", content_type="application/pdf", data=b"%PDF-1.7"
    )
    raw = build(outgoing(attachments=(attachment,)))
    msg = assert_safe(raw)
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_attachments())
    assert len(parts) == 1
    name = parts[0].get_filename()
    assert name == "xgpj.exe"
    assert parts[0].get_content_type() == "application/pdf"
    assert parts[0].get_content() == b"%PDF-1.7"
    assert text_part(msg) == "Hello list.\n"


@pytest.mark.parametrize(
    "filename",
    [
        "=?utf-8?q?a=0D=0ABcc:_victim@example.org?=.txt",
        'a "=?utf-8?q?a=0D=0ABcc:_x?=" b.txt',
        "r\u00e9sum\u00e9 =?utf-8?q?=0D=0A?=.txt",
        "line\r\nBcc: victim@example.org.txt",
        "x" * 1000 + ".txt",
        "",
        "..",
    ],
)
def test_filenames_never_inject_headers(filename: str) -> None:
    raw = build(outgoing(attachments=(Attachment(filename, "text/plain", b"data"),)))
    msg = assert_safe(raw)
    part = next(iter(msg.iter_attachments()))
    name = part.get_filename()
    assert name
    assert not any(c in name for c in "\r\n/\\\x00")
    assert "=?" not in name
    assert not name.startswith(".")
    assert len(name) <= 200


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("image/png", "image/png"),
        ("Image/PNG", "image/png"),
        ("text/plain; charset=x\r\nBcc: victim@example.org", "application/octet-stream"),
        ("text/plain\r\nBcc: victim@example.org", "application/octet-stream"),
        ("nonsense", "application/octet-stream"),
        ("", "application/octet-stream"),
        ("a/b/c", "application/octet-stream"),
        ("multipart/mixed", "application/octet-stream"),
        ("message/rfc822", "application/octet-stream"),
        ("text/html", "text/html"),
    ],
)
def test_attachment_content_type_is_validated(content_type: str, expected: str) -> None:
    raw = build(outgoing(attachments=(Attachment("f.bin", content_type, b"\x00\xffdata"),)))
    msg = assert_safe(raw)
    part = next(iter(msg.iter_attachments()))
    assert part.get_content_type() == expected
    assert part.get_payload(decode=True) == b"\x00\xffdata"


def test_attachments_with_html_body_and_inline_flag() -> None:
    attachments = (
        Attachment("a.png", "image/png", b"\x89PNG", content_id="c1@x", inline=True),
        Attachment("b.txt", "text/plain", b"hello"),
    )
    raw = build(outgoing(body_html="<p>Hi</p>", attachments=attachments))
    msg = assert_safe(raw)
    assert msg.get_content_type() == "multipart/mixed"
    body = msg.get_payload(0)
    assert isinstance(body, email.message.EmailMessage)
    assert body.get_content_type() == "multipart/alternative"
    dispositions = [p.get_content_disposition() for p in msg.iter_attachments()]
    assert dispositions == ["inline", "attachment"]
    assert [p.get_filename() for p in msg.iter_attachments()] == ["a.png", "b.txt"]


def test_multiparts_have_fixed_boundaries_when_the_content_allows() -> None:
    attachments = (Attachment("b.txt", "text/plain", b"hello"),)
    raw = build(outgoing(body_html="<p>Hi</p>", attachments=attachments))
    msg = assert_safe(raw)
    body = msg.get_payload(0)
    assert isinstance(body, email.message.EmailMessage)
    assert msg.get_boundary() == compose_module._BOUNDARIES["mixed"]
    assert body.get_boundary() == compose_module._BOUNDARIES["alternative"]
    assert build(outgoing(body_html="<p>Hi</p>", attachments=attachments)) == raw


@pytest.mark.parametrize("kind", ["alternative", "mixed"])
@pytest.mark.parametrize("where", ["text", "filename"])
def test_content_holding_a_fixed_boundary_gets_a_random_one(kind: str, where: str) -> None:
    """A plain ASCII text part is written as it is (7bit), so a sender can put a delimiter line
    of the fixed boundary in it: that mail is written with boundaries the generator checks,
    and still parses back to the same parts."""
    fixed = compose_module._BOUNDARIES[kind]
    hostile = f"Hello\n--{fixed}\nContent-Type: text/html\n\n<b>forged</b>\n--{fixed}--\nend"
    text = hostile if where == "text" else "Hello list."
    filename = f"--{fixed}.txt" if where == "filename" else "b.txt"
    attachments = (Attachment(filename, "text/plain", b"hello"),)
    raw = build(outgoing(body_text=text, body_html="<p>Hi</p>", attachments=attachments))
    msg = assert_safe(raw)
    body = msg.get_payload(0)
    assert isinstance(body, email.message.EmailMessage)
    assert msg.get_boundary() != compose_module._BOUNDARIES["mixed"]
    assert body.get_boundary() != compose_module._BOUNDARIES["alternative"]
    assert [p.get_content_type() for p in msg.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "text/plain",
    ]
    assert text_part(msg).rstrip("\n") == text
    assert [p.get_filename() for p in msg.iter_attachments()] == [filename]


# --- the self-check and properties ------------------------------------------------------------


def test_self_check_catches_an_injected_header() -> None:
    good = build(outgoing())
    sender = ("Alice Martin via Passerelle", FROM)
    compose_module._check(good, "X-Passerelle-Loop", sender, LIST)
    head, _, body = good.partition(b"\r\n\r\n")
    bad = [
        head + b"\r\nBcc: victim@example.org\r\n\r\n" + body,
        good.replace(f"To: {LIST}".encode(), b"To: victim@example.org"),
        good.replace(f"To: {LIST}".encode(), f"To: {LIST}, victim@example.org".encode()),
        good.replace(b"\r\nTo:", b"\nTo:"),
        good.replace(b"Alice Martin via", b"Alice (Martin) via"),  # now a comment
        good.replace(b"Alice Martin via Passerelle", b"Alice, Martin via Passerelle"),
        good.replace(b"Hello list.", "Hellö".encode()),
    ]
    for raw in bad:
        with pytest.raises(ComposeError):
            compose_module._check(raw, "X-Passerelle-Loop", sender, LIST)


HOSTILE_CHARS = st.sampled_from(
    ["\r", "\n", "\r\n", "\x00", "\u2028", "\x85", "=?", "?=", "<", ">", '"', "@", ":", ";", ",",
     "\\", "\u202e", "\ud800", "Bcc: ", "é", "=0D=0A", "=?utf-8?q?", " ", "\t", "a"]
)  # fmt: skip
HOSTILE_TEXT = st.lists(st.one_of(HOSTILE_CHARS, st.text(max_size=5)), max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(name=HOSTILE_TEXT, subject=HOSTILE_TEXT, body=HOSTILE_TEXT, filename=HOSTILE_TEXT)
def test_property_hostile_fields_never_break_the_header(
    name: str, subject: str, body: str, filename: str
) -> None:
    mail = outgoing(
        sender_name=name,
        subject=subject,
        body_text=body,
        body_html=body,
        in_reply_to="m1@x.org" if subject else None,
        attachments=(Attachment(filename, "text/plain", b"x"),),
    )
    raw = build(mail)
    msg = assert_safe(raw)
    assert not any(c in msg["Subject"] for c in "\r\n")
    shown = display_name(raw)
    assert not any(c in shown for c in "\r\n")
    # The name comes back as composed (3.11's parser may add a space between encoded-words).
    expected = compose_module._from_name(mail)
    assert shown.replace(" ", "") == expected.replace(" ", "")


def test_outgoing_mail_is_frozen() -> None:
    mail = outgoing()
    with pytest.raises(dataclasses.FrozenInstanceError):
        mail.subject = "x"  # type: ignore[misc]


# --- the loop marker ---------------------------------------------------------------------------


def test_the_loop_marker_names_the_domain_and_this_bridge() -> None:
    marker = loop_marker("Agency.Example.org", SECRET)
    assert marker.startswith("agency.example.org; ")
    assert marker == loop_marker(DOMAIN, SECRET)
    assert marker != loop_marker(DOMAIN, b"another-secret-of-32-bytes-len!!")
    raw = build(outgoing(), marker=marker)
    assert raw_header(raw, "X-Passerelle-Loop") == marker
    assert has_loop_marker(raw, [marker])
    assert not has_loop_marker(raw, [loop_marker(DOMAIN, b"another-secret-of-32-bytes-len!!")])
    assert not has_loop_marker(raw, [])


def test_a_marker_in_the_body_is_not_a_header() -> None:
    marker = loop_marker(DOMAIN, SECRET)
    raw = build(outgoing(body_text=f"X-Passerelle-Loop: {marker}"))
    assert not has_loop_marker(raw, [marker])


@pytest.mark.parametrize("marker", ["", " x", "x\r\nBcc: a@b.c", "é", "x" * 300])
def test_a_bad_marker_is_refused(marker: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        build(outgoing(), marker=marker)
