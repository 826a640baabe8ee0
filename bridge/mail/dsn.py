"""Delivery status notifications (RFC 3464 bounces): recognised, read within limits, told short.

Only the report's own structure is trusted to say what it is; every field a report carries is
sanitised (printable, one line, truncated) before anyone sees it, and nothing of a report is
ever posted as mail.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import logging
import re
from dataclasses import dataclass
from email.message import Message

log = logging.getLogger("passerelle.mail.dsn")

REPORT_TYPES = ("delivery-status", "global-delivery-status")  # RFC 3464, RFC 6533
STATUS_TYPES = ("message/delivery-status", "message/global-delivery-status")
RETURNED_TYPES = ("message/rfc822", "message/global")
HEADERS_TYPES = ("text/rfc822-headers", "message/global-headers")
TOLD_ACTIONS = ("failed", "delayed")
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")

MAX_RECIPIENTS = 100  # per-recipient blocks read from one report
MAX_LISTED = 5  # recipients named in one notice
MAX_FIELD = 160  # characters of a diagnostic shown
MAX_ADDRESS = 254
MAX_HEAD = 65536  # bytes of a header block read

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_MID = re.compile(r"<([^<>\s]{1,900})>")
_ADDRESS = re.compile(r"[^\s<>,;:\"()\[\]]{1,64}@[A-Za-z0-9.-]{1,253}")
_SMTP_CODE = re.compile(r"^[245]\d\d(?:[ -]|$)")


@dataclass(frozen=True)
class RecipientStatus:
    """One per-recipient block of a report, sanitised."""

    recipient: str  # an address, or "" when the report names none usable
    action: str  # one of ACTIONS, or "" when unknown
    status: str  # like 5.1.1, or "" when missing or malformed
    diagnostic: str  # the remote server's words, one short line, or ""


@dataclass(frozen=True)
class DeliveryReport:
    """What a DSN says, and what it gives to find the mail it is about."""

    reporting_mta: str
    recipients: tuple[RecipientStatus, ...]
    original_message_ids: tuple[str, ...]  # bare, from the returned message or its headers
    envelope_to: tuple[str, ...]  # addresses of Delivered-To, X-Original-To and To, in order
    null_sender: bool | None  # Return-Path <> (True), another one (False), absent (None)


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """One printable line of at most `limit` characters: control, format (bidi) and
    unassigned characters dropped, white space collapsed."""
    kept = "".join(c if c.isprintable() else " " for c in text[: limit * 8])
    line = " ".join(kept.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def looks_like_report(raw: bytes) -> bool:
    """Cheap test on the top-level header block: is this mail a delivery report?"""
    head = raw[:MAX_HEAD].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    # Every mail in comes through here, on the event loop: a header block that does not even
    # spell the subtype "report" (a token: never encoded, never folded) is not parsed.
    if b"report" not in head.lower():
        return False
    try:
        headers = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
        if headers.get_content_type() != "multipart/report":
            return False
        report_type = headers.get_param("report-type", header="content-type")
    except Exception:  # a header the parser chokes on: not a report we can read
        return False
    return isinstance(report_type, str) and report_type.strip().lower() in REPORT_TYPES


def parse_report(raw: bytes) -> DeliveryReport | None:
    """The report a DSN makes, or None if the mail is not a DSN (see looks_like_report).

    A DSN with a missing or broken status part is still a report (with no recipients): it
    is never posted as mail, and tells nothing."""
    if not looks_like_report(raw):
        return None
    try:
        message = email.message_from_bytes(raw, policy=email.policy.default)
    except Exception as e:
        log.info("an unreadable delivery report (%s)", type(e).__name__)
        return DeliveryReport("", (), (), (), None)
    parts = message.get_payload()
    children = [p for p in parts if isinstance(p, Message)] if isinstance(parts, list) else []
    mta, recipients = "", tuple[RecipientStatus, ...]()
    status_part = next((p for p in children if p.get_content_type() in STATUS_TYPES), None)
    if status_part is not None:
        mta, recipients = _status(status_part)
    return DeliveryReport(
        reporting_mta=mta,
        recipients=recipients,
        original_message_ids=_returned_ids(children),
        envelope_to=_envelope_to(message),
        null_sender=_null_sender(message),
    )


def _field(block: Message, name: str) -> str:
    try:
        value = block.get(name)
        return "" if value is None else str(value)
    except Exception:  # the header parser's own failures: the field is unreadable
        return ""


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a status part. The stdlib splits message/delivery-status itself;
    message/global-delivery-status (UTF-8, RFC 6533) it parses like a message: the first block
    as headers, the others as a body, split here."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return []
    blocks = [b for b in payload if isinstance(b, Message)]
    if len(blocks) == 1 and part.get_content_type() == "message/global-delivery-status":
        first = blocks[0]
        try:
            rest = first.get_payload(decode=True)  # bytes as they came (8-bit UTF-8)
        except Exception:
            rest = None
        if isinstance(rest, bytes):
            text = rest[: MAX_HEAD * 4].decode("utf-8", "replace").replace("\r\n", "\n")
            parser = email.parser.HeaderParser(policy=email.policy.default)
            chunks = [c for c in re.split(r"\n[ \t]*\n", text) if c.strip()]
            blocks = [first, *(parser.parsestr(c + "\n") for c in chunks[:MAX_RECIPIENTS])]
    return blocks[: MAX_RECIPIENTS + 1]


def _typed_value(value: str) -> str:
    """The value of "type; value" fields (Final-Recipient: rfc822; x@y)."""
    kind, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon else kind.strip()


def _address(value: str) -> str:
    address = _typed_value(value).strip().strip("<>").strip()
    if (
        not address
        or len(address) > MAX_ADDRESS
        or "@" not in address
        or not address.isprintable()
        or any(c.isspace() for c in address)
    ):
        return ""
    return address


def _diagnostic(value: str, status: str) -> str:
    """The remote server's words: without the "smtp;" type, its reply code and the status
    code repeated."""
    text = " ".join(_typed_value(value).split())
    if _SMTP_CODE.match(text):
        text = text[4:].lstrip()
    if status and text.startswith(status):
        text = text[len(status) :].lstrip()
    return clean(text)


def _status(part: Message) -> tuple[str, tuple[RecipientStatus, ...]]:
    blocks = _blocks(part)
    if not blocks:
        return "", ()
    mta = clean(_typed_value(_field(blocks[0], "Reporting-MTA")), 100)
    found = []
    for block in blocks[1:]:
        action = _field(block, "Action").strip().lower().split(" ")[0]
        status_text = _field(block, "Status").strip()
        status_match = _STATUS.match(status_text)
        status = status_match.group(0) if status_match else ""
        recipient = _address(_field(block, "Final-Recipient")) or _address(
            _field(block, "Original-Recipient")
        )
        found.append(
            RecipientStatus(
                recipient=recipient,
                action=action if action in ACTIONS else "",
                status=status,
                diagnostic=_diagnostic(_field(block, "Diagnostic-Code"), status),
            )
        )
    return mta, tuple(found)


def _returned_ids(children: list[Message]) -> tuple[str, ...]:
    """The Message-ID of the returned mail (message/rfc822) or its headers (text/rfc822-
    headers); only the returned mail's own top-level header, never one nested deeper."""
    ids: list[str] = []
    for child in children:
        kind = child.get_content_type()
        value = ""
        if kind in RETURNED_TYPES:
            inner = child.get_payload()
            first = inner[0] if isinstance(inner, list) and inner else None
            if isinstance(first, Message):
                value = _field(first, "Message-ID")
            elif isinstance(inner, str | bytes):
                value = _header_of(child, "Message-ID")
        elif kind in HEADERS_TYPES:
            value = _header_of(child, "Message-ID")
        match = _MID.search(value)
        if match and match.group(1) not in ids:
            ids.append(match.group(1))
    return tuple(ids[:3])


