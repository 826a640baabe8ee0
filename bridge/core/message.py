"""The protocol-neutral message model: what crosses the bridge, whichever side it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from bridge.core.authentication import Verdict


@dataclass(frozen=True)
class Sender:
    """Who wrote it. `address` is the one canonical identity; the name is for display only."""

    address: str
    display_name: str


@dataclass(frozen=True)
class Attachment:
    filename: str  # already made safe: no path, no control or bidi characters
    content_type: str  # lowercase type/subtype
    data: bytes
    content_id: str | None = None  # without <>, for inline images referenced as cid:
    inline: bool = False


@dataclass(frozen=True)
class ThreadRef:
    """Where a message sits in its conversation (mail: Message-ID, In-Reply-To, References)."""

    message_id: str | None  # without <>
    in_reply_to: tuple[str, ...] = ()
    references: tuple[str, ...] = ()


@dataclass(frozen=True)
class IncomingMessage:
    """A message from a remote, parsed and bounded, ready for policy, threading and sending."""

    sender: Sender
    subject: str
    text: str  # plain text, quoted history and signature trimmed
    # HTML already sanitised to the Matrix allowlist by the adapter that parsed the message;
    # inline images point at inline_placeholder(content_id) until the sending side uploads
    # them (or drops them).
    html: str | None
    attachments: tuple[Attachment, ...]
    thread: ThreadRef
    date: datetime | None
    # An automatic reply (Auto-Submitted, X-Autoreply, Precedence: auto_reply/junk): never
    # relayed, so two robots cannot answer each other through the bridge. Precedence: list and
    # bulk are not auto-replies: they mark ordinary list traffic, which is the product.
    auto_generated: bool = False
    notes: tuple[str, ...] = field(default=())  # what was dropped or trimmed, for the reader
    # Who vouched for the sender (None: not checked, e.g. inspect without a config).
    auth: Verdict | None = None
    # For classification markings (core.marking): every value of the marking header, RFC 2047
    # decoded, and every Subject decoded but not cut like `subject` (a tag may sit further on).
    marking_headers: tuple[str, ...] = ()
    marking_subjects: tuple[str, ...] = ()


INLINE_PREFIX = "mxc://passerelle.invalid/cid-"


def inline_placeholder(content_id: str) -> str:
    """The image URL an adapter's sanitised HTML uses for an inline part until it is uploaded
    (an mxc:// URL, so it survives sanitising that only lets mxc:// images through)."""
    return INLINE_PREFIX + content_id.encode("utf-8").hex()


def placeholder_content_id(url: str) -> str | None:
    if not url.startswith(INLINE_PREFIX):
        return None
    try:
        return bytes.fromhex(url[len(INLINE_PREFIX) :]).decode("utf-8")
    except ValueError:
        return None
