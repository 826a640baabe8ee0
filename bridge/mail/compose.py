"""Mail from Matrix messages: hostile names, subjects and bodies composed into safe RFC 5322."""

from __future__ import annotations

import base64
import email
import email.header
import email.parser
import email.policy
import email.utils
import functools
import hashlib
import hmac
import re
import unicodedata
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from html import escape as html_escape
from typing import TYPE_CHECKING, Any

from bridge.core.ghosts import clean_display_name
from bridge.core.html import html_to_text, sanitize_html
from bridge.core.matrix_event import strip_html_fallback, strip_text_fallback
from bridge.core.message import Attachment
from bridge.mail.mime import safe_filename

__all__ = [
    "ComposeError",
    "OutgoingMail",
    "compose",
    "conversation_subject",
    "is_own_message_id",
    "own_message_id",
]


class ComposeError(ValueError):
    """The composed mail failed its own safety check: it must not be sent."""


@dataclass(frozen=True)
class OutgoingMail:
    """A Matrix message to send to the list. Every str field except the IDs is hostile."""

    event_id: str  # the Matrix event this mail carries
    sender_mxid: str  # @alice:agency.example.org
    sender_name: str  # the room display name
    body_text: str
    body_html: str | None  # Matrix formatted_body: re-sanitised, reply fallback removed
    subject: str  # the thread subject, or "" for a new conversation
    in_reply_to: str | None  # a bare Message-ID (no <>) of the mail/event answered
    references: tuple[str, ...]  # bare Message-IDs, oldest first
    attachments: tuple[Attachment, ...] = ()
    correction: bool = False  # an edit: subject "Re: …", body starts "Correction: "
    disambiguate: bool = False  # another room member has the same display name: add the MXID


_MAX_HEADER_LINE = 998  # RFC 5322 section 2.1.1
_QUOTED_NAME_FITS = 70  # a quoted display name this long still fits on a folded line


if TYPE_CHECKING:
    _PolicyBase = EmailPolicy[EmailMessage]
else:  # not subscriptable at run time
    _PolicyBase = EmailPolicy


class _ComposePolicy(_PolicyBase):
    """email.policy.SMTP, except that an address header whose ASCII display name needs more
    than one line is folded at RFC 5322's hard limit (998) instead of 78.

    Python 3.11's folder splits a quoted-string that does not fit on a line into its pieces
    and drops the quotes: `"Martin, Jean (DGFiP) ... via Passerelle" <a@b>` comes out as a
    phrase with bare ",", "(" and "<" that parses as other addresses. Non-ASCII names are
    written as encoded-words, which it folds correctly.
    """

    def fold(self, name: str, value: str) -> str:
        if self.max_line_length != _MAX_HEADER_LINE and _long_quoted_name(value):
            return self.clone(max_line_length=_MAX_HEADER_LINE).fold(name, value)
        folded: str = super().fold(name, value)  # typeshed: Any
        return folded

    def fold_binary(self, name: str, value: str) -> bytes:
        """As EmailPolicy's, the result remembered for a header object: a header's folding
        depends only on its class, name and text (its parse tree is built from the text)."""
        if not hasattr(value, "name") or len(value) > _CACHED_HEADER_LENGTH:
            return self._fold_binary(name, value)
        key = (type(value), value.name, str(value), self.max_line_length)
        folded = _FOLDED.get(key)
        if folded is None:
            folded = self._fold_binary(name, value)
            if len(_FOLDED) >= _STORED_HEADERS_LIMIT:
                _FOLDED.clear()
            _FOLDED[key] = folded
        return folded

    def _fold_binary(self, name: str, value: str) -> bytes:
        if self.max_line_length != _MAX_HEADER_LINE and _long_quoted_name(value):
            return self.clone(max_line_length=_MAX_HEADER_LINE).fold_binary(name, value)
        return super().fold_binary(name, value)

    def header_max_count(self, name: str) -> int | None:
        """As EmailPolicy's, remembered by name: it builds a header class at each call, and
        is asked at every header set."""
        key = name.lower()
        if key not in _MAX_COUNTS:
            if len(_MAX_COUNTS) >= _STORED_HEADERS_LIMIT:
                _MAX_COUNTS.clear()
            _MAX_COUNTS[key] = super().header_max_count(name)
        return _MAX_COUNTS[key]

    def header_store_parse(self, name: str, value: Any) -> tuple[str, Any]:
        """As EmailPolicy's, the header objects it builds remembered for the next mail with
        the same header (a link's From, To, Reply-To, marker…): building one is most of the
        time compose spends on headers. Header objects are immutable str subclasses."""
        if isinstance(value, str) and len(value) <= _CACHED_HEADER_LENGTH:
            key: tuple[str, ...] = ("str", name, value)
        elif type(value) is Address:
            key = ("address", name, value.display_name, value.username, value.domain)
        else:
            return super().header_store_parse(name, value)
        stored = _STORED_HEADERS.get(key)
        if stored is None:
            stored = super().header_store_parse(name, value)
            if len(_STORED_HEADERS) >= _STORED_HEADERS_LIMIT:
                _STORED_HEADERS.clear()
            _STORED_HEADERS[key] = stored
        return stored


