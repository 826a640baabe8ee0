"""Delivery status notifications (RFC 3464): a real Postfix report, and hostile ones."""

from __future__ import annotations

import email.parser

import pytest

from bridge.mail.dsn import (
    MAX_FIELD,
    clean,
    delay_text,
    failure_text,
    looks_like_report,
    parse_report,
    told_recipients,
)

# Captured from the test Postfix (bridge/harness/postfix.py) after Dovecot's LMTP refused an
# unknown user: delivered back to the envelope sender through LMTP, headers and all.
POSTFIX_DSN = """Return-Path: <>
Delivered-To: {verp}
Received: from mx.example.test ([127.0.0.1])
	by vm with LMTP
	id kP39HpQOFmuKXQAAg+zDdQ
	(envelope-from <>)
	for <{verp}>; Mon, 07 Dec 2026 01:40:36 +0000
Received: by mx.example.test (Postfix)
	id 7EA5B20C5A2; Mon,  7 Dec 2026 01:40:36 +0000 (UTC)
Date: Mon,  7 Dec 2026 01:40:36 +0000 (UTC)
From: Mail Delivery System <MAILER-DAEMON@mx.example.test>
Subject: Undelivered Mail Returned to Sender
To: {verp}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
	boundary="74ECE20C596.1796607636/mx.example.test"
Content-Transfer-Encoding: 8bit
Message-Id: <20261207014036.7EA5B20C5A2@mx.example.test>

This is a MIME-encapsulated message.

--74ECE20C596.1796607636/mx.example.test
Content-Description: Notification
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: 8bit

This is the mail system at host mx.example.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

For further assistance, please send mail to postmaster.

If you do so, please include this problem report. You can
delete your own text from the attached returned message.

                   The mail system

<nobody@example.test>: host 127.0.0.1[127.0.0.1] said: 550 5.1.1
    <nobody@example.test> User doesn't exist: nobody@example.test (in reply to
    RCPT TO command)

--74ECE20C596.1796607636/mx.example.test
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.test
X-Postfix-Queue-ID: 74ECE20C596
X-Postfix-Sender: rfc822; {verp}
Arrival-Date: Mon,  7 Dec 2026 01:40:36 +0000 (UTC)

Final-Recipient: rfc822; nobody@example.test
Original-Recipient: rfc822;nobody@example.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; 127.0.0.1
Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.test> User doesn't exist:
    nobody@example.test

--74ECE20C596.1796607636/mx.example.test
Content-Description: Undelivered Message
Content-Type: message/rfc822
Content-Transfer-Encoding: 8bit

Return-Path: <{verp}>
Received: from [127.0.0.1] (unknown [127.0.0.1])
	by mx.example.test (Postfix) with ESMTP id 74ECE20C596;
	Mon,  7 Dec 2026 01:40:36 +0000 (UTC)
From: a@example.test
To: list@example.test
Message-ID: <{message_id}>
X-Passerelle-Loop: x; y
Subject: hi
Date: Mon,  7 Dec 2026 01:40:36 +0000 (UTC)

body

--74ECE20C596.1796607636/mx.example.test--
"""

VERP = "bounces+b1-abcdefghij@example.test"
ORIGINAL_ID = "ab3.c0ffee@achats.gouv.fr"


def postfix_dsn() -> bytes:
    text = POSTFIX_DSN.replace("{verp}", VERP).replace("{message_id}", ORIGINAL_ID)
    return text.replace("\n", "\r\n").encode("utf-8")


def report(
    status_part: str,
    *,
    report_type: str = "delivery-status",
    status_type: str = "message/delivery-status",
    returned: str = "",
    head: str = "Return-Path: <>\r\nTo: " + VERP + "\r\n",
) -> bytes:
    """A multipart/report with a status part and, optionally, a returned part (raw MIME)."""
    return (
        f"{head}From: MAILER-DAEMON@mx.test\r\nSubject: failure\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nIt failed.\r\n"
        f"--B\r\nContent-Type: {status_type}\r\n\r\n{status_part}\r\n"
        f"{returned}--B--\r\n"
    ).encode("utf-8", "surrogateescape")


def block(recipient: str, action: str, status: str, diagnostic: str = "") -> str:
    lines = [f"Final-Recipient: rfc822; {recipient}", f"Action: {action}", f"Status: {status}"]
    if diagnostic:
        lines.append(f"Diagnostic-Code: smtp; {diagnostic}")
    return "\r\n".join(lines) + "\r\n"


