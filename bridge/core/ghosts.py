"""Ghost identities: reversible Matrix localparts for addresses, and safe display names."""

from __future__ import annotations

import re
import unicodedata

__all__ = ["clean_display_name", "decode_localpart", "encode_localpart", "ghost_display_name"]

# Characters that stand for themselves in an encoded localpart; everything else (including
# "=", uppercase letters and every non-ASCII character) becomes "=" + two lowercase hex digits
# per UTF-8 byte. The output alphabet is [a-z0-9._=-], inside Matrix's historical [a-z0-9._=/+-].
_LITERAL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")
_HEX = "0123456789abcdef"
_ESCAPE = re.compile(r"=([0-9a-f]{2})")
_ENCODED = re.compile(r"(?:[a-z0-9._-]|=[0-9a-f]{2})*")


def encode_localpart(address: str) -> str:
    """`address` as a Matrix localpart: deterministic, reversible with `decode_localpart`.

    `agent@gouv.fr` becomes `agent=40gouv.fr`. Lone surrogates are encoded as their
    (surrogatepass) UTF-8 bytes, so any `str` round-trips.
    """
    out: list[str] = []
    for char in address:
        if char in _LITERAL:
            out.append(char)
        else:
            out.extend(f"={byte:02x}" for byte in char.encode("utf-8", "surrogatepass"))
    return "".join(out)


def decode_localpart(localpart: str) -> str:
    """The address `encode_localpart` turned into `localpart`; ValueError for anything else.

    Refuses characters outside the encoding's alphabet, uppercase or truncated escapes,
    escapes of characters that are written literally (`=61` for `a`), and invalid UTF-8.
    """
    if not _ENCODED.fullmatch(localpart):
        raise ValueError("not an encoded ghost localpart")
    try:
        data = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), localpart)
        decoded = data.encode("latin-1").decode("utf-8", "surrogatepass")
    except UnicodeError:
        raise ValueError("encoded ghost localpart is not valid UTF-8") from None
    if encode_localpart(decoded) != localpart:
        raise ValueError("not the canonical encoding of an address")
    return decoded


# Removed outright: controls, format characters (bidi embeddings/overrides/isolates, zero-width
# characters, BOM, word joiner, tags), surrogates, private use and unassigned code points.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
# Invisible characters outside those categories, used to make names look blank or alike.
_DROP_CHARS = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")
# Become a space before whitespace is collapsed, so "Jean\nDupont" stays two words.
_SPACE_CHARS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x1f\x85\u2028\u2029")
_MAX_COMBINING = 4  # combining marks kept after one base character ("zalgo" text is capped)
_INPUT_FACTOR = 16  # look at no more than max_length * 16 (+ 1024) characters of input


def clean_display_name(name: str, max_length: int = 100) -> str:
    """`name` made safe to show: NFC, no invisible/control/bidi characters, one-line, bounded.

    Returns "" when nothing visible is left. Truncation to `max_length` code points never
    leaves a base character without its combining marks, or half a flag.
    """
    if max_length < 0:
        raise ValueError("max_length must not be negative")
    name = name[: max_length * _INPUT_FACTOR + 1024]
    kept: list[str] = []
    marks = 0
    for char in unicodedata.normalize("NFC", name):
        if char in _SPACE_CHARS:
            kept.append(" ")
            marks = 0
            continue
        category = unicodedata.category(char)
        if category in _DROP_CATEGORIES or category in ("Zl", "Zp") or char in _DROP_CHARS:
            continue
        if category in ("Mn", "Me"):
            # A mark at the start or after a space would combine with whatever precedes the
            # name when displayed; beyond a few marks it is only there to deface the line.
            if not kept or kept[-1] == " " or marks >= _MAX_COMBINING:
                continue
            marks += 1
        else:
            marks = 0
        kept.append(" " if category == "Zs" else char)
    text = " ".join("".join(kept).split())
    if len(text) > max_length:
        text = text[: _cut(text, max_length)].rstrip()
    return text


def _cut(text: str, limit: int) -> int:
    """An index <= limit where `text` can be cut without splitting a character cluster."""
    cut = limit
    # Back off over combining marks and emoji modifiers so the base character goes with them.
    while cut > 0 and _extends(text[cut]):
        cut -= 1
    # Regional indicators pair up from the start of a run; do not keep half a flag.
    if cut < len(text) and _is_regional(text[cut]):
        run = 0
        while run < cut and _is_regional(text[cut - 1 - run]):
            run += 1
        if run % 2:
            cut -= 1
    return cut


def _extends(char: str) -> bool:
    return unicodedata.category(char) in ("Mn", "Me", "Mc") or "\U0001f3fb" <= char <= "\U0001f3ff"


def _is_regional(char: str) -> bool:
    return "\U0001f1e6" <= char <= "\U0001f1ff"


def ghost_display_name(name: str, address: str) -> str:
    """`"<clean name> (<address>)"`, or only `address` when the name is empty or has an "@".

    A display name that looks like an address is a spoofing attempt
    (`"agent@gouv.fr" <x@evil.com>` shows as `x@evil.com`); "@" look-alikes such as U+FF20
    FULLWIDTH COMMERCIAL AT count as "@".
    """
    clean = clean_display_name(name)
    if not clean or "@" in unicodedata.normalize("NFKC", clean):
        return address
    return f"{clean} ({address})"