def _long_quoted_name(header: object) -> bool:
    for address in getattr(header, "addresses", ()):
        name = getattr(address, "display_name", "")
        quoted_length = len(name) + name.count('"') + name.count("\\") + 2
        if name and name.isascii() and quoted_length > _QUOTED_NAME_FITS:
            return True
    return False


# Building policy. cte_type="7bit": bodies are quoted-printable or base64 when not plain short
# ASCII, so the mail is pure ASCII (no 8BITMIME needed, no 8bit->7bit conversion on the way
# that would break a DKIM signature). refold_source="none": the headers set with set_raw
# (Message-ID, In-Reply-To, References) are written exactly as folded here (see _set_ids).
_POLICY = _ComposePolicy(linesep="\r\n", cte_type="7bit", refold_source="none")


class _CheckPolicy(_PolicyBase):
    """The self-check's parsing policy: email.policy.SMTP raising on any defect, with the
    headers it parses remembered (most of a link's mail has the same From, To, Reply-To, loop
    marker and MIME headers; parsing each header is most of the check's time). A header that
    raised is not remembered: it raises again. Parsed headers are immutable str subclasses,
    read only by _check."""

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name") or len(value) > _CACHED_HEADER_LENGTH:
            return super().header_fetch_parse(name, value)
        return _parse_header(self, name, value)


# Headers longer than this are not remembered (by either policy).
_CACHED_HEADER_LENGTH = 1000
# Header objects built by _ComposePolicy.header_store_parse, by (kind, name, value): forgotten
# all at once when full.
_STORED_HEADERS: dict[tuple[str, ...], tuple[str, Any]] = {}
_STORED_HEADERS_LIMIT = 1024
# Header objects folded by _ComposePolicy.fold_binary, by (class, name, text, line length):
# forgotten all at once when full.
_FOLDED: dict[tuple[type, str, str, int | None], bytes] = {}
# The header registry's max_count of each header name compose sets (a few per bridge).
_MAX_COUNTS: dict[str, int | None] = {}


@functools.lru_cache(maxsize=1024)
def _parse_header(policy: _CheckPolicy, name: str, value: str) -> Any:
    return super(_CheckPolicy, policy).header_fetch_parse(name, value)


# Parsing back for the final self-check: any structural defect raises.
_CHECK_POLICY = _CheckPolicy(linesep="\r\n", raise_on_defect=True)

