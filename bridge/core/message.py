"""The protocol-neutral message model: what crosses the bridge, whichever side it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


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
    html: str | None  # raw HTML of the message (sanitised only when sent), or None
    attachments: tuple[Attachment, ...]
    thread: ThreadRef
    date: datetime | None
    auto_generated: bool = False  # Auto-Submitted, Precedence bulk/junk/list auto-replies
    notes: tuple[str, ...] = field(default=())  # what was dropped or trimmed, for the reader
