"""The mail side of a running bridge: config links, one IMAP watcher per linked mailbox (and
one for the bounce mailbox), run within the IMAP connection pool."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bridge.config import Config, MailboxSettings
from bridge.core.health import ComponentHealth
from bridge.core.ids import RoomID
from bridge.core.leases import mailbox_lease
from bridge.core.links import Link
from bridge.core.tasks import TaskGroup
from bridge.db import links as link_db
from bridge.db import rooms
from bridge.db.engine import Database
from bridge.mail.imap_pool import ImapPool
from bridge.mail.imap_session import MailboxConfig
from bridge.mail.imap_watcher import ImapWatcher, MailboxStore
from bridge.mail.store import DbMailboxStore
from bridge.relay.bounces import BounceMailboxStore, Bounces
from bridge.relay.leases import LeaseKeeper
from bridge.relay.mail_in import MailRelay

log = logging.getLogger("passerelle.mail")


class MailService:
    """Keeps exactly one watcher per linked mailbox; links can change at run time."""

    def __init__(
        self,
        config: Config,
        db: Database,
        tasks: TaskGroup,
        relay: MailRelay,
        bounces: Bounces | None = None,
        *,
        leases: LeaseKeeper | None = None,
        notify_relay: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.tasks = tasks
        self.relay = relay
        self.bounces = bounces
        # Each mailbox is watched only while this instance holds its lease (always, alone).
        self.leases = leases or LeaseKeeper.alone(db, tasks)
        self.notify_relay = notify_relay or relay.notify
        self.health: dict[str, ComponentHealth] = {}
        self._watchers: dict[int, tuple[str, str]] = {}  # link → (address, lease)
        self._bounce_watched = False
        # The pool runs the watchers of the mailboxes this instance holds the lease of.
        self.pool = ImapPool(
            tasks.spawn,
            max_connections=config.mail.max_imap_connections,
            poll_interval=config.mail.poll_interval,
        )

    async def sync_config_links(self, join: Callable[[RoomID], Awaitable[bool]]) -> None:
        """Links written in the config file are (re)created at start-up. The bot must be in
        the room to post there: if it cannot join, the link waits (paused) for an invite
        instead of failing every mail. A link already stored as written, in a room the bot
        is in, costs nothing here (thousands of config links start in one query each)."""
        existing = await self._mail_links()
        writes = [
            link_db.LinkWrite(
                RoomID(spec.room_id), "mail", spec.address, spec.settings(), "config"
            )
            for spec in self.config.links
            if (link := existing.get(spec.address)) is None
            or link.room_id != spec.room_id
            or link.settings != spec.settings()
            or link.source != "config"
        ]
        if writes:
            await link_db.save_links(self.db, writes)
            existing = await self._mail_links()
        known_rooms = await rooms.all_rooms(self.db)
        for spec in self.config.links:
            link = existing[spec.address]
            room = known_rooms.get(link.room_id)
            if room is not None and room.encrypted:
                log.warning(
                    "%s is linked to %s, which is encrypted: the link stays paused",
                    link.remote,
                    link.room_id,
                )
                if not link.paused:
                    await link_db.set_paused(self.db, link.id, True)
                continue
            joined = room is not None and room.bot_membership == "join"
            if joined or await join(link.room_id):
                if link.paused:
                    await link_db.set_paused(self.db, link.id, False)
                continue
            log.warning(
                "the bot cannot join %s: mail for %s waits until someone invites it",
                link.room_id,
                link.remote,
            )
            if not link.paused:
                await link_db.set_paused(self.db, link.id, True)

    async def _mail_links(self) -> dict[str, Link]:
        return {
            link.remote: link for link in await link_db.all_links(self.db) if link.kind == "mail"
        }

    async def room_joined(self, room_id: RoomID) -> None:
        """The bot was let into a room: links that waited for it resume."""
        room = await rooms.get_room(self.db, room_id)
        if room is not None and room.encrypted:
            return  # links of an encrypted room stay paused
        waiting = [link for link in await link_db.links_in_room(self.db, room_id) if link.paused]
        for link in waiting:
            await link_db.set_paused(self.db, link.id, False)
            log.info("bot joined %s: resuming %s", room_id, link.remote)
        if waiting:
            await self.refresh()
            self.notify_relay()

    async def refresh(self) -> None:
        """Start watchers for new links, stop those of removed links. A paused link keeps
        its watcher: its mail is fetched and kept, and posted once the link resumes."""
        wanted = {
            link.id: link for link in await link_db.all_links(self.db) if link.kind == "mail"
        }
        for link_id in list(self._watchers):
            if link_id not in wanted:
                address, lease = self._watchers.pop(link_id)
                await self.leases.drop(lease)
                self.health.pop(address, None)
                log.info("stopped watching %s", address)
        for link in wanted.values():
            if link.id in self._watchers:
                continue
            if link.remote == self.config.mail.bounces.mailbox:
                log.warning("link to %s: it is the bounce mailbox, never linked", link.remote)
                continue
            store = DbMailboxStore(self.db, link.id, self.notify_relay)
            started = self._watch(link.remote, store)
            if started is not None:
                self._watchers[link.id] = (link.remote, started)
                log.info("watching %s for %s", link.remote, link.room_id)
        bounce_box = self.config.mail.bounces.mailbox
        if bounce_box is not None and self.bounces is not None and not self._bounce_watched:
            self._bounce_watched = (
                self._watch(bounce_box, BounceMailboxStore(self.db, self.bounces)) is not None
            )
            log.info("watching %s for delivery reports", bounce_box)

    def _watch(self, address: str, store: MailboxStore) -> str | None:
        mailbox = self.config.mail.mailboxes.get(address)
        if mailbox is None:
            log.warning("%s has no mailbox in mail.mailboxes; nothing is fetched", address)
            return None
        health = self.health[address] = ComponentHealth(f"imap:{address}")

        async def watch() -> None:
            # While this instance holds the mailbox's lease, the pool runs its watcher, in this
            # unit's context (its writes fenced by the lease); losing the lease removes it.
            self.pool.add(address, self._watcher(address, mailbox, store, health))
            try:
                await asyncio.Future()
            finally:
                self.pool.remove(address)

        lease = mailbox_lease(address)
        self.leases.hold(lease, watch)
        return lease

    def _watcher(
        self, address: str, mailbox: MailboxSettings, store: MailboxStore, health: ComponentHealth
    ) -> ImapWatcher:
        return ImapWatcher(
            address,
            MailboxConfig(
                host=mailbox.host,
                port=mailbox.port,
                tls=mailbox.tls,  # type: ignore[arg-type]
                user=mailbox.user,
                password=mailbox.password,
                folder=mailbox.folder,
                ca_file=mailbox.ca_file,
            ),
            store,
            health,
            max_size=self.config.mail.max_message_size,
            poll_interval=self.config.mail.poll_interval,
        )

    def report(self) -> dict[str, Any]:
        if not self.leases.enabled:
            return {address: h.as_dict() for address, h in self.health.items()}
        # Several instances: whether this one watches it (another may hold its lease).
        return {
            address: {**h.as_dict(), "here": self.leases.running(mailbox_lease(address))}
            for address, h in self.health.items()
        }