_MAX_HTML_INPUT = 128 * 1024  # a Matrix event is at most 64 KiB
_MAX_NAME = 100
_MAX_MXID = 120  # of the 255 the Matrix spec allows: keeps the From line under 998
_MAX_THREAD_SUBJECT = 300
_MAX_FIRST_LINE = 78
_MAX_MARKING = 200  # core.marking.MAX_LABEL
_MAX_REFERENCES = 20
_MAX_ID_LENGTH = 250
_MIN_SECRET = 16
_SUFFIX = " via Passerelle"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
# A plain addr-spec: dot-atom local part, hostname domain; no quoting, comments or literals.
_ADDR_SPEC = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:{_LABEL}\.)*{_LABEL}", re.ASCII)
# A msg-id's content as accepted here: RFC 5322 atext and dots either side of one "@" (no
# whitespace, controls, quotes, brackets, "<" or ">"); "=?" is refused separately.
_MSG_ID = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+", re.ASCII
)
_OWN_ID = re.compile(r"([a-z2-7]{32})\.([0-9a-f]{16})@(.+)", re.ASCII)
_MARKER = re.compile(r"[!-~](?:[ !-~]{0,200}[!-~])?", re.ASCII)
_FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,60}", re.ASCII)
_CONTENT_TYPE = re.compile(
    r"([a-z0-9][a-z0-9!#$&^_.+-]{0,63})/([a-z0-9][a-z0-9!#$&^_.+-]{0,63})", re.ASCII
)

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_SURROGATES = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = re.compile("\r\n?|[\x85\u2028\u2029]")
_BODY_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f]")
_LINE_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
_ENCODED_WORD_START = "=?"
_REPLY_PREFIX = re.compile(r"(?:re[ \t]*(?:\[[0-9]{1,4}\])?[ \t]*[:\uff1a][ \t]*)+", re.I)

# The headers compose writes at the top level, and in body parts.
_TOP_HEADERS = (
    "from",
    "to",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "x-auto-response-suppress",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
)
_REQUIRED = frozenset(_TOP_HEADERS) - {"in-reply-to", "references", "content-transfer-encoding"}
_PART_HEADERS = frozenset({"content-type", "content-transfer-encoding", "content-disposition"})


# --- Message-IDs ------------------------------------------------------------------------------


def own_message_id(event_id: str, domain: str, secret: bytes) -> str:
    """The bare Message-ID of the mail carrying `event_id`: deterministic, recognisable with
    `is_own_message_id` by whoever holds `secret` (at least 16 bytes).

    "<32 lowercase base32 characters of sha256(event_id)[:20]>.<16 hex digits of
    HMAC-SHA256(secret, those 32 characters)>@<domain, lowercase>".
    """
    host = _check_domain(domain)
    _check_secret(secret)
    digest = hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).digest()[:20]
    first = base64.b32encode(digest).decode("ascii").lower()
    return f"{first}.{_tag(first, secret)}@{host}"


def is_own_message_id(message_id: str, domain: str, secret: bytes) -> bool:
    """True only for a bare ID of exactly the shape own_message_id gives, for this domain,
    whose tag is the HMAC of its first part (compared in constant time)."""
    host = _check_domain(domain)
    _check_secret(secret)
    if len(message_id) > 64 + len(host):
        return False
    match = _OWN_ID.fullmatch(message_id)
    if match is None or match.group(3) != host:
        return False
    return hmac.compare_digest(_tag(match.group(1), secret), match.group(2))


def loop_marker(domain: str, secret: bytes) -> str:
    """The loop-header value a bridge holding `secret` writes on mail from `domain`: the
    domain and a tag of that bridge, so two bridges of one domain on one list are told apart."""
    _check_secret(secret)
    tag = hmac.new(secret, b"loop marker", hashlib.sha256).hexdigest()[:16]
    return f"{_check_domain(domain)}; {tag}"


def has_loop_marker(
    raw: bytes, markers: Collection[str], bridge_header: str = "X-Passerelle-Loop"
) -> bool:
    """Whether a mail's top-level header block carries `bridge_header` with one of our
    `markers` (compose's `marker`): a mail this bridge composed, come back (a list keeps the
    header on its copy; a person's reply does not). Only the header block is read."""
    wanted = {d.lower() for d in markers}
    if not wanted:
        return False
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    values = parsed.get_all(bridge_header) or []
    return any(str(value).strip().lower() in wanted for value in values)


def _tag(first: str, secret: bytes) -> str:
    return hmac.new(secret, first.encode("ascii"), hashlib.sha256).hexdigest()[:16]


def _check_domain(domain: str) -> str:
    if len(domain) > 253 or not _DOMAIN.fullmatch(domain):
        raise ValueError("domain must be a plain host name")
    return domain.lower()


