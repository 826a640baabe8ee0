"""IMAP wire format: quoting, modified UTF-7, UID sets, response text and FETCH parsing."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("passerelle.mail.imap")

_FETCH_START_RE = re.compile(rb"^(\d+) FETCH[ (]", re.IGNORECASE)
_LOOSE_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_LITERAL_RE = re.compile(rb"\{(\d+)\}$")
_UNPRINTABLE_RE = re.compile(r"[^\x20-\x7e]")


def quote(text: str) -> str:
    """An IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def utf7(name: str) -> str:
    """A folder name in IMAP's modified UTF-7 (RFC 3501 §5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + encoded.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def uid_set(uids: Sequence[int]) -> str:
    """``1:3,7,9:10`` for [1, 2, 3, 7, 9, 10]."""
    parts: list[str] = []
    ordered = sorted(set(uids))
    start = prev = ordered[0]
    for uid in [*ordered[1:], None]:
        if uid is not None and uid == prev + 1:
            prev = uid
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        if uid is not None:
            start = prev = uid
    return ",".join(parts)


def printable(text: str) -> str:
    return _UNPRINTABLE_RE.sub("?", text)


def response_text(response: Any) -> str:
    """The server's text of a tagged response, short and printable."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    text = bytes(last).decode("utf-8", "replace") if isinstance(last, bytes | bytearray) else ""
    return printable(text)[:200] or "(no text)"


# --- FETCH response parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class FetchRecord:
    """One message's data from a FETCH response."""

    uid: int | None
    size: int | None = None
    body: bytes | None = None
    error: str | None = None


class _Unparseable(ValueError):
    pass


# A token is ("(", b"("), (")", b")"), ("atom", ...) or ("string", ...) (quoted or literal).
_Token = tuple[str, bytes]
_Value = _Token | list["_Value"]


def parse_fetch(lines: Sequence[bytes | bytearray]) -> list[FetchRecord]:
    """Parse aioimaplib's untagged FETCH lines (tagged text already removed).

    aioimaplib gives ``b"12 FETCH (UID 12 BODY[] {345}"``, then the literal as a bytearray, then
    the rest of the line (``b")"``); items may come in any order, and a server may add others
    (FLAGS) or send a separate FETCH for the same message. A record that cannot be parsed is
    returned with ``error`` set (and its UID if one can be seen) instead of raising.
    """
    records: list[FetchRecord] = []
    current: list[bytes | bytearray] = []
    for line in lines:
        if isinstance(line, bytes) and _FETCH_START_RE.match(line):
            if current:
                records.append(_parse_record(current))
            current = [line]
        elif current:
            current.append(line)
        else:
            log.debug("ignoring a line outside FETCH data: %.80r", bytes(line))
    if current:
        records.append(_parse_record(current))
    return records


def _parse_record(segments: list[bytes | bytearray]) -> FetchRecord:
    try:
        tokens = _tokenize(segments)
        if (
            len(tokens) < 3
            or tokens[0][0] != "atom"
            or not tokens[0][1].isdigit()
            or tokens[1][0] != "atom"
            or tokens[1][1].upper() != b"FETCH"
            or tokens[2][0] != "("
        ):
            raise _Unparseable("not a FETCH response")
        items, end = _parse_list(tokens, 2)
        if end != len(tokens):
            raise _Unparseable("data after the FETCH item list")
        if len(items) % 2:
            raise _Unparseable("odd number of FETCH items")
        fields: dict[bytes, _Value] = {}
        for name, value in zip(items[::2], items[1::2], strict=True):
            if isinstance(name, list) or name[0] != "atom":
                raise _Unparseable("FETCH item name is not an atom")
            fields.setdefault(name[1].upper(), value)
        uid = _number(fields.get(b"UID"), "UID")
        if uid is None:
            raise _Unparseable("no UID")
        body: bytes | None = None
        if b"BODY[]" in fields:
            value = fields[b"BODY[]"]
            if isinstance(value, list) or value[0] != "string":
                return FetchRecord(uid, error="BODY[] is not a string")
            body = value[1]
        return FetchRecord(uid, size=_number(fields.get(b"RFC822.SIZE"), "RFC822.SIZE"), body=body)
    except _Unparseable as exc:
        first = segments[0] if isinstance(segments[0], bytes) else b""
        match = _LOOSE_UID_RE.search(first)
        return FetchRecord(int(match.group(1)) if match else None, error=str(exc))


def _number(value: _Value | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list) or value[0] != "atom" or not value[1].isdigit():
        raise _Unparseable(f"{name} is not a number")
    return int(value[1])


def _parse_list(tokens: list[_Token], pos: int) -> tuple[list[_Value], int]:
    """Parse the parenthesized list starting at ``tokens[pos]``; return it and the next index."""
    items: list[_Value] = []
    pos += 1
    while pos < len(tokens):
        kind = tokens[pos][0]
        if kind == ")":
            return items, pos + 1
        if kind == "(":
            sub, pos = _parse_list(tokens, pos)
            items.append(sub)
        else:
            items.append(tokens[pos])
            pos += 1
    raise _Unparseable("unbalanced parentheses")


def _tokenize(segments: Sequence[bytes | bytearray]) -> list[_Token]:
    tokens: list[_Token] = []
    literal: int | None = None
    for segment in segments:
        if isinstance(segment, bytearray):
            if literal is None or len(segment) != literal:
                raise _Unparseable("literal of unexpected size")
            tokens.append(("string", bytes(segment)))
            literal = None
            continue
        if literal is not None:
            raise _Unparseable("announced literal is missing")
        text = bytes(segment)
        pos, end = 0, len(text)
        while pos < end:
            char = text[pos : pos + 1]
            if char == b" ":
                pos += 1
            elif char in (b"(", b")"):
                tokens.append((char.decode(), char))
                pos += 1
            elif char == b'"':
                value = bytearray()
                pos += 1
                while pos < end and text[pos : pos + 1] != b'"':
                    if text[pos : pos + 1] == b"\\":
                        pos += 1
                    value += text[pos : pos + 1]
                    pos += 1
                if pos >= end:
                    raise _Unparseable("unterminated quoted string")
                tokens.append(("string", bytes(value)))
                pos += 1
            elif char == b"{":
                match = _LITERAL_RE.match(text, pos)
                if match is None:
                    raise _Unparseable("malformed literal")
                literal = int(match.group(1))
                pos = end
            else:
                start, depth = pos, 0
                while pos < end:
                    char = text[pos : pos + 1]
                    if char == b"[":
                        depth += 1
                    elif char == b"]":
                        depth -= 1
                    elif depth <= 0 and char in (b" ", b"(", b")", b'"'):
                        break
                    pos += 1
                tokens.append(("atom", text[start:pos]))
    if literal is not None:
        raise _Unparseable("announced literal is missing")
    return tokens
