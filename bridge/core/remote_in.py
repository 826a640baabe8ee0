"""Remote → agency, the decisions: which event of another ministry's room is relayed, as what
agency event, and under which name (no I/O: the relay maps IDs, copies media and sends)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.core.ghosts import clean_display_name
from bridge.core.html import sanitize_html
from bridge.core.matrix_event import (
    HTML_FORMAT,
    MAX_TEXT,
    MEDIA_MSGTYPES,
    MXC,
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
    server_of,
    show,
    strip_html_fallback,
    strip_text_fallback,
)

__all__ = [
    "NotRelayed",
    "RemoteMember",
    "RemoteMessage",
    "RemotePlan",
    "RemotePolicy",
    "RemoteReaction",
    "RemoteRedaction",
    "RemoteRoomChange",
    "agency_message_content",
    "file_name",
    "file_note",
    "file_notice_content",
    "plan_remote_event",
    "relayed_name",
    "too_large_note",
    "unrelayed_reaction_content",
]

# What clients show; anything else is shown by its body, as the spec asks of clients.
_RELAYED_MSGTYPES = frozenset({"m.text", "m.notice", "m.emote"}) | MEDIA_MSGTYPES
_MAX_KEY = 100  # characters of a reaction key
_MAX_NAME = 100
_INFO_INTS = ("size", "w", "h", "duration")


@dataclass(frozen=True)
class RemotePolicy:
    """Who may be relayed from one remote."""

    remote: str  # the remote's name in the config
    own_user_id: str  # the bridge's account there: its events are never relayed back
    allowed_servers: frozenset[str]  # exact server names

    def sender_allowed(self, user_id: str) -> bool:
        return server_of(user_id) in self.allowed_servers


@dataclass(frozen=True)
class NotRelayed:
    """Why an event is not relayed. `refused`: a policy refusal the room is told about (once
    a day per sender); otherwise a quiet skip (state the bridge does not mirror, ...)."""

    reason: str
    refused: bool = False
    sender: str | None = None


@dataclass(frozen=True)
class RemoteMessage:
    """A message (or an edit of one) to post as the sender's ghost."""

    event_id: str
    sender: str
    ts: int | None
    content: dict[str, Any]  # sanitised, without relations, mentions or media URL
    relations: Relations
    media: MediaRef | None
    mentions: tuple[str, ...]  # remote users it mentions, of allowed servers only
    event_type: str = "m.room.message"


@dataclass(frozen=True)
class RemoteReaction:
    event_id: str
    sender: str
    ts: int | None
    target: str
    key: str


@dataclass(frozen=True)
class RemoteRedaction:
    event_id: str
    sender: str
    target: str
    reason: str | None


@dataclass(frozen=True)
class RemoteMember:
    """A remote user's membership or profile in the room, mirrored by their ghost."""

    event_id: str
    sender: str
    user_id: str
    membership: str  # join | leave
    displayname: str | None
    avatar_url: str | None


@dataclass(frozen=True)
class RemoteRoomChange:
    """Something that changes what the link can do: encryption turned on, the bridge's
    account removed, the room upgraded (tombstone)."""

    event_id: str
    sender: str
    kind: str  # encrypted | removed | upgraded
    replacement: str | None = None
    reason: str = field(default="")


RemotePlan = RemoteMessage | RemoteReaction | RemoteRedaction | RemoteMember | RemoteRoomChange


