"""Which Matrix events become mail, and the OutgoingMail each one is sent as (no I/O)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.ids import EventID, UserID
from bridge.core.message import Attachment

# The mail model and its reply-fallback rule: an emote's "* name" goes after a fallback so
# that compose() still recognises (and removes) the fallback.
from bridge.mail.compose import OutgoingMail, strip_text_fallback
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
_MEDIA_MSGTYPES = frozenset({"m.file", "m.image", "m.audio", "m.video"})
_HTML_FORMAT = "org.matrix.custom.html"
_MAX_TEXT = 65536  # characters; a whole event is at most 64 KiB
_MAX_ID_BYTES = 255  # the Matrix spec's limit for user and event IDs
_MAX_MIMETYPE = 255  # RFC 6838: type and subtype names are at most 127 characters each
_MAX_SHOWN = 40  # characters of a hostile value quoted in a reason
_MXC = re.compile(r"mxc://[A-Za-z0-9.:\-\[\]]{1,255}/[A-Za-z0-9_-]{1,255}", re.ASCII)
_OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class MediaRef:
    """A file in the media repository that the mail carries as an attachment."""

    url: str  # mxc://server/media_id, shape-checked
    filename: str  # hostile, as given (compose makes it safe)
    content_type: str  # info.mimetype if a str, else application/octet-stream (hostile)
    size: int | None  # info.size if a non-negative int, else None


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


@dataclass(frozen=True)
class NotSent:
    """Why an event is not mailed: one short line, for logs and `passerelle inspect-event`."""

    reason: str


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
        return NotSent(f"event type {_show(event_type)} is not mailed")
    if "state_key" in event:
        return NotSent("state events are not mailed")
    event_id = _matrix_id(event.get("event_id"), "$")
    if event_id is None:
        return NotSent("the event has no valid event_id")
    sender = _matrix_id(event.get("sender"), "@")
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

    relates = content.get("m.relates_to")
    relates = relates if isinstance(relates, Mapping) else {}
    replaces: EventID | None = None
    thread_root: EventID | None = None
    reply_to: EventID | None = None
    source: Mapping[str, Any] = content
    if relates.get("rel_type") == "m.replace":
        # The service takes the thread and the reply from the original event.
        replaces = _event_id(relates.get("event_id"))
        if replaces is None:
            return NotSent("an edit without a valid event_id to replace")
        new_content = content.get("m.new_content")
        if not isinstance(new_content, Mapping):
            return NotSent("an edit without m.new_content")
        source = new_content
    else:
        in_thread = relates.get("rel_type") == "m.thread"
        if in_thread:
            thread_root = _event_id(relates.get("event_id"))
        in_reply_to = relates.get("m.in_reply_to")
        # A thread message's m.in_reply_to is only a fallback for clients without threads
        # (pointing at the thread's latest event) unless is_falling_back is false.
        falling_back = in_thread and relates.get("is_falling_back") is True
        if isinstance(in_reply_to, Mapping) and not falling_back:
            reply_to = _event_id(in_reply_to.get("event_id"))

    msgtype = source.get("msgtype")
    if msgtype == "m.notice":
        return NotSent("m.notice messages are not mailed (bot output)")
    if not isinstance(msgtype, str) or msgtype not in MAILED_MSGTYPES:
        return NotSent(f"msgtype {_show(msgtype)} is not mailed")
    body = source.get("body")
    if not isinstance(body, str):
        return NotSent("the message body is not text")
    body = body[:_MAX_TEXT]
    formatted = source.get("formatted_body")
    body_html = (
        formatted[:_MAX_TEXT]
        if source.get("format") == _HTML_FORMAT and isinstance(formatted, str)
        else None
    )

    media: MediaRef | None = None
    if msgtype in _MEDIA_MSGTYPES:
        if "file" in source:
            return NotSent("encrypted media is not mailed")
        url = source.get("url")
        if not isinstance(url, str) or not _MXC.fullmatch(url):
            return NotSent(f"{msgtype} without a valid mxc:// url")
        filename = source.get("filename")
        filename = filename[:_MAX_TEXT] if isinstance(filename, str) and filename else None
        media = MediaRef(
            url=url,
            filename=filename or body,
            content_type=_mimetype(source.get("info")),
            size=_size(source.get("info")),
        )
        if filename is None or filename == body:  # the body is the file name, no caption
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
        thread_root=thread_root,
        reply_to=reply_to,
        replaces=replaces,
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


def _matrix_id(value: object, sigil: str) -> str | None:
    """`value` if it can be a Matrix ID with `sigil`: a str of at most 255 UTF-8 bytes with
    no whitespace, control, format or unassigned characters (so it prints on one line)."""
    if (
        not isinstance(value, str)
        or not value.startswith(sigil)
        or len(value) > _MAX_ID_BYTES
        or not value.isprintable()
        or " " in value
    ):
        return None
    return value if len(value.encode("utf-8")) <= _MAX_ID_BYTES else None


def _event_id(value: object) -> EventID | None:
    event_id = _matrix_id(value, "$")
    return EventID(event_id) if event_id is not None else None


def _mimetype(info: object) -> str:
    mimetype = info.get("mimetype") if isinstance(info, Mapping) else None
    return mimetype[:_MAX_MIMETYPE] if isinstance(mimetype, str) else _OCTET_STREAM


def _size(info: object) -> int | None:
    size = info.get("size") if isinstance(info, Mapping) else None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


def _is_command(body: str, prefix: str) -> bool:
    """True when `body` starts (after blanks) with the command prefix as a word of its own,
    in any case: the words split as commands.parse_command splits them."""
    words = body.split(maxsplit=1)
    return bool(prefix) and bool(words) and words[0].casefold() == prefix.casefold()


def _show(value: object) -> str:
    """A hostile value quoted on one short line, for a reason."""
    if isinstance(value, str):
        shown = repr(value[:_MAX_SHOWN])  # repr escapes every unprintable character
        return shown + "…" if len(value) > _MAX_SHOWN else shown
    return "missing" if value is None else f"<{type(value).__name__}>"