def _header_of(part: Message, name: str) -> str:
    """A header of a part whose body is a header block (text/rfc822-headers)."""
    try:
        body = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(body, bytes):
        return ""
    head = body[:MAX_HEAD].split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    try:
        parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head)
    except Exception:
        return ""
    return _field(parsed, name)


def _envelope_to(message: Message) -> tuple[str, ...]:
    found: list[str] = []
    for name in ("Delivered-To", "X-Original-To", "To"):
        for value in _all(message, name)[:10]:
            for address in _ADDRESS.findall(str(value))[:10]:
                if address not in found:
                    found.append(address)
    return tuple(found[:20])


def _all(message: Message, name: str) -> list[str]:
    try:
        return [str(v) for v in message.get_all(name) or []]
    except Exception:  # the header parser's own failures: the header is unreadable
        return []


def _null_sender(message: Message) -> bool | None:
    values = _all(message, "Return-Path")
    if not values:
        return None
    return str(values[0]).strip() in ("<>", "")


# --- what the room hears ----------------------------------------------------------------------


def _one(status: RecipientStatus) -> str:
    who = status.recipient or "a recipient"
    why = " ".join(w for w in (status.status, status.diagnostic) if w)
    return f"{who}: {why}" if why else who


def _listed(statuses: list[RecipientStatus]) -> str:
    shown = "; ".join(_one(s) for s in statuses[:MAX_LISTED])
    more = len(statuses) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def told_recipients(report: DeliveryReport, action: str) -> list[RecipientStatus]:
    """The report's recipients with this action (failed or delayed), each once."""
    if action not in TOLD_ACTIONS:
        return []
    seen: set[tuple[str, str]] = set()
    chosen = []
    for status in report.recipients:
        key = (status.recipient.lower(), status.status)
        if status.action == action and key not in seen:
            seen.add(key)
            chosen.append(status)
    return chosen


def failure_text(statuses: list[RecipientStatus]) -> str:
    """ "Not delivered to x@y: 5.1.1 user unknown" (several recipients: one line)."""
    return f"Not delivered to {_listed(statuses)}"


def delay_text(statuses: list[RecipientStatus]) -> str:
    return f"Delivery delayed to {_listed(statuses)} (the mail servers keep trying)"
