"""From raw bytes to a bridged message: parse within limits, then sanitise the HTML."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from bridge.config import MailConfig
from bridge.core.html import sanitize_html
from bridge.core.message import IncomingMessage, inline_placeholder
from bridge.mail.mime import MailLimits, parse_mail


def limits_from(config: MailConfig) -> MailLimits:
    return MailLimits(
        max_size=config.max_message_size,
        max_depth=config.max_depth,
        max_parts=config.max_parts,
    )


def make_parser(config: MailConfig) -> Callable[[bytes], IncomingMessage]:
    limits = limits_from(config)

    def parse(raw: bytes) -> IncomingMessage:
        message = parse_mail(raw, limits, marking_header=config.markings.header)
        if not message.html:
            return message
        inline = {
            a.content_id: inline_placeholder(a.content_id)
            for a in message.attachments
            if a.content_id
        }
        clean = sanitize_html(message.html, image_urls=inline, max_input=limits.max_html)
        return dataclasses.replace(message, html=clean or None)

    return parse
