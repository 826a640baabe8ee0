"""Posting a bridged message into a room: ghost, uploads, text event, attachment events."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from bridge.core.authentication import AUTHENTICATED
from bridge.core.ids import EventID, RoomID, UserID
from bridge.core.message import Attachment, IncomingMessage
from bridge.core.threading import ThreadTarget
from bridge.matrix import render
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.ghosts import GhostManager

log = logging.getLogger("passerelle.matrix.poster")

Uploader = Callable[[Attachment], Awaitable[str]]


@dataclass
class PlannedEvents:
    """The events for one message, in sending order; follow-ups get their relation once the
    main event's ID is known."""

    main: dict[str, Any]
    follow_ups: list[dict[str, Any]] = field(default_factory=list)


async def plan_events(
    message: IncomingMessage,
    target: ThreadTarget,
    upload: Uploader,
    upload_limit: int | None,
    *,
    threads: bool,
) -> PlannedEvents:
    inline = render.inline_ids(message)
    image_urls: dict[str, str] = {}
    follow_ups: list[dict[str, Any]] = []
    for attachment in message.attachments:
        if upload_limit is not None and len(attachment.data) > upload_limit:
            follow_ups.append(render.too_big_content(attachment, upload_limit))
            continue
        url = await upload(attachment)
        if attachment.content_id and attachment.content_id in inline:
            image_urls[attachment.content_id] = url
        else:
            follow_ups.append(render.attachment_content(attachment, url))
    main = render.main_content(message, target, image_urls, threads=threads)
    return PlannedEvents(main=main, follow_ups=follow_ups)


class MatrixPoster:
    """Sends a message as its sender's ghost; every send has a transaction ID derived from
    `key` (link, UIDVALIDITY, UID) and the part, so a retry after a crash posts nothing twice."""

    def __init__(self, client: MatrixClient, ghosts: GhostManager) -> None:
        self.client = client
        self.ghosts = ghosts
        self._limit: int | None = None
        self._limit_known = False

    async def upload_limit(self) -> int | None:
        if not self._limit_known:
            self._limit = await self.client.upload_limit()
            self._limit_known = True
        return self._limit

    async def post(
        self,
        room_id: RoomID,
        message: IncomingMessage,
        target: ThreadTarget,
        *,
        key: str,
        threads: bool,
        ts: int | None,
    ) -> EventID:
        # Only an authenticated mail may rename an existing ghost: an unverified one (posted
        # where the link allows it) cannot put a new name on somebody's ghost.
        trusted = message.auth is None or message.auth.verdict == AUTHENTICATED
        ghost = await self.ghosts.ensure(
            message.sender.address, message.sender.display_name, room_id, rename=trusted
        )

        async def upload(attachment: Attachment) -> str:
            return await self.client.upload(
                attachment.data, attachment.content_type, attachment.filename, as_user=ghost
            )

        planned = await plan_events(
            message, target, upload, await self.upload_limit(), threads=threads
        )
        main = await self._send(room_id, planned.main, ghost, key, "main", ts)
        for n, content in enumerate(planned.follow_ups):
            content["m.relates_to"] = render.follow_up_relation(main, target, threads=threads)
            await self._send(room_id, content, ghost, key, f"part{n}", ts)
        return main

    async def _send(
        self,
        room_id: RoomID,
        content: dict[str, Any],
        ghost: UserID,
        key: str,
        part: str,
        ts: int | None,
    ) -> EventID:
        return await self.client.send_event(
            room_id,
            "m.room.message",
            content,
            derived_txn_id("mail", key, part),
            as_user=ghost,
            ts=ts,
        )

    async def notice(
        self, room_id: RoomID, text: str, *, key: str, thread_root: EventID | None = None
    ) -> None:
        content: dict[str, Any] = {"msgtype": "m.notice", "body": text, "m.mentions": {}}
        if thread_root is not None:
            content["m.relates_to"] = {
                "rel_type": "m.thread",
                "event_id": thread_root,
                "is_falling_back": True,
                "m.in_reply_to": {"event_id": thread_root},
            }
        await self.client.send_event(
            room_id, "m.room.message", content, derived_txn_id("notice", key)
        )