def _check_secret(secret: bytes) -> None:
    if len(secret) < _MIN_SECRET:
        raise ValueError(f"secret must be at least {_MIN_SECRET} bytes")


def _valid_id(message_id: str) -> bool:
    """A bare msg-id safe to write between <>: see _MSG_ID. Encoded-word openers ("=?") are
    refused too, so that no header parser downstream decodes one into a line break."""
    return (
        len(message_id) <= _MAX_ID_LENGTH
        and _MSG_ID.fullmatch(message_id) is not None
        and _ENCODED_WORD_START not in message_id
    )


def _thread_ids(mail: OutgoingMail) -> tuple[str | None, list[str]]:
    """In-Reply-To and References: invalid IDs dropped, duplicates dropped, the answered ID
    last in References, at most the last _MAX_REFERENCES."""
    parent = mail.in_reply_to if mail.in_reply_to and _valid_id(mail.in_reply_to) else None
    references: list[str] = []
    for message_id in mail.references:
        if _valid_id(message_id) and message_id not in references and message_id != parent:
            references.append(message_id)
    if parent is not None:
        references.append(parent)
    return parent, references[-_MAX_REFERENCES:]


# --- text cleaning ----------------------------------------------------------------------------


def _neutralise_encoded_words(text: str) -> str:
    """`text` with every "=?" broken up as "= ?".

    The email package decodes encoded-words in every header value it is given, even inside a
    quoted display name, a file name or the middle of a word, and (CVE-2024-6923) writes a
    decoded CR/LF out as a real line break: no "=?" may reach it from hostile input.
    """
    while _ENCODED_WORD_START in text:
        text = text.replace(_ENCODED_WORD_START, "= ?")
    return text


def _clean_line(text: str, max_length: int) -> str:
    """One header-safe line: no controls, line separators or bidi overrides, whitespace
    collapsed, no encoded-word opener, at most `max_length` characters (cut after a word
    when that keeps more than half)."""
    text = _SURROGATES.sub("\ufffd", text[: max_length * 16 + 1024])
    text = _BIDI_CONTROLS.sub("", _LINE_CONTROLS.sub(" ", text))
    text = " ".join(_neutralise_encoded_words(text).split())
    if len(text) <= max_length:
        return text
    cut = text[:max_length]
    space = cut.rfind(" ")
    if text[max_length] != " " and space > max_length // 2:
        cut = cut[:space]  # end on a whole word when one ends in the second half
    return cut.rstrip()


def _clean_body(text: str) -> str:
    """Line breaks as LF, controls other than tab and LF removed, no lone surrogates."""
    text = _LINE_BREAKS.sub("\n", _SURROGATES.sub("\ufffd", text))
    return _BODY_CONTROLS.sub("", text)


def _from_name(mail: OutgoingMail) -> str:
    """The From display name: the cleaned room name, or the MXID when the name is empty or
    looks like an address (a spoofing attempt: "boss@agency.fr via Passerelle")."""
    mxid = _neutralise_encoded_words(clean_display_name(mail.sender_mxid, _MAX_MXID))
    name = _neutralise_encoded_words(clean_display_name(mail.sender_name, _MAX_NAME))
    if not name or "@" in unicodedata.normalize("NFKC", name):
        name = mxid or "Matrix user"
    elif mail.disambiguate and mxid:
        name = f"{name} ({mxid})"
    return name + _SUFFIX


def _subject(mail: OutgoingMail, text: str) -> str:
    thread = _clean_line(mail.subject, _MAX_THREAD_SUBJECT)
    thread = thread[_match_end(_REPLY_PREFIX, thread) :]
    if thread:
        return "Re: " + thread
    first = next((line for line in text.split("\n") if line.strip()), "")
    subject = _clean_line(first, _MAX_FIRST_LINE) or "(no subject)"
    return "Re: " + subject if mail.correction else subject


def _match_end(pattern: re.Pattern[str], text: str) -> int:
    match = pattern.match(text)
    return match.end() if match else 0


