"""Which Matrix events become mail, and the OutgoingMail each one is sent as (no I/O)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.ids import EventID, UserID
from bridge.core.matrix_event import (
    HTML_FORMAT,
    MAX_TEXT,
    MEDIA_MSGTYPES,
    MediaRef,
    NotSent,
    has_caption,
    matrix_id,
    message_source,
    read_media,
    show,
    strip_text_fallback,
)
from bridge.core.message import Attachment
from bridge.mail.compose import OutgoingMail
from bridge.mail.mime import safe_filename

__all__ = [
    "MAILED_MSGTYPES",
    "MediaRef",
    "NotSent",
    "PlannedMail",
    "outgoing_mail",
    "placeholder_attachment",
    "plan_event",
]

MAILED_MSGTYPES = ("m.text", "m.emote", "m.file", "m.image", "m.audio", "m.video")


@dataclass(frozen=True)
class PlannedMail:
    """A Matrix message that is to be mailed, read out of its event and bounded."""

    event_id: EventID
    sender: UserID
    msgtype: str
    body_text: str  # the message text; for media, the caption ("" when there is none)
    body_html: str | None  # formatted_body in org.matrix.custom.html, hostile
    media: MediaRef | None
    thread_root: EventID | None  # the root of the Matrix thread it was sent in
    reply_to: EventID | None  # the event it answers (not a thread's falling-back reply)
    replaces: EventID | None  # for an edit: the edited event (text from m.new_content)


def plan_event(
    event: Mapping[str, Any],
    *,
    bot_mxid: str,
    is_bridge_user: Callable[[str], bool],
    command_prefix: str,
) -> PlannedMail | NotSent:
    """What mail `event` (as received from the homeserver, every value hostile) becomes, or
    why it becomes none. Never raises for a malformed event."""
    untrusted: object = event  # the annotation is a promise that JSON decoding does not keep
    if not isinstance(untrusted, Mapping):
        return NotSent("the event is not a JSON object")
    event_type = event.get("type")
    if event_type == "m.reaction":
        return NotSent("reactions are not mailed")
    if event_type != "m.room.message":
        return NotSent(f"event type {show(event_type)} is not mailed")
    if "state_key" in event:
        return NotSent("state events are not mailed")
    event_id = matrix_id(event.get("event_id"), "$")
    if event_id is None:
        return NotSent("the event has no valid event_id")
    sender = matrix_id(event.get("sender"), "@")
    if sender is None:
        return NotSent("the event has no valid sender")
    if sender == bot_mxid or is_bridge_user(sender):
        return NotSent("sent by the bridge itself")

    content = event.get("content")
    if not isinstance(content, Mapping):
        return NotSent("the event content is not a JSON object")
    if not content or "msgtype" not in content:
        return NotSent("redacted or empty message")
    if content.get("msgtype") == "m.notice":
        return NotSent("m.notice messages are not mailed (bot output)")

    read = message_source(content)
    if isinstance(read, NotSent):
        return read
    relations, source = read

    msgtype = source.get("msgtype")
    if msgtype == "m.notice":
        return NotSent("m.notice messages are not mailed (bot output)")
    if not isinstance(msgtype, str) or msgtype not in MAILED_MSGTYPES:
        return NotSent(f"msgtype {show(msgtype)} is not mailed")
    body = source.get("body")
    if not isinstance(body, str):
        return NotSent("the message body is not text")
    body = body[:MAX_TEXT]
    formatted = source.get("formatted_body")
    body_html = (
        formatted[:MAX_TEXT]
        if source.get("format") == HTML_FORMAT and isinstance(formatted, str)
        else None
    )

    media: MediaRef | None = None
    if msgtype in MEDIA_MSGTYPES:
        found = read_media(source, msgtype, body)
        if isinstance(found, NotSent):
            return NotSent(f"{found.reason} is not mailed" if "file" in source else found.reason)
        media = found
        if not has_caption(source, body):  # the body is the file name, no caption
            body, body_html = "", None
    elif msgtype == "m.text" and _is_command(body, command_prefix):
        return NotSent("a command to the bridge")

    return PlannedMail(
        event_id=EventID(event_id),
        sender=UserID(sender),
        msgtype=msgtype,
        body_text=body,
        body_html=body_html,
        media=media,
        thread_root=relations.thread_root,
        reply_to=relations.reply_to,
        replaces=relations.replaces,
    )


def outgoing_mail(
    plan: PlannedMail,
    *,
    sender_name: str,
    disambiguate: bool,
    subject: str,
    in_reply_to: str | None,
    references: tuple[str, ...],
    attachments: tuple[Attachment, ...],
) -> OutgoingMail:
    """The mail for `plan`: an emote reads "* name text", a file without a caption shows its
    name as the text, an edit is a correction. The arguments besides `plan` come from the
    service (room member names, the mail thread, the downloaded media)."""
    text, body_html = plan.body_text, plan.body_html
    if plan.media is not None and not text:
        text, body_html = safe_filename(plan.media.filename), None
    elif plan.msgtype == "m.emote":
        name = clean_display_name(sender_name) or clean_display_name(plan.sender)
        rest = strip_text_fallback(text) if plan.reply_to is not None else text
        text = f"{text[: len(text) - len(rest)]}* {name} {rest}"
        if body_html is not None:
            body_html = f"* {html.escape(name)} {body_html}"
    return OutgoingMail(
        event_id=plan.event_id,
        sender_mxid=plan.sender,
        sender_name=sender_name,
        body_text=text,
        body_html=body_html,
        subject=subject,
        in_reply_to=in_reply_to,
        references=references,
        attachments=attachments,
        correction=plan.replaces is not None,
        disambiguate=disambiguate,
    )


def placeholder_attachment(media: MediaRef) -> Attachment:
    """What stands in for `media` when nothing may be downloaded (`passerelle inspect-event`):
    its name and type, and a line of text saying what it replaces."""
    size = "unknown size" if media.size is None else f"{media.size} bytes"
    note = f"[placeholder for {media.url}, {size}: the file is downloaded when the mail is sent]"
    return Attachment(
        filename=safe_filename(media.filename),
        content_type=media.content_type,
        data=note.encode("utf-8"),
    )


def _is_command(body: str, prefix: str) -> bool:
    """True when `body` starts (after blanks) with the command prefix as a word of its own,
    in any case: the words split as commands.parse_command splits them."""
    words = body.split(maxsplit=1)
    return bool(prefix) and bool(words) and words[0].casefold() == prefix.casefold()
