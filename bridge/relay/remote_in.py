"""Remote → room: each stored event of a linked remote room checked, mapped and posted once by
its sender's ghost, in order per room."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bridge.config import Config, RemoteSettings
from bridge.core.audit import AuditEntry, content_digest
from bridge.core.errors import Ignored, PermanentError, Refused
from bridge.core.ids import EventID, UserID
from bridge.core.links import REMOTE_KIND, Link, split_remote_key
from bridge.core.matrix_event import MXC
from bridge.core.remote_in import (
    NotRelayed,
    RemoteMember,
    RemoteMessage,
    RemotePolicy,
    RemoteReaction,
    RemoteRedaction,
    RemoteRoomChange,
    agency_message_content,
    file_name,
    file_note,
    file_notice_content,
    plan_remote_event,
    relayed_name,
    too_large_note,
    unrelayed_reaction_content,
)
from bridge.core.retry import settle_stored
from bridge.core.router import RoomQueues
from bridge.core.tasks import TaskGroup, wait_for
from bridge.db import kv
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import remote as remote_db
from bridge.db.engine import Database
from bridge.db.remote import Mapped, RemoteInboxItem
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.ghosts import GhostManager
from bridge.matrix.members import RoomMembers
from bridge.matrix.render import notice_content
from bridge.remote.client import RemoteClient

log = logging.getLogger("passerelle.remote.relay")

BATCH = 200
AVATAR_MAX_BYTES = 1 << 20
SWEEP_INTERVAL = 10.0


@dataclass
class RemoteSide:
    """One configured remote as the relays use it."""

    settings: RemoteSettings
    client: RemoteClient
    policy: RemotePolicy


def _now_ms() -> int:
    return int(time.time() * 1000)


class RemoteRelay:
    """Drains the remote inbox into agency rooms. Policy refusals are final and told to the
    room once a day per sender; an outage of either homeserver is waited out; anything else
    is retried `max_attempts` times, then the event is set aside and the room told."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        ghosts: GhostManager,
        members: RoomMembers,
        sides: Mapping[str, RemoteSide],
        tasks: TaskGroup,
        *,
        max_attempts: int,
        on_link_paused: Callable[[], None],
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.ghosts = ghosts
        self.members = members
        self.sides = sides
        self.max_attempts = max_attempts
        self.on_link_paused = on_link_paused
        self._wake = asyncio.Event()
        self._in_flight: set[int] = set()
        # Posted events whose mapping is being committed while the room's next event is sent:
        # item id → the commit, and (link, remote event) → the mapping meanwhile.
        self._recording: dict[int, asyncio.Task[None]] = {}
        self._recent: dict[tuple[int, str], Mapped] = {}
        # Told the seconds from /sync to post of every event posted (the metrics' latency).
        self.on_posted: Callable[[float], None] | None = None
        self.tasks = tasks
        self._queues: RoomQueues[tuple[Link, RemoteInboxItem]] = RoomQueues(
            self._process, tasks, "remote"
        )
        # (remote room, remote user) → their display name and avatar there.
        self._profiles: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        self._avatars: dict[UserID, str] = {}
        self._links: dict[str, Link] | None = None
        self._seen = 0  # the highest inbox id submitted
        self._sweep = True
        self.retry_initial = 1.0

    def notify(self) -> None:
        self._wake.set()

    async def wait_idle(self) -> None:
        await self._queues.wait_idle()
        if self._recording:
            await asyncio.gather(*self._recording.values(), return_exceptions=True)

    def links_changed(self) -> None:
        """Links were added, removed, paused or resumed: read them again, and every pending
        event (a resumed link's kept events too)."""
        self._links = None
        self._sweep = True
        self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            sweep, self._sweep = self._sweep, False
            try:
                # Woken by new events: only those stored since the last look. On a sweep
                # (links changed, or every SWEEP_INTERVAL): every pending event not in flight.
                after = 0 if sweep else self._seen
                found = await remote_db.pending_events(
                    self.db, BATCH, self._in_flight | set(self._recording), after=after
                )
                if self._links is None:
                    self._links = {
                        link.remote: link
                        for link in await link_db.all_links(self.db)
                        if link.kind == REMOTE_KIND
                    }
                links = self._links
            except Exception as e:
                log.error("cannot read the remote inbox (%s); retrying", e)
                await asyncio.sleep(5)
                continue
            for item in found:
                self._seen = max(self._seen, item.id)
                link = links.get(f"{item.remote}/{item.room_id}")
                if link is None:
                    await remote_db.finish(self.db, item.id, "ignored", error="not linked")
                    continue
                if link.paused or item.remote not in self.sides:
                    continue  # kept until the link resumes
                self._in_flight.add(item.id)
                self._queues.submit(link.room_id, (link, item))
            if len(found) < BATCH:
                try:
                    await wait_for(self._wake.wait(), SWEEP_INTERVAL)
                except TimeoutError:
                    self._sweep = True
            else:
                self._sweep = True

    async def _process(self, entry: tuple[Link, RemoteInboxItem]) -> None:
        link, item = entry
        label = f"remote event {item.event_id} of {item.remote}"

        async def handle() -> None:
            await self.handle(link, item)

        async def finish(state: str, reason: str) -> None:
            audit = _audit(link, item, state, reason)
            await remote_db.finish(self.db, item.id, state, error=reason, audit=audit)

        async def count_failure(reason: str) -> int:
            return await remote_db.count_failure(self.db, item.id, reason)

        async def give_up(reason: str) -> None:
            await self._notice(
                link,
                f"A message from {item.remote} could not be relayed here after "
                f"{self.max_attempts} attempts and was set aside (#{item.id}).",
                key=f"remote-failed:{item.id}",
            )
            audit = _audit(link, item, "failed", reason)
            await remote_db.finish(self.db, item.id, "failed", error=reason, audit=audit)

        try:
            await settle_stored(
                handle,
                finish,
                refused_state="refused",
                label=label,
                count_failure=count_failure,
                give_up=give_up,
                max_attempts=self.max_attempts,
                log=log,
                initial=self.retry_initial,
            )
        finally:
            self._in_flight.discard(item.id)

    async def handle(self, link: Link, item: RemoteInboxItem) -> None:
        """Relay one stored event; raises Refused or Ignored for final non-posting outcomes."""
        side = self.sides[item.remote]
        try:
            event: Any = json.loads(item.event_json)
        except (ValueError, RecursionError):
            raise Refused("the stored event is not readable JSON") from None
        plan = plan_remote_event(event, side.policy)
        if isinstance(plan, NotRelayed):
            if plan.refused and plan.sender is not None:
                await self._refused(link, side, plan.sender, plan.reason)
                raise Refused(plan.reason)
            raise Ignored(plan.reason)
        if isinstance(plan, RemoteMember):
            await self._member(link, side, item, plan)
        elif isinstance(plan, RemoteRoomChange):
            await self._room_change(link, side, plan)
        elif isinstance(plan, RemoteRedaction):
            await self._redaction(link, item, plan)
        elif isinstance(plan, RemoteReaction):
            await self._reaction(link, side, item, plan)
        else:
            await self._message(link, side, item, plan)

    # --- messages -----------------------------------------------------------------------------

    async def _message(
        self, link: Link, side: RemoteSide, item: RemoteInboxItem, plan: RemoteMessage
    ) -> None:
        ghost = await self._ghost(link, side, item.room_id, plan.sender)
        mapped = await self._mapped(link, plan.relations.event_ids())
        content_media: str | None = None
        note: str | None = None
        if plan.media is not None:
            content_media, note = await self._copy_media(side, plan.media.url, plan, ghost)
        content = agency_message_content(
            plan,
            mapped=mapped,
            ghost_of=lambda user: self.config.remote_ghost_mxid(side.settings.name, user),
            media_url=content_media,
        )
        if note is not None:
            # The file stays behind: its name and why, in place of the file.
            content = file_notice_content(content, note)
        event_type = "m.room.message"
        event_id = await self.client.send_event(
            link.room_id,
            event_type,
            content,
            derived_txn_id("remote-in", side.settings.name, plan.event_id),
            as_user=ghost,
            ts=_bounded(plan.ts),
        )
        await self._record(link, item, event_id, plan.sender)

    async def _copy_media(
        self, side: RemoteSide, url: str, plan: RemoteMessage, ghost: UserID
    ) -> tuple[str | None, str | None]:
        """The agency copy of a remote file, or why there is none."""
        assert plan.media is not None
        limit = side.settings.max_media_size
        too_large = too_large_note(plan, limit)
        if plan.media.size is not None and plan.media.size > limit:
            return None, too_large
        try:
            found = await side.client.download(url, limit)
        except PermanentError as e:
            log.warning("file of %s not downloadable: %s", plan.event_id, e)
            return None, file_note(plan, "the file could not be fetched from the remote")
        if found is None:
            return None, too_large
        data, content_type = found
        mxc = await self.client.upload(
            data, plan.media.content_type or content_type, file_name(plan), as_user=ghost
        )
        return mxc, None

    async def _reaction(
        self, link: Link, side: RemoteSide, item: RemoteInboxItem, plan: RemoteReaction
    ) -> None:
        ghost = await self._ghost(link, side, item.room_id, plan.sender)
        target = await self._lookup(link, plan.target)
        txn = derived_txn_id("remote-in", side.settings.name, plan.event_id)
        if target is None:
            content = unrelayed_reaction_content(plan.key)
            event_id = await self.client.send_event(
                link.room_id, "m.room.message", content, txn, as_user=ghost, ts=_bounded(plan.ts)
            )
        else:
            relates = {
                "rel_type": "m.annotation",
                "event_id": target.agency_event_id,
                "key": plan.key,
            }
            event_id = await self.client.send_event(
                link.room_id,
                "m.reaction",
                {"m.relates_to": relates},
                txn,
                as_user=ghost,
                ts=_bounded(plan.ts),
            )
        await self._record(link, item, event_id, plan.sender)

    async def _redaction(self, link: Link, item: RemoteInboxItem, plan: RemoteRedaction) -> None:
        target = await self._lookup(link, plan.target)
        if target is None:
            raise Ignored("a redaction of something never relayed")
        if target.direction != "in" or target.remote_sender != plan.sender:
            # Remote power levels are not authority here: only an author's own deletion.
            raise Refused("only its author's deletion of a message is mirrored")
        ghost = self.config.remote_ghost_mxid(item.remote, plan.sender)
        event_id = await self.client.redact(
            link.room_id,
            target.agency_event_id,
            derived_txn_id("remote-in", item.remote, plan.event_id),
            reason=plan.reason,
            as_user=ghost,
        )
        await self._record(link, item, event_id, plan.sender)

    # --- membership and the room itself -------------------------------------------------------

    async def _member(
        self, link: Link, side: RemoteSide, item: RemoteInboxItem, plan: RemoteMember
    ) -> None:
        self._profiles[(item.room_id, plan.user_id)] = (plan.displayname, plan.avatar_url)
        ghost = self.config.remote_ghost_mxid(side.settings.name, plan.user_id)
        if plan.membership == "leave":
            await self.ghosts.leave(ghost, link.room_id)
            await remote_db.finish(self.db, item.id, "done")
            return
        await self._ghost(link, side, item.room_id, plan.user_id)
        await remote_db.finish(self.db, item.id, "done")

    async def _room_change(self, link: Link, side: RemoteSide, plan: RemoteRoomChange) -> None:
        _name, remote_room = split_remote_key(link.remote)
        where = f"{remote_room} on {side.settings.name}"
        if plan.kind == "upgraded":
            target = plan.replacement or "a new room"
            await self._notice(
                link,
                f"The linked room {where} was upgraded to {target}. Messages there are not "
                f"relayed yet: someone who may manage links here can write "
                f"“{self.config.appservice.command_prefix} link-remote {side.settings.name} "
                f"{target}” (the bridge's account must be invited there).",
                key=f"tombstone:{link.id}:{plan.event_id}",
            )
            raise Ignored("room upgraded; told the room")
        if plan.kind == "encrypted":
            text = (
                f"End-to-end encryption was turned on in the linked room {where}. Passerelle "
                "cannot read encrypted messages, so the link is paused: nothing is relayed in "
                "either direction."
            )
        else:
            text = (
                f"The bridge's account was {plan.reason or 'removed'} from the linked room "
                f"{where}, so the link is paused: nothing is relayed in either direction "
                "until it is invited back and the room linked again."
            )
        await self._notice(link, text, key=f"room-change:{link.id}:{plan.event_id}")
        await link_db.set_paused(self.db, link.id, True)
        self._links = None
        log.warning("link %s paused: %s", link.remote, plan.kind)
        self.on_link_paused()
        raise Ignored(f"link paused: {plan.kind}")

    # --- helpers ------------------------------------------------------------------------------

    async def _ghost(self, link: Link, side: RemoteSide, remote_room: str, user: str) -> UserID:
        """The remote user's ghost, named as the remote room names them, in the agency room."""
        key = (remote_room, user)
        if key not in self._profiles:
            try:
                state = await side.client.get_state(remote_room, "m.room.member", user)
            except PermanentError:
                state = None
            name = state.get("displayname") if state else None
            avatar = state.get("avatar_url") if state else None
            self._profiles[key] = (
                name if isinstance(name, str) else None,
                avatar if isinstance(avatar, str) and MXC.fullmatch(avatar) else None,
            )
        name, avatar = self._profiles[key]
        members = await self.members.members(link.room_id)
        agency_names = [
            n
            for u, n in members.items()
            if n and not self.config.is_ghost(u) and u != self.config.bot_mxid
        ]
        reserved = [s.settings.display_suffix for s in self.sides.values()]
        reserved += [s.settings.agency_suffix for s in self.sides.values()]
        shown = relayed_name(
            name,
            user,
            suffix=side.settings.display_suffix,
            reserved_suffixes=reserved,
            agency_names=agency_names,
        )
        mxid = self.config.remote_ghost_mxid(side.settings.name, user)
        ghost = await self.ghosts.ensure_user(
            mxid, shown, link.room_id, kind=f"remote:{side.settings.name}", remote_id=user
        )
        if avatar is not None:
            await self._copy_avatar(side, ghost, avatar)
        return ghost

    async def _copy_avatar(self, side: RemoteSide, ghost: UserID, avatar: str) -> None:
        """The remote user's avatar, copied to their ghost once (again when it changes)."""
        key = f"ghost-avatar:{ghost}"
        if self._avatars.get(ghost) == avatar:
            return
        if await kv.get_value(self.db, key) != avatar:
            try:
                found = await side.client.download(avatar, AVATAR_MAX_BYTES)
                if found is None:
                    return
                data, content_type = found
                url = await self.client.upload(data, content_type, "avatar", as_user=ghost)
                await self.client.set_avatar_url(ghost, url)
            except PermanentError as e:
                log.info("avatar of %s not copied: %s", ghost, e)
                return
            await kv.set_value(self.db, key, avatar)
        self._avatars[ghost] = avatar

    async def _mapped(self, link: Link, event_ids: tuple[str, ...]) -> dict[str, str | None]:
        mapped: dict[str, str | None] = {}
        for event_id in event_ids:
            found = await self._lookup(link, event_id)
            mapped[event_id] = None if found is None else found.agency_event_id
        return mapped

    async def _lookup(self, link: Link, remote_event_id: str) -> Mapped | None:
        """The agency event of a remote event, committed or being committed."""
        recent = self._recent.get((link.id, remote_event_id))
        if recent is not None:
            return recent
        return await remote_db.by_remote_event(self.db, link.id, remote_event_id)

    async def _record(
        self, link: Link, item: RemoteInboxItem, event_id: EventID, sender: str
    ) -> None:
        """Map the posted event and mark the item done, in the background: the room's next
        event is sent meanwhile. Should the bridge stop before the commit, the item is posted
        again with the same transaction ID, which the homeserver answers with this event."""
        key = (link.id, item.event_id)
        self._recent[key] = Mapped(item.event_id, event_id, sender, "in")

        async def commit() -> None:
            try:
                await remote_db.record_relayed(
                    self.db,
                    item_id=item.id,
                    link_id=link.id,
                    remote_event_id=item.event_id,
                    agency_event_id=event_id,
                    remote_sender=sender,
                    audit=_audit(link, item, "posted", None, event_id),
                )
            except Exception as e:
                # Still pending: the next sweep posts it again (same event) and records it.
                log.warning("could not record %s yet: %s", item.event_id, e)
            finally:
                self._recording.pop(item.id, None)
                self._recent.pop(key, None)

        self._recording[item.id] = self.tasks.spawn(commit(), name=f"record:{item.id}")
        log.info("relayed %s of %s as %s", item.event_id, item.remote, event_id)
        if item.received_at and self.on_posted is not None:
            self.on_posted(max(0.0, time.time() - item.received_at / 1000))

    async def _refused(self, link: Link, side: RemoteSide, sender: str, reason: str) -> None:
        """The room hears of each refused sender once a day; the log every time."""
        day = dt.datetime.now(dt.UTC).date().isoformat()
        who = sender[:320]
        if await mail_db.refusals_today(self.db, link.id, who, day) == 0:
            await self._notice(
                link,
                f"A message from {who} in the room linked on {side.settings.name} is not "
                f"relayed here: {reason}. (Said once a day per sender.)",
                key=f"remote-refused:{link.id}:{who}:{day}",
            )
        count = await mail_db.count_refusal(self.db, link.id, who, day)
        log.info(
            "event from %s on %s not relayed (%d today): %s",
            who,
            side.settings.name,
            count,
            reason,
        )

    async def _notice(self, link: Link, text: str, *, key: str) -> None:
        await self.client.send_event(
            link.room_id, "m.room.message", notice_content(text), derived_txn_id("notice", key)
        )


def _audit(
    link: Link, item: RemoteInboxItem, outcome: str, reason: str | None, event_id: str = ""
) -> AuditEntry:
    """The audit row of a remote event settling with `outcome`, stored with its state."""
    try:
        event: Any = json.loads(item.event_json)
    except (ValueError, RecursionError):
        event = None
    sender = event.get("sender") if isinstance(event, dict) else None
    content = event.get("content") if isinstance(event, dict) else None
    return AuditEntry(
        direction="remote_in",
        link=link.remote,
        room_id=link.room_id,
        sender=sender if isinstance(sender, str) else None,
        outcome=outcome,
        recipients=(link.room_id,),
        ids={"remote_event_id": item.event_id, "event_id": event_id},
        reason=reason,
        body_sha256=content_digest(content) if content is not None else None,
    )


def _bounded(ts: int | None) -> int | None:
    """The remote's timestamp for the agency event, never in the future."""
    return None if ts is None else min(ts, _now_ms())
