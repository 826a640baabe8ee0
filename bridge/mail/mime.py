"""Raw mail to IncomingMessage within limits: MIME structure, bodies, attachments, threading."""

from __future__ import annotations

import binascii
import codecs
import dataclasses
import email.parser
import email.policy
import heapq
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_to_bytes

from bridge.core.html import html_to_text
from bridge.core.message import Attachment, IncomingMessage, ThreadRef
from bridge.mail.address import parse_from
from bridge.mail.errors import MailRejected
from bridge.mail.trim import trim_reply

__all__ = ["MailLimits", "parse_mail", "safe_filename"]

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class MailLimits:
    """What one mail may hold; beyond the first three it is refused, beyond the rest cut."""

    max_size: int = 25 * MiB  # raw bytes, checked before anything is parsed
    max_depth: int = 20  # MIME nesting of multiparts
    max_parts: int = 100  # MIME entities below the top level
    max_html: int = 512 * KiB  # HTML characters kept (before sanitising)
    max_text: int = 64 * KiB  # text characters shown in the room
    max_attachment_total: int = 50 * MiB  # decoded attachment bytes


# Internal bounds that no legitimate mail reaches. The email package's parameter and
# structured-header parsers are quadratic in a header's length (an 8 KiB Content-Type of `";`
# pairs costs it 0.4 s, 32 KiB 4.5 s) and raise RecursionError on nested comments, so MIME
# headers are parsed here, linearly, and only bounded header blocks ever reach the stdlib.
_MAX_HEADER_BLOCK = 256 * KiB
_MAX_MIME_FIELD = 8 * KiB
_MIME_FIELDS = ("content-type", "content-disposition", "content-transfer-encoding", "content-id")
_MAX_SUBJECT = 300
_MAX_MARKING_FIELDS = 50  # core.marking.MAX_LABELS: more is refused there
_MAX_IDS = 100
_MAX_ID_LENGTH = 250
_MAX_BOUNDARY = 200
_MAX_SECTIONS = 64  # RFC 2231 continuations of one parameter

# A header block as the email package's feed parser reads one: lines that look like a field
# ("name:"), a continuation (leading space or tab) or an mbox "From " line; CR, LF and CRLF
# all end a line. Possessive quantifiers keep it linear on hostile input.
_HEADER_LINES = re.compile(
    rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*+:|[ \t])[^\r\n]*+(?:\r\n|[\r\n]|\Z))*+"
)
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+\-]*/[a-z0-9][a-z0-9!#$&^_.+\-]*")
_SECTION = re.compile(r"([^*]+)\*(?:([0-9]{1,3})(\*)?)?")
_ENCODED_WORD = re.compile(r"=\?([^?\s*]{1,40})(?:\*[^?\s]{0,20})?\?([bBqQ])\?([^?\s]*)\?=")
_ANGLE = re.compile(r"<([^<>]*)>")
_ID_SIDE = r"[\x21-\x3b\x3d\x3f\x41-\x7e]+"  # printable ASCII but "<", ">", "@"
_MESSAGE_ID = re.compile(_ID_SIDE + "@" + _ID_SIDE)
_CONTENT_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")
_CHARSET_NAME = re.compile(r"[a-z0-9][a-z0-9._:+\-]{0,39}")
_TEXT_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SUBJECT_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_BIDI_CONTROLS = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
_NEWLINES = re.compile(r"\r\n?")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_NOT_B64 = bytes(sorted(set(range(256)) - set(_B64_ALPHABET)))
_FILENAME_DROPPED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_LEADS = (b"\n", b"\r")
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
}

# Labels as mail clients mean them: browsers (WHATWG Encoding) read ISO-8859-1 as windows-1252,
# mail labelled us-ascii with 8-bit bytes is nowadays UTF-8, Outlook's Korean label is cp949.
_CHARSET_ALIASES = {
    "us-ascii": "utf-8",
    "ascii": "utf-8",
    "iso-8859-1": "cp1252",
    "iso8859-1": "cp1252",
    "latin1": "cp1252",
    "latin-1": "cp1252",
    "gb2312": "gb18030",
    "gbk": "gb18030",
    "x-gbk": "gb18030",
    "ks_c_5601-1987": "cp949",
    "iso-8859-8-i": "iso-8859-8",
    "iso-8859-6-i": "iso-8859-6",
    "windows-874": "cp874",
    "tis-620": "cp874",
}
# Codecs that are not charsets, or decode in quadratic time (punycode).
_REFUSED_CODECS = frozenset(
    {"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined", "charmap"}
)