PER_MESSAGE = "Reporting-MTA: dns; mx.test\r\n"


def test_a_real_postfix_report_is_read() -> None:
    raw = postfix_dsn()
    assert looks_like_report(raw)
    parsed = parse_report(raw)
    assert parsed is not None
    assert parsed.reporting_mta == "mx.example.test"
    assert parsed.null_sender is True
    assert parsed.envelope_to == (VERP,)  # Delivered-To and To name the same address
    assert parsed.original_message_ids == (ORIGINAL_ID,)
    (recipient,) = parsed.recipients
    assert recipient.recipient == "nobody@example.test"
    assert (recipient.action, recipient.status) == ("failed", "5.1.1")
    # The SMTP code and the status are not repeated; the continuation line is unfolded.
    assert recipient.diagnostic == (
        "<nobody@example.test> User doesn't exist: nobody@example.test"
    )
    assert failure_text(told_recipients(parsed, "failed")) == (
        "Not delivered to nobody@example.test: 5.1.1 <nobody@example.test> User doesn't "
        "exist: nobody@example.test"
    )


def test_a_header_block_without_report_is_not_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs on every mail in, on the event loop: an ordinary mail's header block is
    not handed to the (slow) header parser; a report's, in any case, still is."""
    parsed: list[bytes] = []
    real = email.parser.BytesHeaderParser.parsebytes

    def spy(self: email.parser.BytesHeaderParser, text: bytes, headersonly: bool = True) -> object:
        parsed.append(text)
        return real(self, text, headersonly)

    monkeypatch.setattr(email.parser.BytesHeaderParser, "parsebytes", spy)
    plain = b"From: a@b.test\r\nContent-Type: text/plain\r\n\r\nmultipart/report\r\n"
    assert not looks_like_report(plain)
    assert parsed == []
    shouting = postfix_dsn().replace(b"multipart/report", b"Multipart/REPORT", 1)
    assert looks_like_report(shouting)
    assert len(parsed) == 1


def test_ordinary_mail_and_other_reports_are_not_delivery_reports() -> None:
    plain = b"From: a@b.test\r\nContent-Type: text/plain\r\n\r\nmultipart/report\r\n"
    assert not looks_like_report(plain)
    assert parse_report(plain) is None
    receipt = report(PER_MESSAGE, report_type="disposition-notification")
    assert parse_report(receipt) is None
    # A report forwarded inside an ordinary mail is that mail's content, not a report.
    nested = (
        b"From: a@b.test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="X"\r\n\r\n'
        b"--X\r\nContent-Type: message/rfc822\r\n\r\n" + report(PER_MESSAGE) + b"\r\n--X--\r\n"
    )
    assert parse_report(nested) is None


def test_a_report_without_a_status_part_is_a_report_that_tells_nothing() -> None:
    raw = report("just text", status_type="text/plain")
    parsed = parse_report(raw)
    assert parsed is not None
    assert parsed.recipients == ()
    assert told_recipients(parsed, "failed") == []


def test_a_status_block_nested_deeper_is_not_read() -> None:
    inner = (
        'multipart/mixed; boundary="C"\r\n\r\n--C\r\nContent-Type: message/delivery-status'
        f"\r\n\r\n{PER_MESSAGE}\r\n{block('x@y.test', 'failed', '5.1.1')}\r\n--C--"
    )
    raw = report("", status_type=inner)
    parsed = parse_report(raw)
    assert parsed is not None
    assert parsed.recipients == ()


def test_a_returned_report_inside_a_report_names_only_the_outer_mail() -> None:
    inner = report(
        PER_MESSAGE + "\r\n" + block("deep@y.test", "failed", "5.0.0"),
        head="Message-ID: <inner@y.test>\r\n",
    ).decode()
    returned = f"--B\r\nContent-Type: message/rfc822\r\n\r\n{inner}\r\n"
    status = PER_MESSAGE + "\r\n" + block("top@y.test", "delayed", "4.4.1")
    outer = report(status, returned=returned)
    parsed = parse_report(outer)
    assert parsed is not None
    assert [r.recipient for r in parsed.recipients] == ["top@y.test"]
    assert parsed.original_message_ids == ("inner@y.test",)


def test_the_message_id_can_come_from_returned_headers_only() -> None:
    returned = (
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: x@y.test\r\nMessage-ID: <only.headers@agency.test>\r\n\r\n"
    )
    parsed = parse_report(report(PER_MESSAGE, returned=returned))
    assert parsed is not None
    assert parsed.original_message_ids == ("only.headers@agency.test",)


