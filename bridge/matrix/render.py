"""Turning a bridged message into Matrix event contents (used to send, and by inspect-mail)."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from bridge.core.authentication import CONTENT_KEY, MARKS
from bridge.core.ids import EventID
from bridge.core.message import (
    INLINE_PREFIX,
    Attachment,
    IncomingMessage,
    placeholder_content_id,
)
from bridge.core.threading import ThreadTarget

_INLINE_IMG = re.compile(
    r'<img\b[^>]*?\bsrc="(' + re.escape(INLINE_PREFIX) + r'[0-9a-f]*)"[^>]*>', re.IGNORECASE
)


def _text_html(text: str) -> str:
    return "<br>".join(html.escape(line) for line in text.split("\n"))


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def inline_ids(message: IncomingMessage) -> set[str]:
    """Content-IDs the HTML shows inline (those attachments need no event of their own)."""
    if not message.html:
        return set()
    found = (placeholder_content_id(url) for url in _INLINE_IMG.findall(message.html))
    return {cid for cid in found if cid is not None}


def resolve_images(body_html: str, urls: Mapping[str, str]) -> str:
    """Inline images become their uploaded mxc:// URLs; one that was not uploaded is dropped."""

    def swap(match: re.Match[str]) -> str:
        content_id = placeholder_content_id(match.group(1))
        url = urls.get(content_id) if content_id is not None else None
        if url is None:
            return ""
        return match.group(0).replace(match.group(1), html.escape(url))

    return _INLINE_IMG.sub(swap, body_html)


def relation(target: ThreadTarget, *, threads: bool) -> dict[str, Any] | None:
    if target.parent is None:
        return None
    if threads and target.thread_root is not None:
        return {
            "rel_type": "m.thread",
            "event_id": target.thread_root,
            "is_falling_back": False,
            "m.in_reply_to": {"event_id": target.parent},
        }
    return {"m.in_reply_to": {"event_id": target.parent}}


def main_content(
    message: IncomingMessage, target: ThreadTarget, image_urls: Mapping[str, str], *, threads: bool
) -> dict[str, Any]:
    """The event that carries the text: the subject leads when it opens a conversation."""
    lead = message.subject if target.is_new and message.subject else ""
    text = message.text.strip() or "(no text)"
    notes = "; ".join(message.notes)
    body = "\n\n".join(p for p in (lead, text, f"({notes})" if notes else "") if p)
    if message.html and "quoted history trimmed" not in message.notes:
        formatted = resolve_images(message.html, image_urls)
    else:
        formatted = f"<p>{_text_html(text)}</p>"
    if lead:
        formatted = f"<p><strong>{html.escape(lead)}</strong></p>{formatted}"
    if notes:
        formatted += f"<p><em>({html.escape(notes)})</em></p>"
    mark = None if message.auth is None else MARKS.get(message.auth.verdict)
    if mark is not None:
        # First, in both forms, so no client (or notification) shows the text without it.
        body = f"{mark}\n\n{body}"
        formatted = f"<p><strong>{html.escape(mark)}</strong></p>{formatted}"
    content: dict[str, Any] = {
        "msgtype": "m.text",
        "body": body,
        "format": "org.matrix.custom.html",
        "formatted_body": formatted,
        "m.mentions": {},
    }
    if message.auth is not None:
        content[CONTENT_KEY] = message.auth.content()
    rel = relation(target, threads=threads)
    if rel is not None:
        content["m.relates_to"] = rel
    return content


def attachment_content(attachment: Attachment, url: str) -> dict[str, Any]:
    image = attachment.content_type.startswith("image/")
    return {
        "msgtype": "m.image" if image else "m.file",
        "body": attachment.filename,
        "filename": attachment.filename,
        "url": url,
        "info": {"mimetype": attachment.content_type, "size": len(attachment.data)},
        "m.mentions": {},
    }


def too_big_content(attachment: Attachment, limit: int) -> dict[str, Any]:
    text = (
        f"The attachment “{attachment.filename}” ({_size(len(attachment.data))}) is larger than "
        f"this homeserver accepts ({_size(limit)}), so it was not uploaded."
    )
    return {"msgtype": "m.notice", "body": text, "m.mentions": {}}


def follow_up_relation(main_event: str, target: ThreadTarget, *, threads: bool) -> dict[str, Any]:
    """Attachments sit in the message's thread (threads) or answer its text event (flat)."""
    if threads:
        root = target.thread_root or main_event
        return {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": True,
            "m.in_reply_to": {"event_id": main_event},
        }
    return {"m.in_reply_to": {"event_id": main_event}}


def notice_content(
    text: str,
    *,
    html: str | None = None,
    reply_to: EventID | None = None,
    thread_root: EventID | None = None,
) -> dict[str, Any]:
    """An m.notice (bot output, never bridged), as a reply to `reply_to` and inside the thread
    of `thread_root` if given; `html` is already safe HTML."""
    content: dict[str, Any] = {"msgtype": "m.notice", "body": text, "m.mentions": {}}
    if html is not None:
        content.update(format="org.matrix.custom.html", formatted_body=html)
    if thread_root is not None:
        relation: dict[str, Any] = {
            "rel_type": "m.thread",
            "event_id": thread_root,
            "is_falling_back": reply_to is None,
        }
        if reply_to is not None:
            relation["m.in_reply_to"] = {"event_id": reply_to}
        content["m.relates_to"] = relation
    elif reply_to is not None:
        content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
    return content
