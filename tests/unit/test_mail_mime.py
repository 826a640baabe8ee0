"""MIME parsing within limits: hostile structure, charsets, bodies, attachments, threading."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest

from bridge.core.message import IncomingMessage
from bridge.mail.errors import MailRejected
from bridge.mail.mime import MailLimits, parse_mail, safe_filename

FROM = "Alice Martin <alice@agency.example.org>"


def raw_mail(
    body: bytes = b"Hello list.\r\n",
    content_type: str | None = "text/plain; charset=utf-8",
    /,
    **headers: str | None,
) -> bytes:
    """A mail as raw bytes; keyword headers (underscores for dashes) override the defaults."""
    fields: dict[str, str | None] = {
        "From": FROM,
        "To": "list@agency.example.org",
        "Subject": "Test",
        "Message-ID": "<m1@agency.example.org>",
        "Date": "Mon, 03 Jun 2024 10:00:00 +0200",
        "MIME-Version": "1.0",
        "Content-Type": content_type,
    }
    fields.update({name.replace("_", "-"): value for name, value in headers.items()})
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items() if value is not None)
    return head.encode("utf-8") + b"\r\n" + body


def multipart(*parts: bytes, subtype: str = "mixed", boundary: str = "BOUNDARY") -> bytes:
    body = b"preamble, ignored\r\n"
    for part in parts:
        body += b"--" + boundary.encode() + b"\r\n" + part + b"\r\n"
    body += b"--" + boundary.encode() + b"--\r\nepilogue, ignored\r\n"
    return raw_mail(body, f'multipart/{subtype}; boundary="{boundary}"')


def part(content_type: str, body: bytes, *headers: str) -> bytes:
    head = f"Content-Type: {content_type}\r\n" + "".join(h + "\r\n" for h in headers)
    return head.encode("utf-8") + b"\r\n" + body


def message(**fields: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = FROM
    msg["To"] = "list@agency.example.org"
    msg["Subject"] = "Test"
    msg["Message-ID"] = "<m1@agency.example.org>"
    for name, value in fields.items():
        msg[name.replace("_", "-")] = value
    return msg


def rejected(raw: bytes, limits: MailLimits | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    with pytest.raises(MailRejected) as info:
        parse_mail(raw, limits or MailLimits())
    return str(info.value), time.perf_counter() - start


def nested_multipart(depth: int) -> bytes:
    opening = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        for i in range(1, depth)
    )
    closing = b"".join(f"\r\n--b{i}--\r\n".encode() for i in reversed(range(1, depth)))
    inner = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    body = b"--b0\r\n" + opening + inner + closing + b"\r\n--b0--\r\n"
    return raw_mail(body, 'multipart/mixed; boundary="b0"')


# --- limits and hostile structure -------------------------------------------------------------


def test_simple_mail() -> None:
    msg = parse_mail(raw_mail())
    assert isinstance(msg, IncomingMessage)
    assert msg.sender.address == "alice@agency.example.org"
    assert msg.sender.display_name == "Alice Martin"
    assert msg.subject == "Test"
    assert msg.text == "Hello list."
    assert msg.html is None
    assert msg.attachments == ()
    assert msg.notes == ()
    assert msg.auto_generated is False


def test_oversized_mail_is_rejected_before_parsing() -> None:
    payload = base64.encodebytes(b"\0" * (38 * 1024 * 1024))  # ~50 MB of base64
    raw = multipart(
        part("text/plain", b"see attachment"),
        part(
            "application/octet-stream",
            payload,
            "Content-Transfer-Encoding: base64",
            'Content-Disposition: attachment; filename="big.bin"',
        ),
    )
    assert len(raw) > 50_000_000
    reason, elapsed = rejected(raw)
    assert reason.startswith("mail too large")
    assert elapsed < 0.5  # a length check, nothing else (measured: microseconds)


def test_size_limit_is_configurable() -> None:
    raw = raw_mail()
    assert parse_mail(raw, MailLimits(max_size=len(raw))).text == "Hello list."
    reason, _ = rejected(raw, MailLimits(max_size=len(raw) - 1))
    assert "too large" in reason


def test_thousand_level_nesting_is_rejected_quickly_without_recursion() -> None:
    raw = nested_multipart(1000)
    reason, elapsed = rejected(raw)  # RecursionError would not be a MailRejected
    assert reason == "MIME nesting deeper than 20 levels"
    assert elapsed < 2


def test_nesting_up_to_the_limit_is_parsed() -> None:
    msg = parse_mail(nested_multipart(20))
    assert msg.text == "innermost"
    reason, _ = rejected(nested_multipart(21))
    assert "nesting" in reason


def test_twenty_thousand_parts_are_rejected_quickly() -> None:
    raw = multipart(*[part("text/plain", b"x") for _ in range(20_000)])
    reason, elapsed = rejected(raw)
    assert reason == "more than 100 MIME parts"
    assert elapsed < 2


def test_part_limit_counts_every_entity() -> None:
    attachments = [
        part("application/pdf", b"%PDF", f'Content-Disposition: attachment; filename="{i}.pdf"')
        for i in range(99)
    ]
    msg = parse_mail(multipart(part("text/plain", b"body"), *attachments))
    assert len(msg.attachments) == 99
    reason, _ = rejected(multipart(part("text/plain", b"body"), *attachments, attachments[0]))
    assert "MIME parts" in reason


def test_oversized_mime_header_is_rejected_before_the_stdlib_sees_it() -> None:
    # The email package's parameter parser is quadratic in this header's length.
    raw = raw_mail(b"", 'multipart/mixed; boundary="b"; x=' + '";' * 20_000)
    reason, elapsed = rejected(raw)
    assert reason == "content-type header longer than 8192 characters"
    assert elapsed < 0.5


def test_nested_comments_in_content_type_do_not_raise_recursion_error() -> None:
    # The email package recurses once per nested comment; only a MailRejected may come out.
    raw = raw_mail(b"", "text/plain " + "(" * 2000 + ")" * 2000)
    reason, elapsed = rejected(raw)
    assert reason == "unparsable mail headers (RecursionError)"
    assert elapsed < 2
    inner = part("text/plain " + "(" * 2000 + ")" * 2000, b"deep comments in a part")
    assert parse_mail(multipart(inner)).text == "deep comments in a part"


def test_huge_header_block_is_rejected() -> None:
    raw = raw_mail(X_Filler="\r\n x" * 100_000)
    reason, _ = rejected(raw)
    assert reason == "header block larger than 262144 bytes"


@pytest.mark.parametrize(
    "from_value",
    [None, "not an address", "alice@agency.example.org, eve@evil.example", "=?utf-8?q?a=0Ab?="],
)
def test_sender_rejected_by_parse_from(from_value: str | None) -> None:
    reason, _ = rejected(raw_mail(From=from_value))
    assert reason


def test_missing_close_delimiter_and_odd_line_endings() -> None:
    body = b"--B\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--B\r\n\r\nsecond\r\n"
    msg = parse_mail(raw_mail(body, 'multipart/mixed; boundary="B"'))
    assert msg.text == "first\n\nsecond"
    lf_only = multipart(part("text/plain", b"lf only")).replace(b"\r\n", b"\n")
    assert parse_mail(lf_only).text == "lf only"
    cr_only = multipart(part("text/plain", b"cr only")).replace(b"\r\n", b"\r")
    assert parse_mail(cr_only).text == "cr only"


def test_boundary_text_not_at_line_start_is_content() -> None:
    body = b"--B\r\nContent-Type: text/plain\r\n\r\nsee x--B and --Bx\r\n--B--\r\n"
    assert parse_mail(raw_mail(body, 'multipart/mixed; boundary="B"')).text == (
        "see x--B and --Bx"
    )


def test_multipart_without_boundary_has_no_body() -> None:
    msg = parse_mail(raw_mail(b"--x\r\n\r\ntext\r\n", "multipart/mixed"))
    assert msg.text == ""


# --- charsets and transfer encodings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("charset", "body", "text"),
    [
        ("iso-8859-1", "Café à Noël".encode("latin-1"), "Café à Noël"),
        ("windows-1252", b"\x93Devis\x94 \x80 100", "\u201cDevis\u201d € 100"),
        ("iso-8859-1", b"\x93quoted\x94", "\u201cquoted\u201d"),  # read as windows-1252
        ("koi8-r", "Привет, мир".encode("koi8-r"), "Привет, мир"),
        ("utf-8", "Ελληνικά".encode(), "Ελληνικά"),
        ('"UTF-8"', "quoted charset é".encode(), "quoted charset é"),
        ("x-bogus", "bogus é".encode(), "bogus é"),
        ("x-bogus", b"bogus \xff", "bogus \ufffd"),
        ("base64", b"not a text encoding \xe9", "not a text encoding \ufffd"),
        ("punycode", b"refused codec", "refused codec"),
        ("utf-8", b"caf\xe9 latin-1 bytes", "caf\ufffd latin-1 bytes"),  # wrong charset
        ("shift_jis", b"\x82\xa0\xff\xff", "あ\ufffd\ufffd"),
    ],
)
def test_charsets(charset: str, body: bytes, text: str) -> None:
    raw = raw_mail(body, f"text/plain; charset={charset}", Content_Transfer_Encoding="8bit")
    assert parse_mail(raw).text == text


def test_missing_charset_reads_utf8() -> None:
    assert parse_mail(raw_mail("déjà".encode(), "text/plain")).text == "déjà"
    assert parse_mail(raw_mail("déjà".encode(), None)).text == "déjà"


def test_base64_and_quoted_printable_bodies() -> None:
    encoded = base64.encodebytes("Réunion à 10 h".encode())
    raw = raw_mail(encoded, Content_Transfer_Encoding="base64")
    assert parse_mail(raw).text == "Réunion à 10 h"
    qp = b"R=C3=A9union =\r\nsur deux lignes"
    raw = raw_mail(qp, Content_Transfer_Encoding="quoted-printable")
    assert parse_mail(raw).text == "Réunion sur deux lignes"


def test_broken_base64_does_not_raise() -> None:
    raw = raw_mail(b"SGVsbG8*gd29y!bGQ=\r\n=Zm9v=\r\nQ", Content_Transfer_Encoding="base64")
    assert parse_mail(raw).text.startswith("Hello")


def test_control_characters_are_removed_from_text() -> None:
    raw = raw_mail(b"a\x00b\x1b[31mc\x07\r\nline\x85two\r\n")
    assert parse_mail(raw).text == "ab[31mc\nline\ufffdtwo"


# --- bodies -----------------------------------------------------------------------------------


def test_alternative_prefers_plain_text_and_keeps_raw_html() -> None:
    msg = message()
    msg.set_content("Plain version.")
    msg.add_alternative("<p>HTML <b>version</b><script>x()</script></p>", subtype="html")
    parsed = parse_mail(msg.as_bytes())
    assert parsed.text == "Plain version."
    assert parsed.html is not None
    assert parsed.html.startswith("<p>HTML <b>version</b><script>")  # sanitised later


def test_html_only_mail_gets_text_from_html() -> None:
    html = "<html><body><p>Bonjour&nbsp;à&nbsp;tous,</p><p>la   réunion<br>est jeudi.</p>"
    html += "<style>p{}</style></body></html>"
    msg = parse_mail(raw_mail(html.encode(), "text/html; charset=utf-8"))
    assert msg.html is not None
    assert msg.html.startswith("<html>")
    assert msg.text == "Bonjour à tous,\n\nla réunion\nest jeudi."


def test_empty_plain_part_falls_back_to_html() -> None:
    raw = multipart(
        part("text/plain", b"  \r\n"),
        part("text/html", b"<p>From HTML</p>"),
        subtype="alternative",
    )
    assert parse_mail(raw).text == "From HTML"


def test_split_plain_text_parts_are_joined() -> None:
    raw = multipart(
        part("text/plain", b"before the picture"),
        part("image/png", b"\x89PNG", "Content-ID: <p1@x>"),
        part("text/plain", b"after the picture"),
    )
    assert parse_mail(raw).text == "before the picture\n\nafter the picture"


def test_html_is_cut_with_a_note() -> None:
    html = "<p>" + "x" * 2000 + "</p>"
    msg = parse_mail(raw_mail(html.encode(), "text/html"), MailLimits(max_html=1000))
    assert msg.html is not None
    assert len(msg.html) == 1000
    assert "HTML cut to 1000 characters" in msg.notes


def test_text_is_cut_with_a_note() -> None:
    msg = parse_mail(raw_mail(b"y" * 5000), MailLimits(max_text=100))
    assert msg.text == "y" * 100
    assert msg.notes == ("text cut to 100 characters",)


def test_quoted_history_is_trimmed_with_a_note() -> None:
    body = b"Yes.\r\n\r\nOn Mon, 3 Jun 2024, Bob <bob@x.org> wrote:\r\n> Agreed?\r\n"
    msg = parse_mail(raw_mail(body))
    assert msg.text == "Yes."
    assert msg.notes == ("quoted history trimmed",)


# --- attachments ------------------------------------------------------------------------------


def test_attachments_and_inline_images() -> None:
    msg = message()
    msg.set_content("See the chart.")
    msg.add_alternative('<p>Chart: <img src="cid:chart1@agency.example.org"></p>', subtype="html")
    html_part = list(msg.iter_parts())[1]
    html_part.add_related(b"\x89PNG-data", "image", "png", cid="<chart1@agency.example.org>")
    msg.add_attachment(b"%PDF-1.7", maintype="application", subtype="pdf", filename="Devis.pdf")
    parsed = parse_mail(msg.as_bytes())
    assert parsed.text == "See the chart."
    image, pdf = parsed.attachments
    assert image.content_id == "chart1@agency.example.org"
    assert image.inline is True
    assert image.content_type == "image/png"
    assert image.data == b"\x89PNG-data"
    assert image.filename == "image.png"
    assert (pdf.filename, pdf.content_type, pdf.data, pdf.inline) == (
        "Devis.pdf",
        "application/pdf",
        b"%PDF-1.7",
        False,
    )


def test_message_rfc822_becomes_an_eml_attachment() -> None:
    inner = (
        b"From: Bob <bob@x.org>\r\nSubject: =?utf-8?q?Budget_2025_/_=C3=A9t=C3=A9?=\r\n"
        b"Content-Type: text/plain\r\n\r\nInner body, not the mail's text.\r\n"
    )
    raw = multipart(part("text/plain", b"Forwarding this."), part("message/rfc822", inner))
    msg = parse_mail(raw)
    assert msg.text == "Forwarding this."
    (eml,) = msg.attachments
    assert eml.filename == "Budget 2025 - été.eml"
    assert eml.content_type == "message/rfc822"
    assert eml.data == inner  # the original bytes, never re-generated
    assert "Inner body" not in msg.text


def test_nested_multipart_inside_rfc822_is_not_walked() -> None:
    inner = nested_multipart(100)  # deeper than the limit, but only an attachment's content
    raw = multipart(
        part("text/plain", b"fwd"),
        part("message/rfc822", inner, 'Content-Disposition: attachment; filename="fwd.eml"'),
    )
    (eml,) = parse_mail(raw).attachments
    assert eml.filename == "fwd.eml"
    assert eml.data == inner


def test_rfc2231_and_encoded_word_filenames() -> None:
    dispositions = [
        "attachment; filename*=utf-8''facture%E2%80%AEfdp.exe",
        'attachment; filename*0*=utf-8\'\'Compte%20rendu%20; filename*1="r\\"union.pdf"',
        None,
        'attachment; filename="../../etc/passwd"',
    ]
    raw = multipart(
        part("text/plain", b"files"),
        *(
            part(
                'application/pdf; name="=?utf-8?b?w6l0w6kucGRm?="',
                str(i).encode(),
                *([f"Content-Disposition: {d}"] if d else []),
            )
            for i, d in enumerate(dispositions)
        ),
    )
    names = [a.filename for a in parse_mail(raw).attachments]
    assert names == ["facturefdp.exe", 'Compte rendu r"union.pdf', "été.pdf", "passwd"]


def test_unnamed_parts_are_dropped_with_a_note() -> None:
    raw = multipart(part("text/plain", b"body"), part("application/octet-stream", b"blob"))
    msg = parse_mail(raw)
    assert msg.attachments == ()
    assert msg.notes == ("1 MIME part(s) without a file name dropped",)


def test_attachment_total_limit() -> None:
    raw = multipart(
        part("text/plain", b"body"),
        part("application/pdf", b"a" * 600, 'Content-Disposition: attachment; filename="a.pdf"'),
        part("application/pdf", b"b" * 600, 'Content-Disposition: attachment; filename="b.pdf"'),
        part("application/pdf", b"c" * 300, 'Content-Disposition: attachment; filename="c.pdf"'),
    )
    msg = parse_mail(raw, MailLimits(max_attachment_total=1000))
    assert [a.filename for a in msg.attachments] == ["a.pdf", "c.pdf"]
    assert msg.notes == ("attachment 'b.pdf' dropped: attachments over 1000 bytes in total",)


def test_text_attachment_is_not_the_body() -> None:
    raw = multipart(
        part("text/plain", b"body"),
        part("text/plain", b"log", 'Content-Disposition: attachment; filename="log.txt"'),
        part("text/html", b"<p>page</p>", "Content-Disposition: attachment"),
    )
    msg = parse_mail(raw)
    assert msg.text == "body"
    assert msg.html is None
    assert [(a.filename, a.data) for a in msg.attachments] == [
        ("log.txt", b"log"),
        ("attachment.html", b"<p>page</p>"),
    ]


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("..\\..\\x", "x"),
        ("C:\\Users\\eve\\report.pdf", "report.pdf"),
        ("invoice\u202egnp.exe", "invoicegnp.exe"),
        ("a\u2066b\u2069c\u200e\u200f\u061cd.txt", "abcd.txt"),
        ("zero\u200bwidth\ufeff.pdf", "zerowidth.pdf"),
        ("nul\x00byte.txt", "nulbyte.txt"),
        ("line\nbreak\r.txt", "linebreak.txt"),
        ("..", "attachment"),
        ("...", "attachment"),
        (".hidden", "hidden"),
        ("", "attachment"),
        ("\u202e", "attachment"),
        ("Cafe\u0301.pdf", "Café.pdf"),
        ("  many   spaces  .pdf", "many spaces .pdf"),
    ],
)
def test_safe_filename(name: str, safe: str) -> None:
    assert safe_filename(name) == safe


def test_safe_filename_length_keeps_extension() -> None:
    name = safe_filename("é" * 300 + ".pdf")
    assert len(name) == 200
    assert name.endswith("é.pdf")
    assert len(safe_filename("x" * 500)) == 200


# --- headers ----------------------------------------------------------------------------------


def test_encoded_newline_in_subject_cannot_become_a_header() -> None:
    msg = parse_mail(raw_mail(Subject="=?utf-8?q?a=0D=0ABcc:_x@y?="))
    assert "\r" not in msg.subject
    assert "\n" not in msg.subject
    assert msg.subject == "a Bcc: x@y"


def test_subject_is_decoded_cleaned_and_cut() -> None:
    subject = "=?utf-8?b?UsOpdW5pb24=?= =?utf-8?q?_=E2=80=AEdu_jour?=\t\x07 folded"
    assert parse_mail(raw_mail(Subject=subject)).subject == "Réunion du jour folded"
    long = parse_mail(raw_mail(Subject="word " * 200)).subject
    assert len(long) <= 300
    assert long.endswith("word")
    split_char = "=?utf-8?q?=C3?= =?utf-8?q?=A9t=C3=A9?="  # one character split across words
    assert parse_mail(raw_mail(Subject=split_char)).subject == "été"


def test_thread_ids() -> None:
    msg = parse_mail(
        raw_mail(
            Message_ID="<Abc.123@agency.example.org>",
            In_Reply_To="<parent@x.org> (Bob's message)",
            References="<root@x.org>\r\n <a b@c> <no-at-sign> <x@y@z> <parent@x.org> bare@id",
        )
    )
    assert msg.thread.message_id == "Abc.123@agency.example.org"
    assert msg.thread.in_reply_to == ("parent@x.org",)
    assert msg.thread.references == ("root@x.org", "parent@x.org")


def test_message_id_without_brackets_and_garbage() -> None:
    assert parse_mail(raw_mail(Message_ID="bare@agency.example.org")).thread.message_id == (
        "bare@agency.example.org"
    )
    assert parse_mail(raw_mail(Message_ID="<not an id>")).thread.message_id is None
    assert parse_mail(raw_mail(Message_ID=None)).thread.message_id is None


def test_references_keep_the_last_hundred() -> None:
    references = " ".join(f"<ref{i}@x.org>" for i in range(500))
    thread = parse_mail(raw_mail(References=references)).thread
    assert len(thread.references) == 100
    assert thread.references[0] == "ref400@x.org"
    assert thread.references[-1] == "ref499@x.org"


def test_date() -> None:
    assert parse_mail(raw_mail()).date == datetime(
        2024, 6, 3, 10, 0, tzinfo=timezone(timedelta(hours=2))
    )
    unknown_zone = parse_mail(raw_mail(Date="Mon, 03 Jun 2024 10:00:00 -0000")).date
    assert unknown_zone == datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    assert parse_mail(raw_mail(Date="yesterday")).date is None
    assert parse_mail(raw_mail(Date="Mon, 03 Jun 99999 10:00:00 +9999")).date is None
    assert parse_mail(raw_mail(Date=None)).date is None


@pytest.mark.parametrize(
    ("headers", "auto"),
    [
        ({"Auto_Submitted": "auto-replied"}, True),
        ({"Auto_Submitted": "auto-generated (vacation)"}, True),
        ({"Auto_Submitted": "no"}, False),
        ({"Auto_Submitted": "No ; comment"}, False),
        ({"X_Autoreply": "yes"}, True),
        ({"X_Autorespond": "Out of office"}, True),
        ({"Precedence": "auto_reply"}, True),
        ({"Precedence": "junk"}, True),
        ({"Precedence": "list"}, False),  # every list mail: list traffic is the product
        ({"Precedence": "bulk"}, False),
        ({}, False),
    ],
)
def test_auto_generated(headers: dict[str, str], auto: bool) -> None:
    assert parse_mail(raw_mail(**headers)).auto_generated is auto
