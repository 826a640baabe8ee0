"""Trimming quoted history and signatures from the plain text of a mail reply."""

from __future__ import annotations

import re

__all__ = ["trim_reply"]

_SIGNATURE = "-- "  # RFC 3676 4.3: the signature separator line, dash dash space

# "On Mon, 3 Jun 2024 at 10:00, Alice <alice@example.org> wrote:" and its translations; mail
# clients often wrap it over two or three lines, so it is matched on the joined lines.
_ATTRIBUTION = re.compile(
    r"(?:On|Le|Am|El|Il|Op)\s.*(?:wrote|a\s+écrit|schrieb|escribió|ha\s+scritto|schreef)"
    r"[^:]{0,80}:",
    re.IGNORECASE | re.DOTALL,
)
# Outlook's separator line above the quoted message.
_ORIGINAL_MESSAGE = re.compile(
    r"-{2,}\s*(?:Original Message|Message d'origine|Ursprüngliche Nachricht|Mensaje original"
    r"|Messaggio originale|Oorspronkelijk bericht)\s*-{2,}",
    re.IGNORECASE,
)
# Outlook's header block ("De : Alice / Envoyé : lundi / À : liste / Objet : ...").
_HEADER_FROM = re.compile(r"\*?(?:From|De|Von|Da|Van)\s*:\*?\s*\S", re.IGNORECASE)
_HEADER_FIELD = re.compile(
    r"\*?(?:Sent|Envoyé|Date|Gesendet|Inviato|Verzonden|To|À|A|An|Aan|Cc|Subject|Objet|Betreff"
    r"|Oggetto|Onderwerp)\s*:",
    re.IGNORECASE,
)
_HEADER_SUBJECT = re.compile(
    r"\*?(?:Subject|Objet|Betreff|Oggetto|Onderwerp)\s*:\*?\s*(.*)", re.IGNORECASE
)
_FORWARD_SUBJECT = re.compile(r"(?:fwd?|tr|wg)\s*:", re.IGNORECASE)
_FORWARD_MARKER = re.compile(
    r"forwarded message|message transféré|weitergeleitete nachricht|mensaje reenviado"
    r"|messaggio inoltrato",
    re.IGNORECASE,
)
_RULE = re.compile(r"[_\-=*]{4,}")  # "________________" that Outlook puts above its headers


def trim_reply(text: str) -> str:
    """`text` without its signature, its trailing quoted history and Outlook's quoted original.

    Cuts at the first `-- ` signature line, at an Outlook "-----Original Message-----" line or
    "De : / Envoyé : / À : / Objet :" header block (not a forward's), and before the trailing
    block of `>`-quoted lines together with its attribution line ("On ... wrote:", "Le ... a
    écrit :"). Quotes interleaved with the writer's answers stay; only the trailing block goes.
    Never returns an empty text for a message that had unquoted content: a cut that would leave
    no unquoted line is not made, and a message that is all quotes is returned unchanged.
    """
    lines = text.split("\n")
    cuts = sorted(
        cut
        for cut in (_signature(lines), _outlook(lines), _trailing_quote(lines))
        if cut is not None
    )
    for cut in cuts:
        kept = lines[:cut]
        while kept and (not kept[-1].strip() or _RULE.fullmatch(kept[-1].strip())):
            kept.pop()
        if any(_is_content(line) for line in kept):
            return "\n".join(kept).rstrip()
    return text


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith(">")


def _quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def _signature(lines: list[str]) -> int | None:
    for index, line in enumerate(lines):
        if line.rstrip("\r") == _SIGNATURE:
            return index
    return None


def _outlook(lines: list[str]) -> int | None:
    for index, line in enumerate(lines):
        stripped = line.strip()
        if _ORIGINAL_MESSAGE.fullmatch(stripped):
            return index
        if _HEADER_FROM.match(stripped) and _header_block(lines, index):
            return index
    return None


def _header_block(lines: list[str], start: int) -> bool:
    """Whether the From line at `start` opens an Outlook header block of a reply."""
    fields = 0
    subject: str | None = None
    for line in lines[start + 1 : start + 8]:
        stripped = line.strip()
        if not stripped:
            break
        if _HEADER_FIELD.match(stripped):
            fields += 1
            found = _HEADER_SUBJECT.match(stripped)
            if found:
                subject = found.group(1)
    if fields < 2 or subject is None or _FORWARD_SUBJECT.match(subject.strip()):
        return False
    before = [line for line in lines[max(start - 3, 0) : start] if line.strip()]
    return not any(_FORWARD_MARKER.search(line) for line in before)


def _trailing_quote(lines: list[str]) -> int | None:
    """Where the trailing block of quoted lines starts, with its attribution line if any."""
    index = len(lines) - 1
    while index >= 0 and not lines[index].strip():
        index -= 1
    if index < 0 or not _quoted(lines[index]):
        return None
    while index >= 0 and (_quoted(lines[index]) or not lines[index].strip()):
        index -= 1
    start = index + 1
    # The attribution is the last unquoted line before the block, or the last two or three
    # when the client wrapped it.
    for count in (1, 2, 3):
        first = start - count
        if first < 0 or not lines[first].strip():
            break
        if _ATTRIBUTION.fullmatch(" ".join(line.strip() for line in lines[first:start])):
            return first
    return start
