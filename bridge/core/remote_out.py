"""Agency → remote, the decisions: which agency event goes to a linked remote room, and the
event the bridge's remote account sends for it (no I/O: the relay maps IDs, copies media,
sends and records)."""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.html import sanitize_html
from bridge.core.matrix_event import (
    HTML_FORMAT,
    MAX_TEXT,
    MEDIA_MSGTYPES,
    MediaRef,
    NotSent,
    Relations,
    edit_content,
    event_id_of,
    has_caption,
    mapped_relation,
    matrix_id,
    message_source,
    read_media,
    show,
    strip_html_fallback,
    strip_text_fallback,
)

__all__ = ["OutgoingPlan", "plan_agency_event", "remote_event"]

PROFILE_KEY = "com.beeper.per_message_profile"
_SENT_MSGTYPES = frozenset({"m.text", "m.notice", "m.emote"}) | MEDIA_MSGTYPES
_MAX_KEY = 100
_MAX_PROFILE_NAME = 255  # bytes, MSC4144


@dataclass(frozen=True)
class OutgoingPlan:
    """An agency event to pass on, read out of its event and bounded; stored in the outbox
    as JSON until it is sent, so every field is plain data."""

    kind: str  # message | reaction | redaction
    event_id: str
    sender: str
    content: dict[str, Any] = field(default_factory=dict)  # message: cleaned, no relations
    thread_root: str | None = None
    reply_to: str | None = None
    replaces: str | None = None
    target: str | None = None  # reaction, redaction: the event it is about
    key: str | None = None  # reaction
    media: dict[str, Any] | None = None  # url, filename, content_type, size (agency mxc)
    event_type: str = "m.room.message"

    @property
    def relations(self) -> Relations:
        return Relations(
            thread_root=event_id_of(self.thread_root),
            reply_to=event_id_of(self.reply_to),
            replaces=event_id_of(self.replaces),
        )

    def related(self) -> tuple[str, ...]:
        """Every agency event whose remote copy this plan needs to know."""
        found = (self.thread_root, self.reply_to, self.replaces, self.target)
        return tuple(dict.fromkeys(e for e in found if e is not None))

    def as_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> OutgoingPlan:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def media_ref(self) -> MediaRef | None:
        if self.media is None:
            return None
        return MediaRef(
            url=str(self.media["url"]),
            filename=str(self.media.get("filename", "file")),
            content_type=str(self.media.get("content_type", "application/octet-stream")),
            size=self.media.get("size"),
        )


def plan_agency_event(
    event: Mapping[str, Any],
    *,
    bot_mxid: str,
    is_bridge_user: Callable[[str], bool],
    command_prefix: str,
) -> OutgoingPlan | NotSent:
    """What `event` (as the agency homeserver pushed it) becomes in a linked remote room, or
    why nothing. Never raises for a malformed event."""
    untrusted: object = event
    if not isinstance(untrusted, Mapping):
        return NotSent("the event is not a JSON object")
    if "state_key" in event:
        return NotSent("state is not passed on")
    event_id = matrix_id(event.get("event_id"), "$")
    sender = matrix_id(event.get("sender"), "@")
    if event_id is None or sender is None:
        return NotSent("the event has no valid event_id or sender")
    if sender == bot_mxid or is_bridge_user(sender):
        return NotSent("sent by the bridge itself")
    event_type = event.get("type")
    content = event.get("content")
    if not isinstance(content, Mapping):
        return NotSent("the event content is not a JSON object")
    if event_type == "m.room.redaction":
        target = event_id_of(event.get("redacts")) or event_id_of(content.get("redacts"))
        if target is None:
            return NotSent("a redaction without a valid target")
        return OutgoingPlan("redaction", event_id, sender, target=target)
    if event_type == "m.reaction":
        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, Mapping) else {}
        target = event_id_of(relates.get("event_id"))
        key = relates.get("key")
        if relates.get("rel_type") != "m.annotation" or target is None:
            return NotSent("a reaction without a valid annotation")
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
            return NotSent("a reaction without a valid key")
        return OutgoingPlan("reaction", event_id, sender, target=target, key=key)
    if event_type not in ("m.room.message", "m.sticker"):
        return NotSent(f"event type {show(event_type)} is not passed on")
    if not content:
        return NotSent("a redacted or empty message")
    read = message_source(content)
    if isinstance(read, NotSent):
        return read
    relations, source = read
    msgtype = "m.image" if event_type == "m.sticker" else source.get("msgtype")
    if not isinstance(msgtype, str) or msgtype not in _SENT_MSGTYPES:
        return NotSent(f"msgtype {show(msgtype)} is not passed on")
    body = source.get("body")
    if not isinstance(body, str):
        return NotSent("the message body is not text")
    if msgtype == "m.text" and _is_command(body, command_prefix):
        return NotSent("a command to the bridge")
    is_reply = relations.reply_to is not None or relations.thread_root is not None
    body = body[:MAX_TEXT]
    if is_reply:
        body = strip_text_fallback(body)
    clean: dict[str, Any] = {"msgtype": msgtype, "body": body}
    formatted = source.get("formatted_body")
    if source.get("format") == HTML_FORMAT and isinstance(formatted, str):
        text = strip_html_fallback(formatted[:MAX_TEXT]) if is_reply else formatted[:MAX_TEXT]
        safe = sanitize_html(text, image_urls={}, max_input=MAX_TEXT)
        if safe.strip():
            clean["format"] = HTML_FORMAT
            clean["formatted_body"] = safe
    media: dict[str, Any] | None = None
    if msgtype in MEDIA_MSGTYPES:
        found = read_media(source, msgtype, body)
        if isinstance(found, NotSent):
            return NotSent(f"{found.reason} is not passed on")
        media = {
            "url": found.url,
            "filename": clean_display_name(found.filename, 255) or "file",
            "content_type": found.content_type,
            "size": found.size,
        }
        clean["filename"] = media["filename"]
        if not has_caption(source, body):
            clean.pop("format", None)
            clean.pop("formatted_body", None)
        info: dict[str, Any] = {"mimetype": found.content_type}
        raw_info = source.get("info")
        if isinstance(raw_info, Mapping):
            for name in ("size", "w", "h", "duration"):
                value = raw_info.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    info[name] = value
        clean["info"] = info
    return OutgoingPlan(
        "message",
        event_id,
        sender,
        content=clean,
        thread_root=relations.thread_root,
        reply_to=relations.reply_to,
        replaces=relations.replaces,
        media=media,
    )


