"""`passerelle inspect-mail`, `inspect-event` and `inspect-remote`: what the bridge would post
for a mail or a remote room's event, and mail for a Matrix event, without touching any server."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from bridge.config import Config, LinkSpec, RemoteSettings, parse_config
from bridge.core.authentication import AUTHENTICATED
from bridge.core.errors import Refused
from bridge.core.ghosts import encode_localpart, ghost_display_name
from bridge.core.links import Link, LinkSettings
from bridge.core.marking import mail_marking, may_post
from bridge.core.message import Attachment, IncomingMessage
from bridge.core.permissions import PermissionLevel
from bridge.core.remote_in import (
    NotRelayed,
    RemoteMember,
    RemoteMessage,
    RemotePolicy,
    RemoteReaction,
    RemoteRedaction,
    RemoteRoomChange,
    agency_message_content,
    file_notice_content,
    plan_remote_event,
    relayed_name,
    too_large_note,
    unrelayed_reaction_content,
)
from bridge.core.threading import NEW_THREAD
from bridge.db import links as link_db
from bridge.db.engine import DatabaseError, open_existing
from bridge.mail.authcheck import SenderAuthenticator
from bridge.mail.compose import ComposeError, compose, loop_marker
from bridge.mail.ingest import make_parser
from bridge.mail.outgoing import NotSent, outgoing_mail, placeholder_attachment, plan_event
from bridge.matrix import render
from bridge.matrix.poster import plan_events
from bridge.relay.mail_in import with_original
from bridge.relay.mail_out import marking_of
from bridge.remote import jsonsafe
from bridge.remote.client import SYNC_MAX_BYTES

OFFLINE = {"homeserver": {"address": "https://homeserver.invalid", "domain": "homeserver.invalid"}}


def offline_config() -> Config:
    return parse_config(OFFLINE, env={}, require_tokens=False)


def _settings(config: Config, link: str | None) -> LinkSettings | None:
    """The link's settings: from the config, else a link made in a room (the database)."""
    if link is None:
        return None
    address = link.lower().removeprefix("mail:")
    spec: LinkSpec | None = next((s for s in config.links if s.address == address), None)
    if spec is not None:
        return spec.settings()
    try:
        stored = asyncio.run(_stored_link(config, address))
    except DatabaseError as e:
        raise LookupError(
            f"no link for {link} in the config's links, and the database cannot be read: {e}"
        ) from None
    if stored is None:
        raise LookupError(f"no link for {link} in the config's links or the database")
    return stored.settings


async def _stored_link(config: Config, address: str) -> Link | None:
    db = await open_existing(config.database)
    try:
        return await link_db.link_by_remote(db, "mail", address)
    except SQLAlchemyError as e:
        raise DatabaseError(str(e).splitlines()[0]) from None
    finally:
        await db.close()


def _refusal(
    config: Config, message: IncomingMessage, settings: LinkSettings | None
) -> str | None:
    if message.auto_generated:
        return "automatic reply: not relayed (loop protection)"
    if settings is None:
        return None
    address = message.sender.address
    if not settings.sender_allowed(address):
        return f"sender {address} is not among the link's allowed senders"
    auth = message.auth
    required = settings.authentication_required(address)
    if auth is not None and auth.verdict != AUTHENTICATED and required:
        return (
            f"sender {address} is {auth.verdict} ({auth.reason}); this link requires "
            "its domain to be authenticated"
        )
    levels = config.mail.markings.levels
    found = mail_marking(message.marking_headers, message.marking_subjects, levels)
    marked = may_post(settings.marking, found, levels)
    if not marked.allowed:
        return f"not posted: {marked.reason}"
    return None


async def _events(message: IncomingMessage, threads: bool) -> list[dict[str, Any]]:
    uploads: list[Attachment] = []

    async def upload(attachment: Attachment) -> str:
        uploads.append(attachment)
        return f"mxc://inspect/{len(uploads)}"

    planned = await plan_events(message, NEW_THREAD, upload, None, threads=threads)
    events = [{"type": "m.room.message", "content": planned.main}]
    for content in planned.follow_ups:
        content["m.relates_to"] = render.follow_up_relation(
            "$inspect-main", NEW_THREAD, threads=threads
        )
        events.append({"type": "m.room.message", "content": content})
    return events