def plan_remote_event(event: object, policy: RemotePolicy) -> RemotePlan | NotRelayed:
    """What `event` (one timeline event as /sync returns it, every value hostile) becomes on
    the agency side, or why nothing. Never raises for a malformed event."""
    if not isinstance(event, Mapping):
        return NotRelayed("the event is not a JSON object")
    event_id = matrix_id(event.get("event_id"), "$")
    if event_id is None:
        return NotRelayed("the event has no valid event_id")
    sender = matrix_id(event.get("sender"), "@")
    if sender is None or ":" not in sender:
        return NotRelayed("the event has no valid sender")
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return NotRelayed("the event has no type")
    content = event.get("content")
    if not isinstance(content, Mapping):
        return NotRelayed("the event content is not a JSON object")
    ts = _timestamp(event.get("origin_server_ts"))
    state_key = event.get("state_key")

    if isinstance(state_key, str):
        return _plan_state(event_id, sender, event_type, state_key, content, policy)
    if sender == policy.own_user_id:
        return NotRelayed("sent by the bridge's own account")
    if not policy.sender_allowed(sender):
        return NotRelayed(
            f"{sender} is not on a server this link relays", refused=True, sender=sender
        )
    if event_type == "m.room.encrypted":
        return NotRelayed("an encrypted message cannot be relayed", refused=True, sender=sender)
    if event_type == "m.room.redaction":
        target = event_id_of(event.get("redacts")) or event_id_of(content.get("redacts"))
        if target is None:
            return NotRelayed("a redaction without a valid target")
        reason = content.get("reason")
        return RemoteRedaction(
            event_id, sender, target, reason[:500] if isinstance(reason, str) else None
        )
    if event_type == "m.reaction":
        relates = content.get("m.relates_to")
        relates = relates if isinstance(relates, Mapping) else {}
        target = event_id_of(relates.get("event_id"))
        key = relates.get("key")
        if relates.get("rel_type") != "m.annotation" or target is None:
            return NotRelayed("a reaction without a valid annotation")
        if not isinstance(key, str) or not key or len(key) > _MAX_KEY:
            return NotRelayed("a reaction without a valid key")
        return RemoteReaction(event_id, sender, ts, target, key)
    if event_type in ("m.room.message", "m.sticker"):
        return _plan_message(event_id, sender, ts, event_type, content, policy)
    return NotRelayed(f"event type {show(event_type)} is not relayed")


def _plan_state(
    event_id: str,
    sender: str,
    event_type: str,
    state_key: str,
    content: Mapping[str, Any],
    policy: RemotePolicy,
) -> RemotePlan | NotRelayed:
    """Remote state is never mirrored as authority: only what a link needs to know."""
    if event_type == "m.room.encryption":
        return RemoteRoomChange(event_id, sender, "encrypted")
    if event_type == "m.room.tombstone":
        replacement = matrix_id(content.get("replacement_room"), "!")
        body = content.get("body")
        return RemoteRoomChange(
            event_id,
            sender,
            "upgraded",
            replacement=replacement,
            reason=clean_display_name(body, 300) if isinstance(body, str) else "",
        )
    if event_type != "m.room.member":
        return NotRelayed(f"{show(event_type)} state is not mirrored")
    user_id = matrix_id(state_key, "@")
    if user_id is None or ":" not in user_id:
        return NotRelayed("a membership without a valid user")
    membership = content.get("membership")
    if user_id == policy.own_user_id:
        if membership in ("leave", "ban"):
            why = "banned" if membership == "ban" else "removed"
            return RemoteRoomChange(event_id, sender, "removed", reason=why)
        return NotRelayed("the bridge's own membership")
    if not policy.sender_allowed(user_id):
        return NotRelayed(f"{user_id} is not on a server this link relays")
    if membership in ("leave", "ban"):
        return RemoteMember(event_id, sender, user_id, "leave", None, None)
    if membership != "join":
        return NotRelayed(f"membership {show(membership)} is not mirrored")
    name = content.get("displayname")
    avatar = content.get("avatar_url")
    return RemoteMember(
        event_id,
        sender,
        user_id,
        "join",
        name[: _MAX_NAME * 4] if isinstance(name, str) else None,
        avatar if isinstance(avatar, str) and MXC.fullmatch(avatar) else None,
    )