def test_huge_fields_are_truncated_and_many_recipients_bounded() -> None:
    blocks = "\r\n".join(
        block(f"user{i}@y.test", "failed", "5.1.1", "550 5.1.1 " + "no such user " * 500)
        for i in range(300)
    )
    parsed = parse_report(report(PER_MESSAGE + "\r\n" + blocks))
    assert parsed is not None
    assert len(parsed.recipients) == 100
    assert all(len(r.diagnostic) <= MAX_FIELD for r in parsed.recipients)
    text = failure_text(told_recipients(parsed, "failed"))
    assert text.endswith("; and 95 more")
    assert len(text) < 6 * (MAX_FIELD + 40)


def test_bad_charsets_and_controls_never_reach_the_text() -> None:
    diagnostic = "550 5.1.1 caf\udce9 \u202egnp.exe\x1b[31m\r\n ok"
    status = PER_MESSAGE + "\r\n" + block("x@y.test", "failed", "5.1.1", diagnostic)
    parsed = parse_report(report(status))
    assert parsed is not None
    (recipient,) = parsed.recipients
    for bad in ("\u202e", "\x1b", "\r", "\n", "\udce9"):
        assert bad not in recipient.diagnostic
    assert recipient.diagnostic.endswith("ok")


def test_garbage_fields_leave_nothing_misleading() -> None:
    status = (
        PER_MESSAGE
        + "\r\nFinal-Recipient: rfc822; not an address\r\nAction: exploded\r\n"
        + "Status: 9.9.9 <script>\r\n"
    )
    parsed = parse_report(report(status))
    assert parsed is not None
    (recipient,) = parsed.recipients
    assert (recipient.recipient, recipient.action, recipient.status) == ("", "", "")


def test_global_delivery_status_in_utf8_is_read() -> None:
    status = PER_MESSAGE + "\r\n" + block("josé@exemple.test", "failed", "5.1.1", "550 inconnu")
    raw = report(
        status,
        report_type="global-delivery-status",
        status_type="message/global-delivery-status",
    )
    parsed = parse_report(raw)
    assert parsed is not None
    assert [(r.recipient, r.diagnostic) for r in parsed.recipients] == [
        ("josé@exemple.test", "inconnu")
    ]


def test_several_recipients_one_line_each_once_and_only_told_actions() -> None:
    blocks = "\r\n".join(
        [
            block("a@y.test", "failed", "5.1.1", "550 5.1.1 unknown"),
            block("A@y.test", "failed", "5.1.1", "550 5.1.1 unknown"),
            block("b@y.test", "failed", "5.2.2", "552 5.2.2 mailbox full"),
            block("c@y.test", "delivered", "2.0.0"),
            block("d@y.test", "delayed", "4.4.1", "421 try later"),
        ]
    )
    parsed = parse_report(report(PER_MESSAGE + "\r\n" + blocks))
    assert parsed is not None
    failed = told_recipients(parsed, "failed")
    assert failure_text(failed) == (
        "Not delivered to a@y.test: 5.1.1 unknown; b@y.test: 5.2.2 mailbox full"
    )
    assert delay_text(told_recipients(parsed, "delayed")).startswith(
        "Delivery delayed to d@y.test: 4.4.1 try later"
    )
    assert told_recipients(parsed, "delivered") == []


def test_a_return_path_other_than_empty_is_noted() -> None:
    parsed = parse_report(report(PER_MESSAGE, head="Return-Path: <someone@y.test>\r\n"))
    assert parsed is not None
    assert parsed.null_sender is False


@pytest.mark.parametrize(
    "raw",
    [
        b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary",
        b'Content-Type: multipart/report; report-type="delivery-status"; boundary=""\r\n\r\n',
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=Z\r\n\r\n"
        + b"--Z\r\nContent-Type: message/delivery-status\r\n\r\n"
        + b"\xff\xfe\x00" * 1000
        + b"\r\n--Z--",
    ],
)
def test_broken_reports_never_raise(raw: bytes) -> None:
    parsed = parse_report(raw)
    assert parsed is not None
    assert all(r.action in ("", "failed") for r in parsed.recipients)


def test_clean_makes_one_short_printable_line() -> None:
    assert clean("a\r\n\tb\u200bc\x00d", 100) == "a b c d"
    assert clean("x" * 500, 10) == "x" * 9 + "…"
