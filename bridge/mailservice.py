"""The mail side of a running bridge: config links, one IMAP watcher per linked mailbox."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bridge.config import Config
from bridge.core.health import ComponentHealth
from bridge.core.ids import RoomID
from bridge.core.links import LinkSettings
from bridge.core.mailrelay import MailRelay
from bridge.core.tasks import TaskGroup
from bridge.db import links as link_db
from bridge.db.engine import Database
from bridge.mail.imap import ImapWatcher, MailboxConfig
from bridge.mail.store import DbMailboxStore

log = logging.getLogger("passerelle.mail")


class MailService:
    """Keeps exactly one watcher per linked, unpaused mailbox; links can change at run time."""

    def __init__(self, config: Config, db: Database, tasks: TaskGroup, relay: MailRelay) -> None:
        self.config = config
        self.db = db
        self.tasks = tasks
        self.relay = relay
        self.health: dict[str, ComponentHealth] = {}
        self._watchers: dict[int, tuple[str, asyncio.Task[Any]]] = {}

    async def sync_config_links(self) -> None:
        """Links written in the config file are (re)created at start-up."""
        for spec in self.config.links:
            await link_db.save_link(
                self.db,
                room_id=RoomID(spec.room_id),
                kind="mail",
                remote=spec.address,
                settings=LinkSettings(spec.allowed_senders, spec.thread_mode),
                source="config",
                created_by=None,
            )

    async def refresh(self) -> None:
        """Start watchers for new links, stop those of removed or paused links."""
        wanted = {
            link.id: link
            for link in await link_db.all_links(self.db)
            if link.kind == "mail" and not link.paused
        }
        for link_id in list(self._watchers):
            if link_id not in wanted:
                address, task = self._watchers.pop(link_id)
                task.cancel()
                self.health.pop(address, None)
                log.info("stopped watching %s", address)
        for link in wanted.values():
            if link.id in self._watchers:
                continue
            mailbox = self.config.mail.mailboxes.get(link.remote)
            if mailbox is None:
                log.warning(
                    "link to %s has no mailbox in mail.mailboxes; nothing is fetched", link.remote
                )
                continue
            health = self.health[link.remote] = ComponentHealth(f"imap:{link.remote}")
            watcher = ImapWatcher(
                link.remote,
                MailboxConfig(
                    host=mailbox.host,
                    port=mailbox.port,
                    tls=mailbox.tls,  # type: ignore[arg-type]
                    user=mailbox.user,
                    password=mailbox.password,
                    folder=mailbox.folder,
                    ca_file=mailbox.ca_file,
                ),
                DbMailboxStore(self.db, link.id, self.relay.notify),
                health,
                max_size=self.config.mail.max_message_size,
                poll_interval=self.config.mail.poll_interval,
            )
            task = self.tasks.spawn(watcher.run(), name=f"imap:{link.remote}")
            self._watchers[link.id] = (link.remote, task)
            log.info("watching %s for %s", link.remote, link.room_id)

    def report(self) -> dict[str, Any]:
        return {address: h.as_dict() for address, h in self.health.items()}
