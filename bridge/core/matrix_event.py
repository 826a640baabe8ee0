"""Reading a Matrix message event that arrived from anywhere (every value hostile): IDs,
relations (reply, thread, edit), media and the reply fallback. Shared by every direction that
starts from a Matrix event: agency → mail, agency → remote and remote → agency."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.core.ids import EventID

__all__ = [
    "HTML_FORMAT",
    "MAX_TEXT",
    "MEDIA_MSGTYPES",
    "MXC",
    "MediaRef",
    "NotSent",
    "Relations",
    "event_id_of",
    "matrix_id",
    "read_media",
    "read_relations",
    "show",
    "strip_html_fallback",
    "strip_text_fallback",
]

HTML_FORMAT = "org.matrix.custom.html"
MAX_TEXT = 65536  # characters; a whole event is at most 64 KiB
MEDIA_MSGTYPES = frozenset({"m.file", "m.image", "m.audio", "m.video"})
MXC = re.compile(r"mxc://[A-Za-z0-9.:\-\[\]]{1,255}/[A-Za-z0-9_-]{1,255}", re.ASCII)
_MAX_ID_BYTES = 255  # the Matrix spec's limit for user, room and event IDs
_MAX_MIMETYPE = 255  # RFC 6838: type and subtype names are at most 127 characters each
_MAX_SHOWN = 40  # characters of a hostile value quoted in a reason
_OCTET_STREAM = "application/octet-stream"
_TEXT_FALLBACK_START = re.compile(r"> (?:\* )?<")
_MX_REPLY_TAG = re.compile(r"<(/?)mx-reply(?=[\t\n\f\r />])", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True)
class NotSent:
    """Why an event is not passed on: one short line, for logs and the inspect commands."""

    reason: str


@dataclass(frozen=True)
class MediaRef:
    """A file in a media repository that a message carries."""

    url: str  # mxc://server/media_id, shape-checked
    filename: str  # hostile, as given
    content_type: str  # info.mimetype if a str, else application/octet-stream (hostile)
    size: int | None  # info.size if a non-negative int, else None


@dataclass(frozen=True)
class Relations:
    """Where a message sits: the thread it is in, the event it answers, the event it edits."""

    thread_root: EventID | None = None
    reply_to: EventID | None = None  # not a thread's falling-back reply
    replaces: EventID | None = None

    def event_ids(self) -> tuple[EventID, ...]:
        found = (self.thread_root, self.reply_to, self.replaces)
        return tuple(dict.fromkeys(e for e in found if e is not None))


def matrix_id(value: object, sigil: str) -> str | None:
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


def event_id_of(value: object) -> EventID | None:
    found = matrix_id(value, "$")
    return EventID(found) if found is not None else None


def server_of(user_id: str) -> str:
    """The server name of a user ID: everything after the first colon."""
    return user_id.partition(":")[2]


def read_relations(content: Mapping[str, Any]) -> Relations | NotSent:
    """The relations of a message's content. An edit takes its thread and reply from the
    original event, so only `replaces` is set for one."""
    relates = content.get("m.relates_to")
    relates = relates if isinstance(relates, Mapping) else {}
    if relates.get("rel_type") == "m.replace":
        replaces = event_id_of(relates.get("event_id"))
        if replaces is None:
            return NotSent("an edit without a valid event_id to replace")
        return Relations(replaces=replaces)
    thread_root: EventID | None = None
    reply_to: EventID | None = None
    in_thread = relates.get("rel_type") == "m.thread"
    if in_thread:
        thread_root = event_id_of(relates.get("event_id"))
    in_reply_to = relates.get("m.in_reply_to")
    # A thread message's m.in_reply_to is only a fallback for clients without threads
    # (pointing at the thread's latest event) unless is_falling_back is false.
    falling_back = in_thread and relates.get("is_falling_back") is True
    if isinstance(in_reply_to, Mapping) and not falling_back:
        reply_to = event_id_of(in_reply_to.get("event_id"))
    return Relations(thread_root=thread_root, reply_to=reply_to)


def read_media(source: Mapping[str, Any], msgtype: str, body: str) -> MediaRef | NotSent:
    """The file of an m.file/m.image/m.audio/m.video content (`body` is its text)."""
    if "file" in source:
        return NotSent("encrypted media")
    url = source.get("url")
    if not isinstance(url, str) or not MXC.fullmatch(url):
        return NotSent(f"{msgtype} without a valid mxc:// url")
    filename = source.get("filename")
    filename = filename[:MAX_TEXT] if isinstance(filename, str) and filename else None
    return MediaRef(
        url=url,
        filename=filename or body,
        content_type=mimetype_of(source.get("info")),
        size=size_of(source.get("info")),
    )


def has_caption(source: Mapping[str, Any], body: str) -> bool:
    """Whether a media message's body is a caption (spec: a filename that differs from it)."""
    filename = source.get("filename")
    return isinstance(filename, str) and bool(filename) and filename != body