@dataclass
class _Entity:
    """One MIME entity: byte offsets into the raw mail and its parsed MIME headers."""

    start: int
    header_end: int
    body_start: int
    end: int
    depth: int
    fields: list[tuple[str, str]]  # lowercase name, unfolded value
    content_type: str
    params: dict[str, str]
    parent_type: str  # content type of the enclosing multipart, "" at the top

    def field(self, name: str) -> str | None:
        return next((value for key, value in self.fields if key == name), None)


def parse_mail(
    raw: bytes, limits: MailLimits = MailLimits(), *, marking_header: str | None = None
) -> IncomingMessage:
    """Parse one raw mail, or raise MailRejected with a one-line reason.

    Refused: more than `max_size` bytes (checked before any parsing), MIME nesting deeper than
    `max_depth` or more than `max_parts` entities (counted while the structure is scanned,
    iteratively, so hostile nesting never reaches a recursive parser), oversized or unparsable
    headers, and a sender that `parse_from` refuses. HTML, text and attachments beyond their
    limits are cut or dropped, each with a note. `html` is the first text/html body part, NOT
    sanitised; `text` comes from the first text/plain part (or from the HTML when there is
    none), with quoted history trimmed. The values of `marking_header` and the Subjects are
    kept decoded for the marking check (see core.marking).
    """
    if len(raw) > limits.max_size:
        raise MailRejected(f"mail too large: {len(raw)} bytes (limit {limits.max_size})")
    top = _read_entity(raw, 0, len(raw), 0, "text/plain", "")
    try:
        headers = email.parser.BytesParser(policy=email.policy.default).parsebytes(
            raw[: top.header_end], headersonly=True
        )
    except Exception as e:  # the header parser's failures on hostile input are not typed
        raise MailRejected(f"unparsable mail headers ({type(e).__name__})") from None
    sender = parse_from(headers)
    leaves = _leaves(raw, top, limits)

    notes: list[str] = []
    texts: list[str] = []
    html: str | None = None
    attachments: list[Attachment] = []
    attachment_bytes = 0
    unnamed = 0
    for leaf in leaves:
        disposition, disposition_params = _structured(leaf.field("content-disposition") or "")
        filename = disposition_params.get("filename") or leaf.params.get("name") or None
        data = _transfer_decode(raw[leaf.body_start : leaf.end], leaf)
        content_type = leaf.content_type
        body = not filename and disposition != "attachment"
        if body and content_type in ("text/plain", "text/html"):
            content = _decode(data, leaf.params.get("charset"))
            if content_type == "text/html":
                html = content if html is None else html
            elif not texts or leaf.parent_type != "multipart/alternative":
                texts.append(content)
            continue
        content_id = _content_id(leaf.field("content-id"))
        image = content_type.startswith("image/")
        if content_type in ("message/rfc822", "message/global"):
            # A subject is not a path: its slashes must not make safe_filename drop words.
            subject = _inner_subject(data).replace("/", "-").replace("\\", "-")
            name = safe_filename(filename or subject or "message")
            if not name.lower().endswith(".eml"):
                name = safe_filename(name + ".eml")
        elif filename or disposition == "attachment" or (image and content_id):
            default = ("image" if image else "attachment") + _EXTENSIONS.get(content_type, "")
            name = safe_filename(filename or default)
        else:
            if leaf.parent_type != "multipart/alternative":
                unnamed += 1  # alternatives (text/enriched, calendar) are other renderings
            continue
        if attachment_bytes + len(data) > limits.max_attachment_total:
            notes.append(
                f"attachment {name!r} dropped: attachments over "
                f"{limits.max_attachment_total} bytes in total"
            )
            continue
        attachment_bytes += len(data)
        attachments.append(
            Attachment(
                filename=name,
                content_type=content_type,
                data=data,
                content_id=content_id,
                inline=bool(content_id) and image and disposition != "attachment",
            )
        )
    if unnamed:
        notes.append(f"{unnamed} MIME part(s) without a file name dropped")

    if html is not None and len(html) > limits.max_html:
        html = html[: limits.max_html]
        notes.append(f"HTML cut to {limits.max_html} characters")
    text = "\n\n".join(part for part in texts if part.strip())
    if not text.strip() and html is not None:
        text = html_to_text(html)
    text = _clean_text(text)
    if len(text) > limits.max_text:
        text = text[: limits.max_text]
        notes.append(f"text cut to {limits.max_text} characters")
    trimmed = trim_reply(text)
    if trimmed != text:
        text = trimmed
        notes.append("quoted history trimmed")

    sender = dataclasses.replace(sender, display_name=_no_surrogates(sender.display_name))
    return IncomingMessage(
        sender=sender,
        subject=_no_surrogates(_subject(top.field("subject") or "")),
        text=text,
        html=html,
        attachments=tuple(attachments),
        thread=_thread(top),
        date=_date(top.field("date")),
        auto_generated=_auto_generated(top),
        notes=tuple(notes),
        marking_headers=_field_values(top, marking_header.lower()) if marking_header else (),
        marking_subjects=_field_values(top, "subject"),
    )