def inspect_mail(config: Config, raw: bytes, link: str | None) -> dict[str, Any]:
    """The JSON report of inspect-mail; never raises for any mail."""
    report: dict[str, Any] = {
        "accepted": False,
        "reason": None,
        "sender": None,
        "auth": None,
        "events": [],
    }
    settings = _settings(config, link)
    try:
        message = make_parser(config.mail)(raw)
    except Refused as e:
        report["reason"] = str(e)
        return report
    except Exception as e:  # an admin tool: say what broke instead of a traceback
        report["reason"] = f"could not be parsed: {type(e).__name__}: {str(e)[:200]}"
        return report
    sender = message.sender
    report["sender"] = {
        "address": sender.address,
        "ghost": config.ghost_mxid(encode_localpart(sender.address)),
        "display_name": ghost_display_name(sender.display_name, sender.address),
    }
    verdict = SenderAuthenticator(config.mail.trust).check(raw, sender.address)
    report["auth"] = verdict.as_json()
    message = dataclasses.replace(message, auth=verdict)
    report["reason"] = _refusal(config, message, settings)
    report["accepted"] = report["reason"] is None
    if report["accepted"]:
        threads = settings is None or settings.thread_mode == "threads"
        report["events"] = asyncio.run(_events(with_original(message, raw), threads))
    return report


def run_inspect(config: Config, path: Path, link: str | None) -> str:
    raw = path.read_bytes()
    text = json.dumps(inspect_mail(config, raw, link), ensure_ascii=False, indent=2)
    # A lone surrogate that slipped through would make printing fail: never a traceback.
    return text.encode("utf-8", "replace").decode("utf-8")


# --- inspect-event: the mail a Matrix event would become --------------------------------------

PLACEHOLDER_LIST = "list@example.invalid"
PLACEHOLDER_FROM = "passerelle@example.invalid"


def _event_link(config: Config, link: str | None) -> tuple[str, LinkSettings]:
    """The list address and settings inspect-event composes for."""
    if link is None:
        if len(config.links) != 1:
            return PLACEHOLDER_LIST, LinkSettings()
        link = config.links[0].address
    wanted = link.lower().removeprefix("mail:")
    spec = next((s for s in config.links if s.address == wanted), None)
    if spec is None:
        raise LookupError(f"no link for {link} in the config's links")
    return spec.address, spec.settings()


def inspect_event(
    config: Config,
    event: dict[str, Any],
    *,
    link: str | None,
    sender_name: str | None,
    configured: bool,
    now: dt.datetime | None = None,
) -> bytes:
    """The exact message the bridge would send for `event`, or b"not sent: <reason>\\n".

    No server is touched: no thread mapping (so no In-Reply-To / References), media as
    placeholder parts, the display name from `sender_name` (or the MXID).
    """
    list_address, settings = _event_link(config, link)
    if configured and config.mail.smtp is None:
        return b"not sent: Matrix \xe2\x86\x92 mail is off (mail.smtp.host is not set)\n"
    plan = plan_event(
        event,
        bot_mxid=config.bot_mxid,
        is_bridge_user=config.is_ghost,
        command_prefix=config.appservice.command_prefix,
    )
    if isinstance(plan, NotSent):
        return f"not sent: {plan.reason}\n".encode()
    if configured and config.permissions.level_for(plan.sender) < PermissionLevel.USER:
        return f"not sent: {plan.sender} is not permitted to use the bridge\n".encode()
    if plan.replaces is not None and not settings.send_edits:
        return b"not sent: this link does not mail edits\n"
    from_address = settings.from_address or config.mail.from_address or PLACEHOLDER_FROM
    attachments = (placeholder_attachment(plan.media),) if plan.media is not None else ()
    mail = outgoing_mail(
        plan,
        sender_name=sender_name or "",
        disambiguate=False,
        subject="",
        in_reply_to=None,
        references=(),
        attachments=attachments,
    )
    try:
        return compose(
            mail,
            from_address=from_address,
            list_address=list_address,
            domain=from_address.rpartition("@")[2],
            secret=config.message_id_secret,
            now=now or dt.datetime.now(dt.UTC),
            marker=loop_marker(from_address.rpartition("@")[2], config.message_id_secret),
            marking=marking_of(config, settings),
        )
    except ComposeError as e:
        return f"not sent: the message could not be composed safely ({e})\n".encode()


# --- inspect-remote: what the bridge would post for one event of a remote room ----------------

PLACEHOLDER_MXC = "mxc://inspect/1"


def remote_settings(config: Config, remote: str) -> RemoteSettings:
    settings = config.remotes.get(remote)
    if settings is None:
        known = ", ".join(sorted(config.remotes)) or "none (pass -c with the bridge's config)"
        raise LookupError(f"no remote {remote[:64]!r} in the config's remotes (known: {known})")
    return settings


