"""`passerelle inspect-mail` and `inspect-event`: what the bridge would post for a mail, and
mail for a Matrix event, without touching any server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

from bridge.config import Config, LinkSpec, parse_config
from bridge.core.errors import Refused
from bridge.core.ghosts import encode_localpart, ghost_display_name
from bridge.core.links import LinkSettings
from bridge.core.message import Attachment, IncomingMessage
from bridge.core.permissions import PermissionLevel
from bridge.core.threading import NEW_THREAD
from bridge.mail.compose import ComposeError, compose, loop_marker
from bridge.mail.ingest import make_parser
from bridge.mail.outgoing import NotSent, outgoing_mail, placeholder_attachment, plan_event
from bridge.matrix import render
from bridge.matrix.poster import plan_events
from bridge.relay.mail_in import with_original

OFFLINE = {"homeserver": {"address": "https://homeserver.invalid", "domain": "homeserver.invalid"}}


def offline_config() -> Config:
    return parse_config(OFFLINE, env={}, require_tokens=False)


def _settings(config: Config, link: str | None) -> LinkSettings | None:
    if link is None:
        return None
    spec: LinkSpec | None = next((s for s in config.links if s.address == link.lower()), None)
    if spec is None:
        raise LookupError(f"no link for {link} in the config's links")
    return LinkSettings(allowed_senders=spec.allowed_senders, thread_mode=spec.thread_mode)


def _verdict(
    config: Config, message: IncomingMessage, settings: LinkSettings | None
) -> str | None:
    if message.auto_generated:
        return "automatic reply: not relayed (loop protection)"
    if settings is not None and not settings.sender_allowed(message.sender.address):
        return f"sender {message.sender.address} is not among the link's allowed senders"
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
    report: dict[str, Any] = {"accepted": False, "reason": None, "sender": None, "events": []}
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
    report["reason"] = _verdict(config, message, settings)
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
        )
    except ComposeError as e:
        return f"not sent: the message could not be composed safely ({e})\n".encode()