# --- MIME structure ---------------------------------------------------------------------------


def _read_entity(
    raw: bytes, start: int, end: int, depth: int, default_type: str, parent_type: str
) -> _Entity:
    fields, header_end, body_start = _header_block(raw, start, end)
    for name, value in fields:
        if name in _MIME_FIELDS and len(value) > _MAX_MIME_FIELD:
            raise MailRejected(f"{name} header longer than {_MAX_MIME_FIELD} characters")
    declared = next((value for name, value in fields if name == "content-type"), None)
    content_type = default_type
    params: dict[str, str] = {}
    if declared is not None:
        content_type, params = _structured(declared)
        if not _CONTENT_TYPE.fullmatch(content_type):
            content_type = "text/plain"  # what the email package does with a broken type
    return _Entity(
        start, header_end, body_start, end, depth, fields, content_type, params, parent_type
    )


def _header_block(raw: bytes, start: int, end: int) -> tuple[list[tuple[str, str]], int, int]:
    """The fields of the header block at `start`, where it ends, and where the body starts."""
    limit = min(end, start + _MAX_HEADER_BLOCK + 1)
    match = _HEADER_LINES.match(raw, start, limit)
    header_end = match.end() if match else start
    if header_end - start > _MAX_HEADER_BLOCK:
        raise MailRejected(f"header block larger than {_MAX_HEADER_BLOCK} bytes")
    body_start = header_end + _newline_length(raw, header_end, end)
    folded: list[list[bytes]] = []
    for line in raw[start:header_end].splitlines():
        if line[:1] in (b" ", b"\t"):
            if folded:
                folded[-1][1] += line  # unfolding removes the line break, keeps the blank
        elif not line.startswith(b"From "):
            name, _, value = line.partition(b":")
            folded.append([name, value])
    fields = [
        (name.decode("ascii", "replace").strip().lower(), value.decode("utf-8", "replace").strip())
        for name, value in folded
    ]
    return fields, header_end, body_start


def _newline_length(raw: bytes, pos: int, end: int) -> int:
    if raw.startswith(b"\r\n", pos) and pos + 2 <= end:
        return 2
    return 1 if pos < end and raw[pos] in b"\r\n" else 0