def read_remote_event(raw: bytes) -> object | NotRelayed:
    """`raw` parsed as the remote client parses /sync (strict: no NaN, bounded nesting)."""
    if len(raw) > SYNC_MAX_BYTES:
        return NotRelayed(f"larger than the {SYNC_MAX_BYTES} bytes read of a /sync response")
    try:
        event: object = jsonsafe.loads(raw)
    except ValueError as e:
        return NotRelayed(f"not valid JSON ({str(e)[:200]})")
    return event


def inspect_remote(config: Config, remote: str, event: object) -> dict[str, Any]:
    """The JSON report of inspect-remote; never raises for any event.

    Offline, nothing is mapped: every related event counts as never relayed, as the relay
    treats an unknown one; the sender's name in the remote room is unknown, so a message's
    ghost is named as for a member without a display name (by the user ID's localpart).
    """
    settings = remote_settings(config, remote)
    report: dict[str, Any] = {"accepted": False, "reason": None, "ghost": None, "events": []}
    if isinstance(event, NotRelayed):
        report["reason"] = event.reason
        return report
    policy = RemotePolicy(
        remote=remote,
        own_user_id=settings.user_id,
        allowed_servers=frozenset(settings.allowed_servers),
    )
    try:
        plan = plan_remote_event(event, policy)
    except Exception as e:  # an admin tool: say what broke instead of a traceback
        report["reason"] = f"could not be planned: {type(e).__name__}: {str(e)[:200]}"
        return report
    if isinstance(plan, NotRelayed):
        # As the relay: only a refusal naming its sender is told to the room.
        told = plan.refused and plan.sender is not None
        told_text = " (the room is told, once a day per sender)" if told else ""
        report["reason"] = plan.reason + told_text
        return report
    if isinstance(plan, RemoteRedaction):
        report["reason"] = "a redaction of something never relayed"
        return report
    if isinstance(plan, RemoteRoomChange):
        report["reason"] = _room_change(plan)
        return report

    def ghost(user_id: str, name: str | None) -> dict[str, Any]:
        reserved = [s.display_suffix for s in config.remotes.values()]
        reserved += [s.agency_suffix for s in config.remotes.values()]
        shown = relayed_name(
            name,
            user_id,
            suffix=settings.display_suffix,
            reserved_suffixes=reserved,
            agency_names=(),
        )
        return {"user_id": config.remote_ghost_mxid(remote, user_id), "displayname": shown}

    report["accepted"] = True
    if isinstance(plan, RemoteMember):
        report["ghost"] = ghost(plan.user_id, plan.displayname)
        if plan.membership == "leave":
            report["ghost"]["displayname"] = None  # the ghost leaves; no name is set
        return report
    report["ghost"] = ghost(plan.sender, None)
    if isinstance(plan, RemoteReaction):
        content = unrelayed_reaction_content(plan.key)
    else:
        content = _message_content(config, settings, plan)
    report["events"] = [{"type": "m.room.message", "content": content}]
    return report


def _message_content(
    config: Config, settings: RemoteSettings, plan: RemoteMessage
) -> dict[str, Any]:
    too_large = (
        plan.media is not None
        and plan.media.size is not None
        and plan.media.size > settings.max_media_size
    )
    content = agency_message_content(
        plan,
        mapped=dict.fromkeys(plan.relations.event_ids()),
        ghost_of=lambda user: config.remote_ghost_mxid(settings.name, user),
        media_url=PLACEHOLDER_MXC if plan.media is not None and not too_large else None,
    )
    if too_large:
        content = file_notice_content(content, too_large_note(plan, settings.max_media_size))
    return content


def _room_change(plan: RemoteRoomChange) -> str:
    if plan.kind == "upgraded":
        target = plan.replacement or "a new room"
        return (
            f"the remote room was upgraded to {target}: the relay would tell the room "
            "(linking the new room is left to someone who may manage links)"
        )
    if plan.kind == "encrypted":
        what = "end-to-end encryption was turned on in the remote room"
    else:
        what = f"the bridge's account was {plan.reason or 'removed'} from the remote room"
    return f"{what}: the relay would tell the room and pause the link"


def run_inspect_remote(config: Config, remote: str, raw: bytes) -> str:
    report = inspect_remote(config, remote, read_remote_event(raw))
    text = json.dumps(report, ensure_ascii=False, indent=2)
    # A lone surrogate (a \ud800 escape in the event) would make printing fail.
    return text.encode("utf-8", "replace").decode("utf-8")