def sender_label(name: str | None, sender: str, suffix: str) -> str:
    """ "Alice Martin (Agence)": the room name (the user ID when it has none), then the suffix."""
    clean = clean_display_name(name or "", 100) or clean_display_name(sender, 255)
    label = f"{clean} {suffix}".strip()
    while len(label.encode("utf-8")) > _MAX_PROFILE_NAME:
        label = label[:-1]
    return label


def with_sender(content: dict[str, Any], label: str, profile: dict[str, Any]) -> dict[str, Any]:
    """The message as the remote room shows it: a per-message profile (MSC4144) for clients
    that know it, and "Name : text" in body and formatted_body for every other client."""
    out = dict(content)
    out["body"] = f"{label} : {content.get('body', '')}"
    rich = content.get("formatted_body")
    if not isinstance(rich, str):
        rich = html.escape(str(content.get("body", ""))).replace("\n", "<br>")
    out["format"] = HTML_FORMAT
    out["formatted_body"] = (
        f"<strong data-mx-profile-fallback>{html.escape(label)} : </strong>{rich}"
    )
    out[PROFILE_KEY] = profile | {"has_fallback": True}
    return out


def remote_event(
    plan: OutgoingPlan,
    *,
    label: str,
    mapped: Mapping[str, str | None],
    media_url: str | None,
    avatar_url: str | None = None,
) -> tuple[str, dict[str, Any]] | NotSent:
    """(event type, content) the remote account sends for a message or a reaction; `mapped`
    gives the remote event of each agency event the plan relates to (None: never passed on,
    and the message then goes plainly)."""
    profile: dict[str, Any] = {"id": plan.sender, "displayname": label}
    if avatar_url is not None:
        profile["avatar_url"] = avatar_url
    if plan.kind == "reaction":
        target = mapped.get(plan.target) if plan.target else None
        if target is None:
            # A reaction to something never passed on: said in words instead.
            text = {"msgtype": "m.notice", "body": f"reacted {plan.key} to a message"}
            return "m.room.message", with_sender(text, label, profile) | {"m.mentions": {}}
        return "m.reaction", {
            "m.relates_to": {"rel_type": "m.annotation", "event_id": target, "key": plan.key}
        }
    if plan.kind != "message":
        return NotSent(f"{plan.kind} is not a message")
    content = dict(plan.content)
    if plan.media is not None:
        if media_url is None:
            return NotSent("the file could not be copied")
        content["url"] = media_url
    content = with_sender(content, label, profile) | {"m.mentions": {}}
    relations = plan.relations
    if relations.replaces is not None:
        original = mapped.get(relations.replaces)
        if original is not None:
            return "m.room.message", edit_content(content, original)
        return "m.room.message", content
    relates = mapped_relation(relations, mapped)
    if relates is not None:
        content["m.relates_to"] = relates
    return "m.room.message", content


def _is_command(body: str, prefix: str) -> bool:
    words = body.split(maxsplit=1)
    return bool(prefix) and bool(words) and words[0].casefold() == prefix.casefold()