def _leaves(raw: bytes, top: _Entity, limits: MailLimits) -> list[_Entity]:
    """The non-multipart entities in document order; MailRejected beyond depth or part limits.

    Iterative (an explicit stack), and each multipart's body is searched for its own boundary
    only, so a 1,000-level nesting or 20,000 parts cost no more than the limit's worth.
    """
    leaves: list[_Entity] = []
    pending = [top]
    parts = 0
    while pending:
        entity = pending.pop()
        boundary = _boundary(entity)
        if boundary is None:
            leaves.append(entity)
            continue
        default = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
        children: list[_Entity] = []
        for start, end in _body_parts(raw, entity.body_start, entity.end, boundary):
            parts += 1
            if parts > limits.max_parts:
                raise MailRejected(f"more than {limits.max_parts} MIME parts")
            if entity.depth + 1 > limits.max_depth:
                raise MailRejected(f"MIME nesting deeper than {limits.max_depth} levels")
            child = _read_entity(raw, start, end, entity.depth + 1, default, entity.content_type)
            children.append(child)
        pending.extend(reversed(children))
    return leaves


def _boundary(entity: _Entity) -> bytes | None:
    if not entity.content_type.startswith("multipart/"):
        return None
    boundary = entity.params.get("boundary", "").rstrip()
    if not boundary or len(boundary) > _MAX_BOUNDARY or not boundary.isascii():
        return None  # the multipart's body is then nobody's text: it is ignored
    return boundary.encode("ascii")


