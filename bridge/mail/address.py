"""Strict parsing of a mail's From header into the one canonical sender identity."""

from __future__ import annotations

import email.errors
import email.headerregistry
import email.message
import email.policy
import re
import unicodedata

from email_validator import EmailNotValidError, validate_email

from bridge.core.ghosts import clean_display_name
from bridge.core.message import Sender
from bridge.mail.errors import MailRejected

__all__ = ["parse_from"]

_MAX_HEADER = 16 * 1024  # a From header longer than this is not a person's address
_FOLD = re.compile(r"\r?\n(?=[ \t])|\r(?=[ \t])")
# An addr-spec as we accept it: one dot-atom-ish local part, one domain; no quoting, comments,
# brackets, route or list punctuation, encoded-words or whitespace (email-validator then
# checks the real grammar).
_ADDR_SPEC = re.compile(r'[^\s"(),:;<>@\[\\\]]+@[^\s"(),:;<>@\[\\\]]+')
_PHRASE_FORBIDDEN = frozenset(",:;<>@[]\\")


def parse_from(msg: email.message.EmailMessage, *, allow_test_domains: bool = False) -> Sender:
    """The sender of `msg` (parsed with `email.policy.default`), or MailRejected.

    `Sender.address` is THE canonical identity of the sender: the local part lowercased, "@",
    the domain as a lowercase IDNA A-label (`Agent@Préfecture.GOUV.FR` becomes
    `agent@xn--prfecture-c4a.gouv.fr`). It is the one string used for domain policy, storage
    and the ghost's localpart; nothing else from the header is ever used as an identity.
    `Sender.display_name` is cleaned with `clean_display_name` and is for display only (and
    `ghost_display_name` still drops it when it looks like an address).

    Accepted: exactly one From header holding exactly one mailbox, `addr` or `name <addr>`,
    that the email package parses without defects (two benign ones excepted, see
    `_BENIGN_DEFECTS`), that an independent conservative scan of the raw header agrees with,
    and that email-validator accepts without quoted local parts, domain literals or display
    names. `allow_test_domains` lets `.test` domains through (test environments only).
    """
    raw_values = [value for name, value in msg.raw_items() if name.lower() == "from"]
    if len(raw_values) != 1:
        raise MailRejected(f"expected exactly one From header, found {len(raw_values)}")
    stored = raw_values[0]
    # A header set in code (msg["From"] = ...) is stored already parsed; its defects would be
    # lost by re-reading its text, so they count too.
    if any(not _benign(d) for d in getattr(stored, "defects", ())):
        raise MailRejected("malformed From header")
    raw = _raw_text(stored)

    # Parse the (UTF-8 decoded) raw text ourselves instead of msg["From"]: for 8-bit headers
    # msg["From"] hands out surrogate-escaped address parts, and it raises instead of
    # reporting a defect when an encoded-word hides a CR or LF.
    try:
        header: object = email.policy.default.header_fetch_parse("From", raw)
    except Exception as e:  # the header parser's failures on hostile input are not typed
        raise MailRejected(f"unparsable From header ({type(e).__name__})") from None
    if not isinstance(header, email.headerregistry.AddressHeader):
        raise MailRejected("From header is not an address header")
    # `defects` comes from BaseHeader, which the stubs do not combine with AddressHeader.
    all_defects: tuple[email.errors.MessageDefect, ...] = tuple(getattr(header, "defects", ()))
    defects = [d for d in all_defects if not _benign(d)]
    if defects:
        raise MailRejected(f"malformed From header: {_safe(str(defects[0]))}")
    if any(group.display_name is not None for group in header.groups):
        raise MailRejected("From header uses group syntax")
    addresses = header.addresses
    if len(addresses) != 1:
        raise MailRejected(f"From header must name exactly one address, found {len(addresses)}")
    address = addresses[0]
    addr_spec = address.addr_spec

    # Cross-check with an independent, deliberately narrow reading of the raw header.
    independent = _independent_addr_spec(raw)
    if independent is None:
        raise MailRejected(f"From header is not a single plain address: {_safe(raw)}")
    if independent != addr_spec:
        raise MailRejected(
            f"From header is ambiguous: {_safe(independent, 60)} vs {_safe(addr_spec, 60)}"
        )

    try:
        valid = validate_email(
            addr_spec,
            check_deliverability=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            allow_smtputf8=True,
            test_environment=allow_test_domains,
        )
    except EmailNotValidError as e:
        raise MailRejected(f"invalid sender address: {_safe(str(e))}") from None
    canonical = f"{valid.local_part.lower()}@{valid.ascii_domain.lower()}"
    return Sender(address=canonical, display_name=clean_display_name(address.display_name))


