"""Exact sender-domain policy: `gouv.fr` is that domain, `*.gouv.fr` its strict subdomains."""

from __future__ import annotations

import functools
import ipaddress
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import idna

__all__ = ["DomainPattern", "domain_allowed", "normalize_domain"]

_MAX_INPUT = 1024  # far above the 253 octets a domain may have; bounds the IDNA work


@functools.lru_cache(maxsize=4096)
def normalize_domain(text: str) -> str:
    """`text` as a lowercase IDNA A-label domain, one trailing dot dropped; ValueError if invalid.

    UTS #46 mapping (STD3 rules, non-transitional) folds case and width and maps ideographic
    full stops to "."; every label must then be a valid IDNA 2008 label. Characters UTS #46
    would silently delete (zero-width space, soft hyphen, variation selectors, fillers) are
    refused rather than ignored, as are spaces and controls: `a\u200b.gouv.fr` is not
    `a.gouv.fr`. IP literals and all-numeric top labels (`1.2.3.4`, `[::1]`, `127.1`) are
    refused.

    Remembered for the last 4,096 texts (IDNA mapping is the costly part of reading 10,000
    links, and every mail's sender domain is checked again); failures are not remembered.
    """
    if len(text) > _MAX_INPUT:
        raise ValueError("domain is too long")
    candidate = text
    if not candidate:
        raise ValueError("domain is empty")
    if candidate.startswith("[") or ":" in candidate:
        raise ValueError("IP literals are not domains")
    if any(_invisible(char) for char in candidate):
        raise ValueError("domain contains invisible, control or space characters")
    try:
        ascii_domain = idna.encode(candidate, uts46=True, std3_rules=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"not a valid domain name ({_reason(e)})") from None
    # idna keeps one trailing dot (the DNS root), after mapping "。" and friends to ".".
    if ascii_domain.endswith("."):
        ascii_domain = ascii_domain[:-1]
    # UTS #46 can turn other characters into dots; check labels again on the final form.
    labels = ascii_domain.split(".")
    if any(not label for label in labels):
        raise ValueError("domain has an empty label")
    if _is_ip(ascii_domain) or labels[-1].isdigit():
        raise ValueError("IP addresses are not domains")
    return ascii_domain


@dataclass(frozen=True)
class DomainPattern:
    """One allowed domain: exactly `domain`, or (wildcard) any strict subdomain of it.

    `domain` is always a lowercase IDNA A-label without a trailing dot (checked on
    construction); build patterns from configuration text with `DomainPattern.parse`.
    """

    domain: str
    wildcard: bool = False

    def __post_init__(self) -> None:
        if normalize_domain(self.domain) != self.domain:
            raise ValueError("DomainPattern.domain must be normalised: use DomainPattern.parse")

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        """`gouv.fr` (that domain only) or `*.gouv.fr` (strict subdomains only); ValueError."""
        stripped = text.strip()  # surrounding spaces in configuration text are harmless
        wildcard = stripped.startswith("*.")
        body = stripped[2:] if wildcard else stripped
        if "*" in body:
            raise ValueError(
                f"domain pattern {_quote(text)}: '*' is only allowed as a leading '*.'"
            )
        try:
            domain = normalize_domain(body)
        except ValueError as e:
            raise ValueError(f"domain pattern {_quote(text)}: {e}") from None
        return cls(domain=domain, wildcard=wildcard)

    def matches(self, domain: str) -> bool:
        """Whether `domain` (compared as a lowercase IDNA A-label) is allowed by this pattern.

        A domain that cannot be IDNA-encoded never matches.
        """
        try:
            normalized = normalize_domain(domain)
        except ValueError:
            return False
        return self._matches_normalized(normalized)

    def _matches_normalized(self, normalized: str) -> bool:
        if not self.wildcard:
            return normalized == self.domain
        # Label boundary: "x.gouv.fr" ends with ".gouv.fr"; "evilgouv.fr" and "gouv.fr" do not.
        # normalize_domain guarantees no empty labels, so the prefix is at least one label.
        return normalized.endswith("." + self.domain)

    def __str__(self) -> str:
        return f"*.{self.domain}" if self.wildcard else self.domain


def domain_allowed(domain: str, patterns: Sequence[DomainPattern]) -> bool:
    """Whether any pattern allows `domain`; False for an empty list or an un-encodable domain."""
    try:
        normalized = normalize_domain(domain)
    except ValueError:
        return False
    return any(pattern._matches_normalized(normalized) for pattern in patterns)


# Code points UTS #46 maps to nothing that are not already Cf (idna's uts46data status "I").
_IGNORED_BY_UTS46 = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u3164\uffa0")
_IGNORED_RANGES = (("\u180b", "\u180f"), ("\ufe00", "\ufe0f"), ("\U000e0100", "\U000e01ef"))


def _invisible(char: str) -> bool:
    if char in _IGNORED_BY_UTS46 or any(lo <= char <= hi for lo, hi in _IGNORED_RANGES):
        return True
    category = unicodedata.category(char)
    return category[0] in "CZ"  # Cc Cf Cs Co Cn, Zs Zl Zp


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _quote(text: str, limit: int = 80) -> str:
    """A short, ASCII-only, quoted rendering of untrusted text for error messages."""
    shown = ascii(text[:limit])
    return shown + "..." if len(text) > limit else shown


def _reason(error: Exception) -> str:
    message = ascii(str(error))[1:-1]
    return message if len(message) <= 120 else message[:120] + "..."