def _bodies(mail: OutgoingMail) -> tuple[str, str]:
    """The text and the sanitised HTML ("" for none) of `mail`, reply fallbacks removed; the
    text is taken from the HTML when it is blank."""
    text = _clean_body(mail.body_text)
    if mail.in_reply_to is not None:
        text = strip_text_fallback(text)
    html = ""
    if mail.body_html:
        source = _clean_body(mail.body_html[:_MAX_HTML_INPUT])
        html = sanitize_html(strip_html_fallback(source), image_urls={}, max_input=_MAX_HTML_INPUT)
    if not text.strip() and html:
        text = html_to_text(html)
    return text, html


def conversation_subject(mail: OutgoingMail) -> str:
    """The subject the conversation `mail` starts or continues is known by: the Subject that
    compose() writes for it, without a leading "Re: ". For a new conversation that is the
    cleaned first line of the text (or "(no subject)"), in a thread the cleaned thread subject.
    """
    text, _ = _bodies(mail)
    return _subject(mail, text).removeprefix("Re: ")


# --- composition ------------------------------------------------------------------------------


def compose(
    mail: OutgoingMail,
    *,
    from_address: str,
    list_address: str,
    domain: str,
    secret: bytes,
    now: datetime,
    bridge_header: str = "X-Passerelle-Loop",
    marker: str | None = None,
    marking: tuple[str, str] | None = None,
) -> bytes:
    """`mail` as an RFC 5322 message (CRLF, pure ASCII) addressed to `list_address` only.

    From is `"<name> via Passerelle" <from_address>`, Reply-To and To are the list, the
    Message-ID is own_message_id(event_id), `<bridge_header>: <domain>` marks the mail for
    loop detection (or `<bridge_header>: <marker>` when given, e.g. to tell two bridges of one
    domain apart) and `X-Auto-Response-Suppress: All` silences Exchange auto-replies. With
    `marking` (header name, level), the level is the first line of the text and HTML bodies
    (before "Correction: ") and the value of that header. The output is parsed back and
    checked before it is returned; ComposeError if that fails.
    ValueError for bad configuration (addresses, domain, header name, secret, naive `now`).
    """
    host = _check_domain(domain)
    for address in (from_address, list_address):
        if (
            len(address) > 254
            or not _ADDR_SPEC.fullmatch(address)
            or _ENCODED_WORD_START in address
        ):
            raise ValueError("from_address and list_address must be plain addr-specs")
    if not _FIELD_NAME.fullmatch(bridge_header) or bridge_header.lower() in _TOP_HEADERS:
        raise ValueError("bridge_header must be a header field name of its own")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    label = None
    if marking is not None:
        marking_header, label = marking[0], _clean_line(marking[1], _MAX_MARKING)
        if (
            not _FIELD_NAME.fullmatch(marking_header)
            or marking_header.lower() in _TOP_HEADERS
            or marking_header.lower() == bridge_header.lower()
        ):
            raise ValueError("the marking header must be a header field name of its own")
        if not label:
            raise ValueError("the marking must be a label")

    text, html = _bodies(mail)
    subject = _subject(mail, text)
    if mail.correction:
        text = "Correction: " + text
        html = "Correction: " + html if html else ""
    if label is not None:
        text = f"{label}\n\n{text}"
        html = f"<p><strong>{html_escape(label)}</strong></p>\n{html}" if html else ""

    parent, references = _thread_ids(mail)
    message_id = own_message_id(mail.event_id, host, secret)

    # MIMEPart, not EmailMessage: EmailMessage.set_content adds MIME-Version to every part.
    msg = MIMEPart(policy=_POLICY)
    from_name = _from_name(mail)
    msg["From"] = _address(from_name, from_address)
    msg["To"] = _address("", list_address)
    msg["Reply-To"] = _address("", list_address)
    _set_subject(msg, subject)
    # As text, not the datetime: the header object built from it is remembered (above) for
    # every mail of the same second.
    msg["Date"] = email.utils.format_datetime(now)
    _set_ids(msg, "Message-ID", [message_id])
    if parent is not None:
        _set_ids(msg, "In-Reply-To", [parent])
    if references:
        _set_ids(msg, "References", references)
    if marker is not None and not _MARKER.fullmatch(marker):
        raise ValueError("marker must be printable ASCII without line breaks")
    msg[bridge_header] = host if marker is None else marker
    msg["X-Auto-Response-Suppress"] = "All"
    if marking is not None and label is not None:
        _set_text(msg, marking[0], label)
    msg["MIME-Version"] = "1.0"
    # The headers built through the registry; those set raw (IDs, encoded subjects) are
    # checked when the whole mail is parsed back.
    for name, value in msg.raw_items():
        if getattr(value, "defects", ()):
            raise ComposeError(f"{name} header did not build cleanly")

    if mail.attachments:
        msg.make_mixed()
        body = MIMEPart(policy=_POLICY)
        _fill_body(body, text, html)
        msg.attach(body)
        for attachment in mail.attachments:
            msg.attach(_attachment_part(attachment))
    else:
        _fill_body(msg, text, html)

    raw = _serialise(msg)
    extra = () if marking is None else (marking[0],)
    _check(raw, bridge_header, (from_name, from_address), list_address, extra)
    return raw


