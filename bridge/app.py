"""The running bridge: database, homeserver client, HTTP server and background workers."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

import aiohttp
from aiohttp import web

from bridge import __version__
from bridge.config import Config
from bridge.core.commands import CommandProcessor
from bridge.core.errors import Ignored, PermanentError, TransientError
from bridge.core.health import ComponentHealth
from bridge.core.ids import EventID, RoomID
from bridge.core.leases import (
    DISPATCHER,
    MAIL_RELAY,
    OUTBOX,
    REMOTE_RELAY,
    REMOTE_SENDER,
    WEBHOOKS_RELAY,
    WEBHOOKS_SENDER,
    LeaseTiming,
    default_instance_id,
)
from bridge.core.links import REMOTE_KIND, split_remote_key
from bridge.core.tasks import TaskGroup
from bridge.db import backfill as backfill_db
from bridge.db import hooks_out as hooks_out_db
from bridge.db import inbox as inbox_db
from bridge.db import links as link_db
from bridge.db import mail as mail_db
from bridge.db import outbox as outbox_db
from bridge.db import remote as remote_db
from bridge.db import webhooks as webhook_db
from bridge.db.engine import Database, open_database
from bridge.db.inbox import InboxEvent
from bridge.db.outbox import DbOutboxStore
from bridge.mail.authcheck import SenderAuthenticator
from bridge.mail.ingest import make_parser
from bridge.mail.outbox import OutboxWorker
from bridge.mail.smtp import SendResult, SmtpConfig, SmtpSender, TlsMode, retry_delay
from bridge.matrix.appservice import AppserviceServer, PathOnlyAccessLogger, json_errors
from bridge.matrix.bot import ManagementBot
from bridge.matrix.catchup import CatchUp
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.connection import HomeserverMonitor
from bridge.matrix.dispatcher import EventDispatcher
from bridge.matrix.ghosts import GhostManager
from bridge.matrix.members import RoomMembers
from bridge.matrix.poster import MatrixPoster
from bridge.matrix.progress import NoticeBoard
from bridge.matrix.render import notice_content
from bridge.relay.backfill import BackfillRunner, BackfillService
from bridge.relay.backfill_commands import BackfillCommands
from bridge.relay.bounces import Bounces
from bridge.relay.bridge_state import BridgeState
from bridge.relay.hook_admin import HookAdmin
from bridge.relay.hook_commands import WebhookCommands
from bridge.relay.hooks_in import HooksRelay
from bridge.relay.hooks_out import HookSender, HooksOut
from bridge.relay.leases import LeaseKeeper
from bridge.relay.link_commands import LinkCommands
from bridge.relay.mail_in import MailRelay
from bridge.relay.mail_out import MailOut, OutcomeReporter
from bridge.relay.mailboxes import MailService
from bridge.relay.remote_in import RemoteRelay
from bridge.relay.remote_out import RemoteOut, RemoteSender
from bridge.relay.remotes import RemoteService
from bridge.relay.room_marking import RoomMarking
from bridge.status import StatusReporter
from bridge.web.health import add_health_route
from bridge.web.metrics import Metrics, add_metrics_route, start_metrics_listener
from bridge.web.provisioning import ProvisioningApi
from bridge.webhooks.delivery import Deliverer
from bridge.webhooks.directory import HookDirectory
from bridge.webhooks.server import WebhookServer

log = logging.getLogger("passerelle")

# SMTP sends at once, each on a connection kept open between mails.
OUTBOX_CONCURRENCY = 4


class _ReportingStore(DbOutboxStore):
    """The outbox store, waking the reporter when an outcome is there to tell."""

    def __init__(self, db: Database, notify: Callable[[], None], *, tell_sent: bool) -> None:
        super().__init__(db, report_sent=tell_sent)
        self._notify = notify
        self._tell_sent = tell_sent

    async def mark_sent(self, item_id: int, result: SendResult) -> None:
        await super().mark_sent(item_id, result)
        if self._tell_sent:  # with on_sent: none there is nothing to tell
            self._notify()

    async def mark_failed(self, item_id: int, result: SendResult) -> None:
        await super().mark_failed(item_id, result)
        self._notify()


class StartupError(Exception):
    """The bridge could not start (its port is taken, …)."""


class LeaseLostError(Exception):
    """The instance lost a lease it held (the database unreachable for longer than a lease
    lasts) and stopped; run it again."""


class Bridge:
    """Everything `passerelle run` runs, startable and stoppable from tests and the demo."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.tasks = TaskGroup()
        self.homeserver_health = ComponentHealth("homeserver")
        self.smtp_health = ComponentHealth("smtp")
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._db: Database | None = None
        self.metrics = Metrics()
        self._metrics_runner: web.AppRunner | None = None
        # Set when this instance lost a lease it cannot give up cleanly: it must exit.
        self.fatal = asyncio.Event()
        self.fatal_reason: str | None = None

    @property
    def db(self) -> Database:
        assert self._db is not None, "bridge not started"
        return self._db

    async def start(self) -> None:
        config = self.config
        self._db = await open_database(config.database)
        try:
            await self._start_services()
        except BaseException:
            await self.stop()
            raise

    async def _start_services(self) -> None:
        config = self.config
        # Each unit of work runs under a lease (instance.leases; without, all run here).
        self.leases = LeaseKeeper(
            self.db,
            self.tasks,
            owner=config.instance.id or default_instance_id(socket.gethostname(), os.getpid()),
            timing=LeaseTiming(config.instance.lease_ttl, config.instance.lease_renew),
            enabled=config.instance.leases,
            on_fatal=self._lease_fatal,
        )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=config.homeserver.request_timeout),
            connector=aiohttp.TCPConnector(ssl=config.homeserver.verify_ssl),
        )
        self.client = MatrixClient(config, self._session, self.homeserver_health)
        self.status = StatusReporter(self.db, self.homeserver_health)
        commands = CommandProcessor(config.appservice.command_prefix, self.status.report)
        self.bot = ManagementBot(
            config,
            self.client,
            self.db,
            commands,
            on_joined=self._room_joined,
            is_linked=self._room_is_linked,
            on_encrypted=self._room_encrypted,
            # The webhook relay re-reads which of its rooms the bot is in.
            on_left=lambda _room_id: self.leases.wake(WEBHOOKS_RELAY),
        )
        self.ghosts = GhostManager(config, self.client, self.db)
        self.poster = MatrixPoster(self.client, self.ghosts)
        self.reporter = OutcomeReporter(config, self.db, self.client)
        self.outbox: OutboxWorker | None = None
        if config.mail.smtp is not None:
            smtp = config.mail.smtp
            sender = SmtpSender(
                SmtpConfig(
                    host=smtp.host,
                    port=smtp.port,
                    tls=cast(TlsMode, smtp.tls),
                    user=smtp.user,
                    password=smtp.password,
                    ca_file=smtp.ca_file,
                    timeout=smtp.timeout,
                ),
                self.smtp_health,
                # As many as the outbox sends at once: no connection per mail.
                keep_open=OUTBOX_CONCURRENCY,
            )
            self.outbox = OutboxWorker(
                _ReportingStore(
                    self.db, self.reporter.notify, tell_sent=self.reporter.include_sent
                ),
                sender,
                give_up_after=config.mail.give_up_after,
                concurrency=OUTBOX_CONCURRENCY,
                retry_schedule=functools.partial(retry_delay, schedule=config.mail.retry_delays),
            )
        self.members = RoomMembers(self.client)
        self.room_marking = RoomMarking(config, self.db, self.client)
        self.bridge_state = BridgeState(config, self.db, self.client, self.room_marking)
        self._markings_shown = False
        self.mail_out = MailOut(
            config,
            self.db,
            self.client,
            self.members,
            notify_outbox=self._notify_outbox,
            offer_outbox=self.outbox.offer if self.outbox is not None else None,
        )
        self.bounces = Bounces(config, self.db, self.client)
        self.relay = MailRelay(
            self.db,
            make_parser(config.mail),
            self.poster,
            self.tasks,
            authenticate=SenderAuthenticator(config.mail.trust).check,
            max_attempts=config.mail.max_attempts,
            is_own_message=self.mail_out.is_own_message_id,
            has_own_marker=self.mail_out.has_own_marker,
            levels=config.mail.markings.levels,
            bounces=self.bounces,
        )
        self.mail = MailService(
            config,
            self.db,
            self.tasks,
            self.relay,
            self.bounces,
            leases=self.leases,
            notify_relay=functools.partial(self.leases.wake, MAIL_RELAY),
        )
        self.remote = RemoteService(
            config,
            self.db,
            self.client,
            self.tasks,
            on_stored=self._notify_remote_relay,
            leases=self.leases,
        )
        self.remote.open()
        self.remote_relay = RemoteRelay(
            config,
            self.db,
            self.client,
            self.ghosts,
            self.members,
            self.remote.sides,
            self.tasks,
            max_attempts=config.appservice.max_event_attempts,
            on_link_paused=self._link_paused,
        )
        self.remote_sender = RemoteSender(
            config,
            self.db,
            self.client,
            self.remote.sides,
            self.tasks,
            is_stopped=self.remote.is_stopped,
            on_token_refused=self.remote.token_refused,
        )
        self.remote_out = RemoteOut(
            config,
            self.db,
            self.client,
            self.members,
            self.remote.sides,
            notify_sender=self._wake_remote_sender,
        )
        self.link_commands = LinkCommands(
            config,
            self.db,
            self._links_changed,
            self.bridge_state.announce,
            remote_join=self.remote.join,
        )
        self.link_commands.register(commands)
        self.backfill = BackfillService(
            BackfillRunner(config, self.db, self.relay, NoticeBoard(self.client), kind="bridge"),
            self.db,
            self.tasks,
        )
        BackfillCommands(self.db, self.link_commands, self.backfill).register(commands)
        self.status.db_extra["backfills"] = functools.partial(backfill_db.report, self.db)
        self.hook_directory = HookDirectory(
            config.webhooks.hooks, outgoing=config.webhooks.outgoing
        )
        await self.hook_directory.load(self.db)
        self.hook_directory.on_change = functools.partial(self.leases.changed, "hooks")
        self.leases.on_changed("hooks", functools.partial(self.hook_directory.load, self.db))
        self.leases.on_changed("links", self._links_changed_here)
        self.deliverer = Deliverer(
            config.webhooks.egress,
            timeout=config.webhooks.delivery_timeout,
            dns_server=config.webhooks.egress_dns_server,
        )
        self.hook_sender = HookSender(
            self.db,
            self.client,
            self.hook_directory,
            self.deliverer,
            self.tasks,
            give_up_after=config.webhooks.give_up_after,
        )
        self.hooks_out = HooksOut(
            config,
            self.db,
            self.client,
            self.members,
            self.hook_directory,
            notify_sender=self._wake_hook_sender,
        )
        self.hook_admin = HookAdmin(
            config,
            self.db,
            self.hook_directory,
            self.link_commands,
            check_target=self.deliverer.check,
        )
        WebhookCommands(
            config,
            self.db,
            self.client,
            self.hook_directory,
            self.link_commands,
            admin=self.hook_admin,
        ).register(commands)
        self.status.extra["mailboxes"] = self.mail.report
        if self.leases.enabled:
            # A mailbox watched by another instance shows as not connected here.
            self.status.extra["instance"] = self.leases.report
        if self.outbox is not None:
            self.status.db_extra["outbox"] = self._outbox_report
        if config.remotes:
            self.status.db_extra["remotes"] = self.remote.report
            self.status.db_extra["remote_outbox"] = self._remote_outbox_report
        self.catch_up = CatchUp(self.db, self.client)
        self.monitor = HomeserverMonitor(
            config, self.client, self.homeserver_health, self._after_connect
        )
        self.dispatcher = EventDispatcher(
            self.db,
            self.handle_event,
            self.tasks,
            config.appservice.max_event_attempts,
            groupable=self.mail_out.groupable,
        )
        self.appservice = AppserviceServer(
            config,
            self.db,
            functools.partial(self.leases.wake, DISPATCHER),
            self.monitor.ensure_bot,
        )
        app = web.Application(
            client_max_size=config.appservice.max_body_size,
            middlewares=[json_errors, self.metrics.time_transactions],
        )
        self.appservice.add_routes(app)
        self.hooks_relay = HooksRelay(
            config,
            self.db,
            self.client,
            self.ghosts,
            self.tasks,
            max_attempts=config.appservice.max_event_attempts,
            hooks=self.hook_directory.hooks,
        )
        WebhookServer(
            self.hook_directory.keys,
            self._store_hook_request if self.leases.enabled else self.hooks_relay.store,
            max_body_size=config.webhooks.max_body_size,
            tolerance=config.webhooks.tolerance,
            on_stored=(
                functools.partial(self.leases.wake, WEBHOOKS_RELAY)
                if self.leases.enabled
                else self.hooks_relay.stored
            ),
        ).add_routes(app)
        add_health_route(app, self.status)
        ProvisioningApi(
            config,
            self.link_commands,
            self.status,
            self.client.power_level,
            self._bot_join,
            hooks=self.hook_admin,
        ).add_routes(app)
        await self._start_metrics(app)
        self._runner = web.AppRunner(
            app,
            access_log_class=PathOnlyAccessLogger,
            access_log=logging.getLogger("passerelle.http"),
            handle_signals=False,
            # A client that sends a refused (too large) body is not waited for long.
            lingering_time=2.0,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, config.appservice.hostname, config.appservice.port)
        try:
            await site.start()
        except OSError as e:
            raise StartupError(
                f"cannot listen on {config.appservice.hostname}:{config.appservice.port}: "
                f"{e.strerror or e}"
            ) from e
        log.info(
            "Passerelle %s listening on %s:%d for %s",
            __version__,
            config.appservice.hostname,
            config.appservice.port,
            config.homeserver.domain,
        )
        # The queue workers keep state across a stop: not restartable (a lost lease is fatal).
        hold = functools.partial(self.leases.hold, restartable=False)
        hold(DISPATCHER, self.dispatcher.run, notify=self.dispatcher.notify)
        hold(MAIL_RELAY, self.relay.run, notify=self.relay.notify)
        if self.outbox is not None:
            hold(OUTBOX, self._run_outbox, notify=self._notify_outbox_here)
        else:
            log.info("mail.smtp.host is not set: messages written in Matrix are not mailed")
        if self.remote.sides:
            hold(REMOTE_RELAY, self.remote_relay.run, notify=self.remote_relay.notify)
            hold(REMOTE_SENDER, self.remote_sender.run, notify=self.remote_sender.notify)
        # Always: a hook made in a room with `webhook new` needs no restart.
        self.status.db_extra["webhooks"] = self.hooks_relay.report
        self.status.db_extra["webhook_outbox"] = functools.partial(hooks_out_db.counts, self.db)
        hold(WEBHOOKS_RELAY, self.hooks_relay.run, notify=self.hooks_relay.notify)
        hold(WEBHOOKS_SENDER, self.hook_sender.run, notify=self.hook_sender.notify)
        await self.mail.sync_config_links(self._bot_join)
        await self.remote.sync_config_links(self._bot_join)
        # The bot reads an outbound hook's room: it joins those of the config (if invited).
        for room_id in sorted({hook.room_id for hook in config.webhooks.outgoing.values()}):
            await self._bot_join(RoomID(room_id))
        self.mail_out.links_changed()
        self.remote_out.links_changed()
        await self.mail.refresh()
        await self.remote.refresh()
        await self.leases.start()
        self.tasks.spawn(self.leases.run(), name="leases")
        self.tasks.spawn(self.backfill.run(), name="backfill")
        self.tasks.spawn(self.monitor.run(), name="homeserver-monitor")

    async def _start_metrics(self, app: web.Application) -> None:
        """Counts from committed audit rows; queue gauges from a background task, so that a
        scrape reads memory only; /metrics here or on a listener of its own."""
        config, metrics = self.config, self.metrics
        if not config.metrics.enabled:
            return
        self.db.audit_observers.append(metrics.audited)
        self.relay.on_posted = functools.partial(metrics.relayed, "mail_in")
        self.remote_relay.on_posted = functools.partial(metrics.relayed, "remote_in")
        self.remote_sender.on_sent = functools.partial(metrics.relayed, "remote_out")
        self.hook_sender.on_sent = functools.partial(metrics.relayed, "webhook_out")
        self.hooks_relay.on_posted = functools.partial(metrics.relayed, "webhook_in")
        if self.outbox is not None:
            self.outbox.on_sent = functools.partial(metrics.relayed, "mail_out")
        metrics.watch_errors(log)
        metrics.queues["appservice_inbox"] = functools.partial(inbox_db.pending_summary, self.db)
        metrics.queues["mail_in"] = functools.partial(mail_db.pending_summary, self.db)
        metrics.queues["webhook_inbox"] = functools.partial(webhook_db.pending_summary, self.db)
        metrics.queues["webhook_outbox"] = functools.partial(hooks_out_db.pending_summary, self.db)
        sources = metrics.connections.sources
        sources["homeserver"] = lambda: {config.homeserver.domain: self.homeserver_health}
        if config.mail.smtp is not None:
            smtp = {config.mail.smtp.host: self.smtp_health}
            sources["smtp"] = lambda: smtp
            metrics.queues["mail_outbox"] = functools.partial(outbox_db.pending_summary, self.db)
        sources["imap"] = lambda: self.mail.health
        if config.remotes:
            sources["remote"] = lambda: self.remote.health
            metrics.queues["remote_outbox"] = functools.partial(
                remote_db.outbox_pending_summary, self.db
            )
        self.tasks.spawn(metrics.run(), name="metrics-queues")
        port = config.metrics.port
        if port is None:
            add_metrics_route(app, metrics)
            return
        try:
            self._metrics_runner = await start_metrics_listener(
                metrics, config.metrics.hostname, port
            )
        except OSError as e:
            raise StartupError(
                f"cannot listen on {config.metrics.hostname}:{port} (metrics.port): "
                f"{e.strerror or e}"
            ) from e

    async def _bot_join(self, room_id: RoomID) -> bool:
        """False only when the homeserver refuses (not invited); an outage is not a no."""
        try:
            await self.client.join(room_id)
        except PermanentError as e:
            log.info("bot could not join %s: %s", room_id, e)
            return False
        except TransientError:
            return True
        return True

    async def _room_joined(self, room_id: RoomID) -> None:
        await self.mail.room_joined(room_id)
        self.leases.wake(WEBHOOKS_RELAY)
        await self._links_changed()
        await self.bridge_state.announce_all(room_id)

    async def _room_encrypted(self, room_id: RoomID, event_id: EventID) -> None:
        """A linked room turned encryption on: its links are paused (mail is kept, nothing is
        posted or mailed) and the room is told once, why."""
        self.leases.wake(WEBHOOKS_RELAY)  # a hook's room that is encrypted waits
        active = [
            link for link in await link_db.links_in_room(self.db, room_id) if not link.paused
        ]
        hooks = ", ".join(sorted(hook.name for hook in self.hook_directory.outgoing_in(room_id)))
        if not active and not hooks:
            return
        lists = ", ".join(sorted(link.remote for link in active if link.kind != REMOTE_KIND))
        remotes = ", ".join(
            sorted(
                "{1} on {0}".format(*split_remote_key(link.remote))
                for link in active
                if link.kind == REMOTE_KIND
            )
        )
        parts = []
        if lists:
            parts.append(
                f"the link to {lists} is paused: mail to the list is kept, not posted here, and "
                "messages written here are not mailed"
            )
        if remotes:
            parts.append(
                f"the link to {remotes} is paused: nothing is relayed in either direction"
            )
        if hooks:
            parts.append(f"webhook {hooks} receives nothing from this room")
        text = (
            "End-to-end encryption was turned on in this room. Passerelle cannot read or write "
            f"encrypted messages, so {'; '.join(parts)}. An administrator can link a room "
            "without encryption instead."
        )
        await self.client.send_event(
            room_id,
            "m.room.message",
            notice_content(text),
            derived_txn_id("encrypted", event_id),
        )
        for link in active:
            await link_db.set_paused(self.db, link.id, True)
            log.warning("%s paused: %s turned encryption on", link.remote, room_id)
        await self._links_changed()

    async def _room_is_linked(self, room_id: RoomID) -> bool:
        return (
            bool(await self.mail_out.room_links(room_id))
            or bool(await self.remote_out.room_links(room_id))
            or bool(self.hook_directory.outgoing_in(room_id))
        )

    async def _links_changed(self) -> None:
        self.leases.changed("links")  # the other instances re-read them too
        await self._links_changed_here()

    async def _links_changed_here(self) -> None:
        self.mail_out.links_changed()
        self.remote_out.links_changed()
        await self.mail.refresh()
        await self.remote.refresh()
        self.remote_relay.links_changed()
        self.leases.wake(REMOTE_SENDER)

    def _link_paused(self) -> None:
        self.tasks.spawn(self._links_changed(), name="links-changed")

    def _notify_remote_relay(self) -> None:
        self.leases.wake(REMOTE_RELAY)

    def _wake_remote_sender(self, link_id: int | None = None) -> None:
        if self.leases.running(REMOTE_SENDER):
            self.remote_sender.notify(link_id)
        else:
            self.leases.wake(REMOTE_SENDER)  # its holder looks at every link

    def _wake_hook_sender(self, hook: str | None = None) -> None:
        if self.leases.running(WEBHOOKS_SENDER):
            self.hook_sender.notify(hook)
        else:
            self.leases.wake(WEBHOOKS_SENDER)

    def _lease_fatal(self, why: str) -> None:
        log.critical("%s: this instance stops (run it again: it starts clean)", why)
        self.fatal_reason = why
        self.fatal.set()

    async def _run_outbox(self) -> None:
        assert self.outbox is not None
        await asyncio.gather(self.outbox.run(), self.reporter.run())

    def _notify_outbox_here(self) -> None:
        if self.outbox is not None:
            self.outbox.notify()
        self.reporter.notify()

    async def _store_hook_request(self, hook: str, webhook_id: str, body: str) -> bool:
        """With leases: a request is only kept here; the holder of the webhook relay's lease
        (maybe another instance, woken by on_stored) sweeps it, in arrival order."""
        return await webhook_db.store(self.db, hook, webhook_id, body) is not None

    async def _remote_outbox_report(self) -> dict[str, Any]:
        return await remote_db.outbox_counts(self.db)

    async def _after_connect(self) -> None:
        """After the first contact and after an outage: fetch what the homeserver dropped.
        The first time, every active link is shown in its room (m.bridge state, topic)."""
        if not self._markings_shown:
            self._markings_shown = True
            try:
                await self.bridge_state.announce_all()
            except Exception as e:
                log.warning("could not show the links in their rooms: %s", e)
        try:
            found = await self.catch_up.run()
        except Exception as e:
            # Not fatal: pushed events still flow; the next outage tries again.
            log.warning("could not read rooms back after connecting: %s", e)
            return
        if found:
            self.leases.wake(DISPATCHER)

    async def _outbox_report(self) -> dict[str, Any]:
        """Mail from Matrix: how many wait, went, failed; the SMTP server's last state."""
        counts = await outbox_db.counts(self.db)
        return {"smtp": self.smtp_health.as_dict(), **counts}

    def _notify_outbox(self) -> None:
        if self.outbox is not None:
            self.leases.wake(OUTBOX)

    async def handle_event(self, item: InboxEvent) -> None:
        """Every stored event comes through here, in order per room: the bot's business
        (invites, commands), then mail for linked rooms."""
        if item.event_type == "m.room.member":
            self.members.changed(item.room_id)
        reasons = []
        handlers = (
            self.bot.handle,
            self.mail_out.handle,
            self.remote_out.handle,
            self.hooks_out.handle,
        )
        for handler in handlers:
            try:
                await handler(item)
            except Ignored as e:
                reasons.append(str(e))
        if len(reasons) == len(handlers):
            raise Ignored("; ".join(reasons))

    async def stop(self) -> None:
        self.metrics.unwatch_errors(log)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
            self._metrics_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if hasattr(self, "mail"):
            self.mail.pool.close()  # every IMAP connection at once, none promoted meanwhile
        if hasattr(self, "leases"):
            await self.leases.close()  # stops the units, hands the leases back
        await self.tasks.close()
        if hasattr(self, "remote"):
            await self.remote.close()
        if hasattr(self, "deliverer"):
            await self.deliverer.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._db is not None:
            await self._db.close()
            self._db = None


async def run_until_signalled(config: Config) -> None:
    """Run the bridge until SIGINT or SIGTERM, then stop cleanly."""
    bridge = Bridge(config)
    await bridge.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        signalled = asyncio.ensure_future(stop.wait())
        fatal = asyncio.ensure_future(bridge.fatal.wait())
        await asyncio.wait({signalled, fatal}, return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        fatal.cancel()
        log.info("stopping")
    finally:
        await bridge.stop()
    if bridge.fatal_reason is not None:
        raise LeaseLostError(bridge.fatal_reason)
