"""`passerelle inspect-mail`: what the bridge would post for a mail, without any server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bridge.config import Config, LinkSpec, parse_config
from bridge.core.errors import Refused
from bridge.core.ghosts import encode_localpart, ghost_display_name
from bridge.core.links import LinkSettings
from bridge.core.mailrelay import with_original
from bridge.core.message import Attachment, IncomingMessage
from bridge.core.threading import NEW_THREAD
from bridge.mail.ingest import make_parser
from bridge.matrix import render
from bridge.matrix.poster import plan_events

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