@functools.lru_cache(maxsize=1024)
def _address(display_name: str, addr_spec: str) -> Address:
    """Address objects are immutable, and parsing the addr-spec is most of building one."""
    return Address(display_name=display_name, addr_spec=addr_spec)


def _serialise(msg: MIMEPart) -> bytes:
    """`msg` as bytes, its multiparts delimited by fixed boundaries when no part's content
    holds them; else by boundaries the generator draws at random and checks.

    The generator's random boundaries cost a regular expression compiled for each mail, here
    and again in the parse-back check (most of the time compose spent on bodies); fixed ones
    are compiled once. A mail whose content holds one (by chance or on purpose) is written
    again the generator's way.
    """
    multiparts = [part for part in msg.walk() if part.is_multipart()]
    if not multiparts:
        return msg.as_bytes()
    for part in multiparts:
        part.set_boundary(_BOUNDARIES[part.get_content_subtype()])
    raw = msg.as_bytes()
    # Each boundary: once in its Content-Type, once before each of its parts, once closing.
    if all(
        raw.count(_BOUNDARIES[part.get_content_subtype()].encode("ascii"))
        == len(part.get_payload()) + 2
        for part in multiparts
    ):
        return raw
    for part in multiparts:
        part.del_param("boundary")
    return msg.as_bytes()


# One per multipart subtype compose writes; neither holds the other.
_BOUNDARIES = {"mixed": "=_Passerelle.mixed.7Qx2", "alternative": "=_Passerelle.alt.K9v4"}


def _set_subject(msg: MIMEPart, subject: str) -> None:
    _set_text(msg, "Subject", subject)


def _set_text(msg: MIMEPart, name: str, subject: str) -> None:
    """The Subject (or another text header), its spaces kept.

    Python 3.11's folder puts the space between two encoded-words of a long non-ASCII subject
    outside them, as folding whitespace, which RFC 2047 decoders drop: "équipes « numérique »"
    arrives as "équipes« numérique »". email.header.Header keeps every space inside an
    encoded-word. `subject` is one clean line (_clean_line): no controls, no "=?".
    """
    if subject.isascii():
        msg[name] = subject
        return
    encoded = email.header.Header(subject, "utf-8", header_name=name).encode(linesep="\n")
    msg.set_raw(name, encoded)


def _set_ids(msg: MIMEPart, name: str, ids: list[str]) -> None:
    """A header of <id> tokens, folded here between IDs (never inside one) and stored raw.

    Through the header registry a long ID gets RFC 2047-encoded when folded (In-Reply-To and
    References are unstructured headers there), which breaks threading, and Message-ID is
    folded onto a line of its own. The IDs are ours or passed _valid_id: ASCII, no
    whitespace, controls or "=?".
    """
    lines: list[str] = []
    line = ""
    limit = _POLICY.max_line_length or 78
    for message_id in ids:
        token = f"<{message_id}>"
        budget = limit - (len(name) + 2 if not lines else 1)
        if line and len(line) + 1 + len(token) > budget:
            lines.append(line)
            line = token
        else:
            line = f"{line} {token}" if line else token
    lines.append(line)
    msg.set_raw(name, "\n ".join(lines))


