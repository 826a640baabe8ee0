"""Bounded metric labels: the free-text reason of a refusal becomes one of a few kinds."""

from __future__ import annotations

# Every value refusal_kind can give, so the metric can show each one, zeros included.
REFUSAL_KINDS = (
    "sender_not_allowed",
    "recipient_not_allowed",
    "not_permitted",
    "not_authenticated",
    "marking",
    "too_large",
    "encrypted",
    "unparseable",
    "other",
)

# First match wins: the order matters where texts share words ("sender x not allowed" is about
# the sender list, not authentication).
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("marking", ("marking",)),
    ("recipient_not_allowed", ("recipient not allowed",)),
    ("sender_not_allowed", ("not allowed", "may not use", "server not allowed")),
    ("not_permitted", ("not permitted", "permission", "only its author")),
    (
        "not_authenticated",
        (" unverified", " failed:", "authenticat", "dmarc", "dkim", "spf"),
    ),
    (
        "too_large",
        ("too large", "larger than", "longer than", "more than", "deeper than", "too long"),
    ),
    ("encrypted", ("encrypt",)),
    (
        "unparseable",
        (
            "unpars",
            "malformed",
            "invalid",
            "not valid",
            "not readable",
            "control character",
            "is empty",
            "group syntax",
            "not a single",
            "exactly one",
            "not an address",
            "not a json",
        ),
    ),
)


def refusal_kind(reason: str | None) -> str:
    """The kind of a refusal, from the reason the relay wrote in the audit log."""
    text = (reason or "").lower()
    for kind, needles in _RULES:
        if any(needle in text for needle in needles):
            return kind
    return "other"