# Defects that do not make the address ambiguous: an unquoted "." in the display name
# (`J. Dupont <j@gouv.fr>`, common in real mail) and a non-ASCII local part (RFC 6532 SMTPUTF8,
# which email-validator then checks). Anything else rejects the mail.
_BENIGN_DEFECTS: tuple[tuple[type[email.errors.MessageDefect], str | None], ...] = (
    (email.errors.ObsoleteHeaderDefect, "period in 'phrase'"),
    (email.errors.NonASCIILocalPartDefect, None),
)


def _benign(defect: email.errors.MessageDefect) -> bool:
    return any(
        type(defect) is kind and (text is None or str(defect) == text)
        for kind, text in _BENIGN_DEFECTS
    )


def _raw_text(value: object) -> str:
    """The raw header value as text: 8-bit bytes decoded as UTF-8, folding removed."""
    text = str(value)
    if len(text) > _MAX_HEADER:
        raise MailRejected("From header is too long")
    if any("\udc80" <= char <= "\udcff" for char in text):
        # The bytes parser keeps non-ASCII header bytes as surrogate escapes.
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeError:
            raise MailRejected("From header is not valid UTF-8") from None
    text = _FOLD.sub("", text)
    for char in text:
        if char != "\t" and unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            raise MailRejected(f"From header contains control character {char!a}")
    if not text.strip():
        raise MailRejected("From header is empty")
    return text


def _independent_addr_spec(raw: str) -> str | None:
    """The addr-spec of `raw` if it is plainly `addr`, `<addr>` or `phrase <addr>`, else None.

    Independent of the email package: quoted strings and comments are skipped (comments may
    only stand between words, never inside the address), the rest must hold exactly one "@",
    and the address must be one unquoted token.
    """
    skeleton: list[str] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == '"':
            end = _skip_quoted(raw, i)
            if end is None:
                return None
            skeleton.append('"')  # placeholder: a quoted word, content irrelevant
            i = end
        elif char == "(":
            end = _skip_comment(raw, i)
            if end is None:
                return None
            skeleton.append(" ")
            i = end
        elif char in ")\\":
            return None
        else:
            skeleton.append(char)
            i += 1
    text = "".join(skeleton)
    if text.count("@") != 1:
        return None
    if "<" in text:
        phrase, sep, rest = text.partition("<")
        addr, sep, tail = rest.partition(">")
        if not sep or tail.strip() or any(c in _PHRASE_FORBIDDEN for c in phrase):
            return None
        addr = addr.strip()
    else:
        addr = text.strip()
    if not _ADDR_SPEC.fullmatch(addr) or "=?" in addr:
        return None
    return addr


def _skip_quoted(raw: str, start: int) -> int | None:
    """Index just after the quoted string opening at `start`, or None if unterminated."""
    i = start + 1
    while i < len(raw):
        if raw[i] == "\\":
            i += 2
        elif raw[i] == '"':
            return i + 1
        else:
            i += 1
    return None


def _skip_comment(raw: str, start: int) -> int | None:
    """Index just after the (possibly nested) comment opening at `start`, or None."""
    depth = 0
    i = start
    while i < len(raw):
        char = raw[i]
        if char == "\\":
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _safe(text: str, limit: int = 100) -> str:
    """Untrusted text for a one-line reason: ASCII only, escaped, at most about `limit` chars."""
    out: list[str] = []
    length = 0
    for char in text:
        piece = char if " " <= char <= "~" else ascii(char)[1:-1]
        length += len(piece)
        if length > limit:
            out.append("...")
            break
        out.append(piece)
    return "".join(out)