def _fill_body(part: MIMEPart, text: str, html: str) -> None:
    """`part` made text/plain, or multipart/alternative of text/plain and text/html."""
    if not html:
        part.set_content(text, subtype="plain", charset="utf-8")
        return
    part.make_alternative()
    for content, subtype in ((text, "plain"), (html, "html")):
        alternative = MIMEPart(policy=_POLICY)
        alternative.set_content(content, subtype=subtype, charset="utf-8")
        part.attach(alternative)


def _attachment_part(attachment: Attachment) -> MIMEPart:
    """One attachment, base64: the file name made safe again, the content type checked.

    MIME types whose body the generator would have to treat as structure (multipart/*,
    message/*) are sent as application/octet-stream.
    """
    match = _CONTENT_TYPE.fullmatch(attachment.content_type.strip().translate(_ASCII_LOWER))
    maintype, subtype = match.groups() if match else ("application", "octet-stream")
    if maintype in ("multipart", "message"):
        maintype, subtype = "application", "octet-stream"
    filename = _neutralise_encoded_words(safe_filename(_SURROGATES.sub("", attachment.filename)))
    part = MIMEPart(policy=_POLICY)
    part.set_content(
        attachment.data,
        maintype=maintype,
        subtype=subtype,
        disposition="inline" if attachment.inline else "attachment",
        filename=filename,
    )
    return part


# --- self-check -------------------------------------------------------------------------------


def _check(
    raw: bytes,
    bridge_header: str,
    sender: tuple[str, str],
    list_address: str,
    extra_headers: tuple[str, ...] = (),
) -> None:
    """The serialised mail checked independently of how it was built: a top-level header
    block of known fields only (and `extra_headers`, required too), each once, CRLF lines
    within limits; parsed back, no defects, one From that is `sender` (display name,
    address), the list as the only recipient, known part headers only.

    Display names are compared without spaces: Python 3.11's parser keeps the folding space
    between two adjacent encoded-words of a phrase, which RFC 2047 says to drop.
    """
    own = {name.lower() for name in (bridge_header, *extra_headers)}
    allowed = frozenset(_TOP_HEADERS) | own
    head, separator, _ = raw.partition(b"\r\n\r\n")
    if not separator or not raw.isascii():
        raise ComposeError("no header block, or not ASCII")
    seen: list[str] = []
    for line in head.split(b"\r\n"):
        if b"\r" in line or b"\n" in line or len(line) > _MAX_HEADER_LINE:
            raise ComposeError("bad header line")
        if line[:1] in (b" ", b"\t") and seen:
            continue
        name, colon, _ = line.partition(b":")
        if not colon or name.decode("ascii").lower() not in allowed:
            raise ComposeError("unexpected header line")
        seen.append(name.decode("ascii").lower())
    if len(seen) != len(set(seen)) or not _REQUIRED | own <= set(seen):
        raise ComposeError("a header is missing or repeated")

    try:
        parsed = email.message_from_bytes(raw, policy=_CHECK_POLICY)
        for part in parsed.walk():
            names = {key.lower() for key in part}
            if part is not parsed and not names <= _PART_HEADERS:
                raise ComposeError("unexpected header in a body part")
            for key in names:
                if getattr(part[key], "defects", ()):
                    raise ComposeError(f"defect in {key}")
        senders = [
            (address.display_name.replace(" ", ""), address.addr_spec)
            for address in _addresses(parsed, "From")
        ]
        recipients = [
            address.addr_spec
            for name in ("To", "Cc", "Bcc")
            for address in _addresses(parsed, name)
        ]
    except ComposeError:
        raise
    except Exception as e:  # raise_on_defect surfaces defects as various exceptions
        raise ComposeError(f"mail does not parse back cleanly ({type(e).__name__})") from None
    if senders != [(sender[0].replace(" ", ""), sender[1])] or recipients != [list_address]:
        raise ComposeError("sender or recipients differ from the configured ones")


def _addresses(msg: MIMEPart, name: str) -> list[Address]:
    found: list[Address] = []
    for header in msg.get_all(name, []):
        found.extend(getattr(header, "addresses", ()))
    return found