def mimetype_of(info: object) -> str:
    mimetype = info.get("mimetype") if isinstance(info, Mapping) else None
    return mimetype[:_MAX_MIMETYPE] if isinstance(mimetype, str) else _OCTET_STREAM


def size_of(info: object) -> int | None:
    size = info.get("size") if isinstance(info, Mapping) else None
    if isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        return size
    return None


def show(value: object) -> str:
    """A hostile value quoted on one short line, for a reason."""
    if isinstance(value, str):
        shown = repr(value[:_MAX_SHOWN])  # repr escapes every unprintable character
        return shown + "…" if len(value) > _MAX_SHOWN else shown
    return "missing" if value is None else f"<{type(value).__name__}>"


def strip_text_fallback(text: str) -> str:
    """A Matrix reply fallback removed: leading "> " lines (the first one quoting the original
    sender as "> <@user:server>" or "> * <@user:server>") followed by a blank line."""
    if not _TEXT_FALLBACK_START.match(text):
        return text
    lines = text.split("\n")
    index = 0
    while index < len(lines) and (lines[index].startswith("> ") or lines[index] == ">"):
        index += 1
    if index < len(lines) and not lines[index].strip():
        return "\n".join(lines[index + 1 :]).lstrip("\n")
    return text


def strip_html_fallback(html: str) -> str:
    """Every <mx-reply> element removed with its content, nested ones included. An element
    left open runs to the end of the input, as in an HTML parser. Linear time."""
    out: list[str] = []
    depth = 0
    pos = 0
    for match in _MX_REPLY_TAG.finditer(html):
        if match.start() < pos:
            continue  # inside a tag already consumed
        if depth == 0:
            out.append(html[pos : match.start()])
        end = html.find(">", match.end())
        if end < 0:  # an unterminated tag: an HTML tokenizer drops the rest
            return "".join(out)
        if match.group(1):
            depth = max(depth - 1, 0)
        else:
            depth += 1
        pos = end + 1
    if depth == 0:
        out.append(html[pos:])
    return "".join(out)


def mapped_relation(
    relations: Relations, mapped: Mapping[str, str | None]
) -> dict[str, Any] | None:
    """The m.relates_to for the other side's copy of a message (not an edit), its IDs taken
    from `mapped` (the other side's event for each event ID; None: never passed on). A
    relation to something never passed on is left out: the message goes plainly."""
    root = mapped.get(relations.thread_root) if relations.thread_root else None
    reply = mapped.get(relations.reply_to) if relations.reply_to else None
    if root is not None:
        return {
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": reply is None,
            "m.in_reply_to": {"event_id": reply or root},
        }
    if reply is not None:
        return {"m.in_reply_to": {"event_id": reply}}
    return None


def edit_content(new_content: dict[str, Any], original: str) -> dict[str, Any]:
    """An edit of `original` to `new_content`, with the "* " fallback for older clients."""
    edit = {k: v for k, v in new_content.items() if k not in ("m.mentions", "url", "filename")}
    edit["body"] = "* " + str(new_content.get("body", ""))
    if "formatted_body" in new_content:
        edit["formatted_body"] = "* " + str(new_content["formatted_body"])
    edit["m.new_content"] = new_content
    if "m.mentions" in new_content:
        # Those mentioned were pinged by the original: an edit pings nobody again.
        edit["m.mentions"] = {}
    edit["m.relates_to"] = {"rel_type": "m.replace", "event_id": original}
    return edit


_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def image_type(data: bytes) -> str:
    """The type of an avatar image from its first bytes (media repositories thumbnail by it)."""
    for magic, content_type in _IMAGE_MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def message_source(content: Mapping[str, Any]) -> tuple[Relations, Mapping[str, Any]] | NotSent:
    """A message's relations, and the content its text is read from: m.new_content for an
    edit (which takes its thread and reply from the original), the content itself otherwise."""
    relations = read_relations(content)
    if isinstance(relations, NotSent):
        return relations
    if relations.replaces is None:
        return relations, content
    new_content = content.get("m.new_content")
    if not isinstance(new_content, Mapping):
        return NotSent("an edit without m.new_content")
    return relations, new_content