def _body_parts(raw: bytes, start: int, end: int, boundary: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each body part of the multipart body raw[start:end].

    As RFC 2046 and the email package read it: a delimiter is a whole line `--boundary`
    (`--boundary--` closes), trailing blanks allowed; the line break before a delimiter
    belongs to it; repeated delimiter lines make no empty parts; a missing close delimiter
    ends the last part at the end of the body. Outer boundaries need no special care: the
    caller only searches inside the enclosing part.
    """
    part_start: int | None = None
    for content_end, line_end, closing in _delimiters(raw, start, end, boundary):
        if part_start is not None and content_end >= part_start:
            yield part_start, content_end
        if closing:
            return
        part_start = line_end + _newline_length(raw, line_end, end)
    if part_start is not None and part_start < end:
        yield part_start, end


def _delimiters(
    raw: bytes, start: int, end: int, boundary: bytes
) -> Iterator[tuple[int, int, bool]]:
    """(end of the preceding content, end of the line, is the close delimiter) per delimiter."""
    tail = rb"(--)?[ \t]*+(?=[\r\n]|\Z)"
    escaped = re.escape(boundary)
    first = re.compile(b"--" + escaped + tail).match(raw, start, end)
    if first is not None:
        yield start, first.end(), first.group(1) is not None
    # Two searches with a literal prefix are ~30 times faster than one on "[\r\n]--".
    found = heapq.merge(
        *(re.compile(lead + b"--" + escaped + tail).finditer(raw, start, end) for lead in _LEADS),
        key=lambda match: match.start(),
    )
    for match in found:
        line_start = match.start()
        crlf = raw[line_start] == 0x0A and line_start > start and raw[line_start - 1] == 0x0D
        yield line_start - 1 if crlf else line_start, match.end(), match.group(1) is not None


# --- header values ----------------------------------------------------------------------------


def _structured(value: str) -> tuple[str, dict[str, str]]:
    """`type/subtype; name=value` (or a disposition) as lowercase value and parameters.

    RFC 2045 syntax with comments and quoted strings, RFC 2231 extended and continued
    parameters, and RFC 2047 encoded-words inside values (sent by some clients). The first
    occurrence of a parameter wins, as in the email package; linear time.
    """
    segments = _split_parameters(value)
    plain: dict[str, str] = {}
    extended: dict[str, dict[int, tuple[bool, str]]] = {}
    for segment in segments[1:]:
        name, equals, raw_value = segment.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            continue
        item = _unquote(raw_value.strip())
        section = _SECTION.fullmatch(name)
        if section is None:
            plain.setdefault(name, item)
            continue
        base, number, star = section.groups()
        sections = extended.setdefault(base, {})
        index = int(number) if number is not None else 0
        if len(sections) < _MAX_SECTIONS:
            sections.setdefault(index, (number is None or star is not None, item))
    params = {name: _decode_words(item) for name, item in plain.items()}
    for base, sections in extended.items():
        params[base] = _join_sections(sections)
    return segments[0].strip().lower(), params


def _split_parameters(value: str) -> list[str]:
    """`value` split at ";" outside quoted strings, with comments removed."""
    segments: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    comment = 0
    for char in value:
        if escaped:
            escaped = False
            if not comment:
                current.append(char)
        elif char == "\\" and (quoted or comment):
            escaped = True
            if quoted:
                current.append(char)
        elif quoted:
            current.append(char)
            quoted = char != '"'
        elif comment:
            comment += {"(": 1, ")": -1}.get(char, 0)
        elif char == "(":
            comment = 1
        elif char == ";":
            segments.append("".join(current))
            current = []
        else:
            current.append(char)
            quoted = char == '"'
    segments.append("".join(current))
    return segments


def _unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    out: list[str] = []
    escaped = False
    for char in value[1:]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            break
        else:
            out.append(char)
    return "".join(out)


def _join_sections(sections: dict[int, tuple[bool, str]]) -> str:
    """An RFC 2231 parameter from its sections: charset'language'percent-encoded pieces."""
    charset: str | None = None
    data = bytearray()
    for position, index in enumerate(sorted(sections)):
        encoded, item = sections[index]
        if encoded:
            if position == 0 and item.count("'") >= 2:
                charset, _, item = item.split("'", 2)
            data += unquote_to_bytes(item)
        else:
            data += item.encode("utf-8", "replace")
    return _decode(bytes(data), charset)


def _decode_words(value: str) -> str:
    """RFC 2047 encoded-words decoded; blanks between adjacent encoded-words dropped, and the
    bytes of adjacent words in one charset joined before decoding (clients split characters)."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pending = bytearray()
    pending_charset = ""
    pos = 0
    for match in _ENCODED_WORD.finditer(value):
        gap = value[pos : match.start()]
        charset, encoding, payload = match.groups()
        adjacent = pos > 0 and pending_charset != "" and not gap.strip()
        if not adjacent or charset.lower() != pending_charset:
            out.append(_decode(bytes(pending), pending_charset))
            pending.clear()
            if not adjacent:
                out.append(gap)
        pending_charset = charset.lower()
        text = payload.encode("ascii", "replace")
        pending += _base64(text) if encoding in "bB" else binascii.a2b_qp(text, header=True)
        pos = match.end()
    out.append(_decode(bytes(pending), pending_charset))
    out.append(value[pos:])
    return "".join(out)


# --- decoding ---------------------------------------------------------------------------------


def _transfer_decode(body: bytes, entity: _Entity) -> bytes:
    encoding = (entity.field("content-transfer-encoding") or "").split(";")[0].strip().lower()
    if encoding == "base64":
        return _base64(body)
    if encoding == "quoted-printable":
        return binascii.a2b_qp(body)
    return body


def _base64(data: bytes) -> bytes:
    """Lenient base64: characters outside the alphabet skipped, missing padding tolerated."""
    clean = data.translate(None, _NOT_B64)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        return b""


def _decode(data: bytes, charset: str | None) -> str:
    """`data` in its declared charset; unknown or unusable charsets read as UTF-8. Never raises:
    undecodable bytes become U+FFFD."""
    name = (charset or "").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    if _CHARSET_NAME.fullmatch(name) and name not in _REFUSED_CODECS:
        try:
            codec = codecs.lookup(name).name
            if codec not in _REFUSED_CODECS:
                # Some codecs (UTF-7, UTF-16) can decode to lone surrogates: no valid text.
                return _no_surrogates(data.decode(codec, "replace"))
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass  # not a text encoding (base64, rot13) or not known at all
    return data.decode("utf-8", "replace")


_SURROGATES = re.compile("[\ud800-\udfff]")


def _no_surrogates(text: str) -> str:
    return _SURROGATES.sub("\ufffd", text)


def _clean_text(text: str) -> str:
    """Line breaks normalised to LF, control characters other than tab and LF removed."""
    text = _TEXT_CONTROLS.sub("", _NEWLINES.sub("\n", text))
    return text.strip("\n").rstrip()


def _inner_subject(data: bytes) -> str:
    """The Subject of a message/rfc822 part (to name its .eml), read from its header block."""
    try:
        fields, _, _ = _header_block(data, 0, len(data))
    except MailRejected:
        return ""
    value = next((value for name, value in fields if name == "subject"), "")
    return _subject(value)


# --- top-level fields -------------------------------------------------------------------------


def _field_values(top: _Entity, name: str) -> tuple[str, ...]:
    """Every value of a field, RFC 2047 decoded, whole (the header block is bounded). Past
    `_MAX_MARKING_FIELDS` one more value is kept: enough for core.marking to see too many."""
    values = [value for key, value in top.fields if key == name][: _MAX_MARKING_FIELDS + 1]
    return tuple(_no_surrogates(_decode_words(value)) for value in values)


def _subject(value: str) -> str:
    """Decoded, control and bidi-override characters removed, whitespace collapsed, cut."""
    decoded = _decode_words(value[: 16 * KiB])
    decoded = _BIDI_CONTROLS.sub("", _SUBJECT_CONTROLS.sub(" ", decoded))
    return " ".join(decoded.split())[:_MAX_SUBJECT].rstrip()


def _ids(value: str) -> list[str]:
    """The message IDs in a Message-ID, In-Reply-To or References value, without <>."""
    candidates = _ANGLE.findall(value) if "<" in value else value.split()
    return [
        candidate.strip()
        for candidate in candidates
        if len(candidate.strip()) <= _MAX_ID_LENGTH and _MESSAGE_ID.fullmatch(candidate.strip())
    ]


def _thread(top: _Entity) -> ThreadRef:
    message_ids = _ids(top.field("message-id") or "")
    in_reply_to = [i for name, value in top.fields if name == "in-reply-to" for i in _ids(value)]
    references = [i for name, value in top.fields if name == "references" for i in _ids(value)]
    return ThreadRef(
        message_id=message_ids[0] if message_ids else None,
        in_reply_to=tuple(in_reply_to[-_MAX_IDS:]),
        references=tuple(references[-_MAX_IDS:]),
    )


def _content_id(value: str | None) -> str | None:
    if value is None:
        return None
    found = _ANGLE.search(value)
    content_id = (found.group(1) if found else value).strip()
    if len(content_id) > _MAX_ID_LENGTH or not _CONTENT_ID.fullmatch(content_id):
        return None
    return content_id


def _date(value: str | None) -> datetime | None:
    if value is None or len(value) > 256:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    # "-0000" means "time zone unknown": the time is UTC as far as anyone can tell.
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _auto_generated(top: _Entity) -> bool:
    """Whether the mail says a machine wrote it: RFC 3834 Auto-Submitted other than "no",
    X-Autoreply / X-Autorespond, or Precedence auto_reply / junk.

    `Precedence: list` and `bulk` do not count: every mail a mailing list distributes carries
    them, and list traffic is exactly what the bridge carries into rooms. Loops with the list
    itself are broken by Passerelle's own Message-IDs and marker header, not here.
    """
    submitted = top.field("auto-submitted")
    if submitted is not None and _token(submitted) != "no":
        return True
    if top.field("x-autoreply") is not None or top.field("x-autorespond") is not None:
        return True
    return _token(top.field("precedence") or "") in ("auto_reply", "junk")


def _token(value: str) -> str:
    return re.split(r"[\s;(]", value.strip(), maxsplit=1)[0].lower()


# --- file names -------------------------------------------------------------------------------


def safe_filename(name: str) -> str:
    """A file name that is safe to offer for download and shows what it is.

    Control, format (bidi overrides and marks, zero-width), surrogate, private-use, unassigned
    and line/paragraph separator characters are removed; then only the last path component is
    kept (both / and \\ separate), leading dots and blanks are stripped (no "..", no hidden
    files), whitespace is collapsed, the result is NFC and at most 200 characters, keeping the
    extension. An empty result becomes "attachment".
    """
    kept = "".join(c for c in name if unicodedata.category(c) not in _FILENAME_DROPPED)
    base = kept.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFC", " ".join(base.split())).lstrip(". ").rstrip(". ")
    if len(base) > 200:
        stem, dot, extension = base.rpartition(".")
        if dot and stem and 0 < len(extension) <= 16:
            base = (stem[: 199 - len(extension)].rstrip(". ") or "attachment") + "." + extension
        else:
            base = base[:200].rstrip(". ")
    return base or "attachment"