def _plan_message(
    event_id: str,
    sender: str,
    ts: int | None,
    event_type: str,
    content: Mapping[str, Any],
    policy: RemotePolicy,
) -> RemoteMessage | NotRelayed:
    if not content:
        return NotRelayed("a redacted or empty message")
    read = message_source(content)
    if isinstance(read, NotSent):
        return NotRelayed(read.reason)
    relations, source = read
    is_reply = relations.reply_to is not None or relations.thread_root is not None
    cleaned = _clean_content(source, event_type, is_reply=is_reply)
    if isinstance(cleaned, NotRelayed):
        # A refusal is told to the room, which needs to know whose.
        return NotRelayed(
            cleaned.reason, refused=cleaned.refused, sender=sender if cleaned.refused else None
        )
    clean, media = cleaned
    return RemoteMessage(
        event_id=event_id,
        sender=sender,
        ts=ts,
        content=clean,
        relations=relations,
        media=media,
        mentions=_mentions(source, policy),
        event_type=event_type,
    )


def _clean_content(
    source: Mapping[str, Any], event_type: str, *, is_reply: bool
) -> tuple[dict[str, Any], MediaRef | None] | NotRelayed:
    """A new content with only what is understood and safe: text bounded, HTML reduced to the
    allowlist, reply fallbacks removed, media described (its URL is set by the relay)."""
    msgtype = "m.image" if event_type == "m.sticker" else source.get("msgtype")
    body = source.get("body")
    if not isinstance(body, str):
        return NotRelayed("the message body is not text")
    if not isinstance(msgtype, str) or msgtype not in _RELAYED_MSGTYPES:
        msgtype = "m.text"  # shown by its body, as clients do with unknown types
    body = body[:MAX_TEXT]
    if is_reply:
        body = strip_text_fallback(body)
    clean: dict[str, Any] = {"msgtype": msgtype, "body": body}
    formatted = source.get("formatted_body")
    if source.get("format") == HTML_FORMAT and isinstance(formatted, str):
        source_html = formatted[:MAX_TEXT]
        if is_reply:
            source_html = strip_html_fallback(source_html)
        safe = sanitize_html(source_html, image_urls={}, max_input=MAX_TEXT)
        if safe.strip():
            clean["format"] = HTML_FORMAT
            clean["formatted_body"] = safe
    media: MediaRef | None = None
    if msgtype in MEDIA_MSGTYPES:
        found = read_media(source, msgtype, body)
        if isinstance(found, NotSent):
            return NotRelayed(found.reason, refused=found.reason == "encrypted media")
        media = found
        if has_caption(source, body):
            clean["filename"] = clean_display_name(found.filename, 255) or "file"
        info = source.get("info")
        kept: dict[str, Any] = {"mimetype": found.content_type}
        if isinstance(info, Mapping):
            for key in _INFO_INTS:
                value = info.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    kept[key] = value
        clean["info"] = kept
    return clean, media


def _mentions(source: Mapping[str, Any], policy: RemotePolicy) -> tuple[str, ...]:
    """The remote users a message mentions, of allowed servers; never @room."""
    mentions = source.get("m.mentions")
    users = mentions.get("user_ids") if isinstance(mentions, Mapping) else None
    if not isinstance(users, list):
        return ()
    found = (matrix_id(u, "@") for u in users[:50])
    return tuple(
        dict.fromkeys(u for u in found if u is not None and ":" in u and policy.sender_allowed(u))
    )


def _timestamp(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


# --- the agency event -------------------------------------------------------------------------


def agency_message_content(
    message: RemoteMessage,
    *,
    mapped: Mapping[str, str | None],
    ghost_of: Callable[[str], str],
    media_url: str | None,
) -> dict[str, Any]:
    """The agency event's content for `message`. `mapped` gives the agency event of each
    remote event the message relates to (None when it was never relayed: the message is then
    posted plainly, never dropped). `media_url` is the copy's agency mxc:// URL."""
    content = dict(message.content)
    if message.media is not None and media_url is not None:
        content["url"] = media_url
    content["m.mentions"] = (
        {"user_ids": [ghost_of(u) for u in message.mentions]} if message.mentions else {}
    )
    relations = message.relations
    if relations.replaces is not None:
        original = mapped.get(relations.replaces)
        # An edit of something never relayed: the new text, plainly.
        return content if original is None else edit_content(content, original)
    relates = mapped_relation(relations, mapped)
    if relates is not None:
        content["m.relates_to"] = relates
    return content


def unrelayed_reaction_content(key: str) -> dict[str, Any]:
    """What a reaction to a message never relayed here becomes: a notice by the reacting
    ghost, since there is nothing to annotate."""
    return {
        "msgtype": "m.notice",
        "body": f"reacted {clean_display_name(key, 100) or '?'} to a message that was not "
        "relayed here",
        "m.mentions": {},
    }


def file_name(message: RemoteMessage) -> str:
    """The name a message's file is shown and uploaded under."""
    name = message.content.get("filename") or message.content.get("body") or "file"
    return clean_display_name(str(name), 200) or "file"


def file_note(message: RemoteMessage, why: str) -> str:
    """The text posted in place of a file that stays on the remote: its name and why."""
    return f"[{file_name(message)}: {why}]"


def too_large_note(message: RemoteMessage, limit: int) -> str:
    return file_note(message, f"too large to copy here (limit {limit} bytes)")


def file_notice_content(content: Mapping[str, Any], note: str) -> dict[str, Any]:
    """The notice that replaces a message whose file stays behind, in the same thread or
    reply as `content` (the agency content the message would have had)."""
    return {
        "msgtype": "m.notice",
        "body": note,
        "m.mentions": {},
        **({"m.relates_to": content["m.relates_to"]} if "m.relates_to" in content else {}),
    }


def relayed_name(
    name: str | None,
    user_id: str,
    *,
    suffix: str,
    reserved_suffixes: Collection[str],
    agency_names: Collection[str],
) -> str:
    """How a remote user is shown on the agency side: their cleaned name, then `suffix`.

    The name can pass for nobody else: invisible and bidi characters go (clean_display_name),
    a copy of any remote's suffix (or the agency's) inside it is removed, and a name that an
    agency member of the room also has (compared without case or compatibility forms), or
    one that looks like a user ID, gets the user ID added.
    """
    reserved = {suffix, *reserved_suffixes}
    clean = _without(clean_display_name(name or "", _MAX_NAME), reserved)
    if not clean:
        # A hostile server picks the localpart too: it is held to the same rule.
        localpart = user_id.partition(":")[0].lstrip("@")
        clean = _without(clean_display_name(localpart, _MAX_NAME), reserved) or "?"
    folded = {_fold(n) for n in agency_names if n}
    if (
        _fold(clean) in folded
        or _fold(f"{clean} {suffix}") in folded  # an agency member named "Alice (Remote)"
        or "@" in unicodedata.normalize("NFKC", clean)
    ):
        clean = f"{clean} ({clean_display_name(user_id, 255)})"
    return f"{clean} {suffix}".strip()


def _without(text: str, reserved: Collection[str]) -> str:
    """`text` (cleaned) without any copy of the `reserved` suffixes, however deeply nested:
    removing one copy can join the halves of another, so rounds go on while one removes."""
    while True:
        before = text
        for needle in reserved:
            text = _remove_folded(text, needle)
        text = clean_display_name(text, _MAX_NAME)
        if len(text) >= len(before):  # nothing removed (every removal shortens the text)
            return text


def _fold(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _caseless(char: str) -> str:
    """One character without case or compatibility form, fully decomposed: a letter then a
    combining mark (fullwidth "Ｅ" then U+0301, which NFC leaves alone) matches "é"."""
    return unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", char).casefold())


def _remove_folded(text: str, needle: str) -> str:
    """`text` without any occurrence of `needle`, compared folded (no case or compatibility
    form, decomposed)."""
    target = "".join(map(_caseless, needle)).strip()
    if not target:
        return text
    while True:
        folded: list[str] = []
        origin: list[int] = []  # the index in `text` of each folded character
        for index, char in enumerate(text):
            for out in _caseless(char):
                folded.append(out)
                origin.append(index)
        found = "".join(folded).find(target)
        if found < 0:
            return text
        start, end = origin[found], origin[found + len(target) - 1] + 1
        text = text[:start] + text[end:]
