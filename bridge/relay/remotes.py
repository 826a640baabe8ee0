"""The remote side of a running bridge: one client and one /sync loop per configured remote,
config links, joining remote rooms, and what happens when a remote's token stops working."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp

from bridge.config import Config, RemoteSettings
from bridge.core.errors import PermanentError, TransientError
from bridge.core.health import ComponentHealth
from bridge.core.ids import RoomID
from bridge.core.leases import remote_lease
from bridge.core.links import REMOTE_KIND, Link, LinkSettings, remote_link_key, split_remote_key
from bridge.core.remote_in import RemotePolicy
from bridge.core.tasks import TaskGroup
from bridge.db import links as link_db
from bridge.db import remote as remote_db
from bridge.db import rooms
from bridge.db.engine import Database
from bridge.matrix.client import MatrixClient, derived_txn_id
from bridge.matrix.render import notice_content
from bridge.relay.leases import LeaseKeeper
from bridge.relay.remote_in import RemoteSide
from bridge.remote.client import RemoteAuthError, RemoteClient
from bridge.remote.store import DbSyncStore
from bridge.remote.sync import RemoteSyncer

log = logging.getLogger("passerelle.remote")


class RemoteJoinError(Exception):
    """The bridge's account could not join a remote room; the text says why, for a person."""


def _session(settings: RemoteSettings) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=settings.ca_file)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(ssl=context),
    )


class RemoteService:
    """Keeps one syncer per remote that has links; links can change at run time."""

    def __init__(
        self,
        config: Config,
        db: Database,
        client: MatrixClient,
        tasks: TaskGroup,
        *,
        on_stored: Callable[[], None],
        leases: LeaseKeeper | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.client = client
        self.tasks = tasks
        self.on_stored = on_stored
        self.sides: dict[str, RemoteSide] = {}
        self.health: dict[str, ComponentHealth] = {}
        self._sessions: list[aiohttp.ClientSession] = []
        # A remote's /sync runs only while this instance holds its lease (always, alone); a
        # new syncer each time (it reads its position from the database).
        self.leases = leases or LeaseKeeper.alone(db, tasks)
        self._syncers: dict[str, RemoteSyncer] = {}
        self._started: set[str] = set()
        self._rooms: dict[str, set[str]] = {}
        self.stopped: dict[str, str] = {}  # remote → why it stopped (token refused)

    def open(self) -> None:
        """A client for every configured remote (no request yet)."""
        for name, settings in self.config.remotes.items():
            session = _session(settings)
            self._sessions.append(session)
            client = RemoteClient(
                name,
                settings.address,
                settings.access_token,
                session,
                request_timeout=settings.request_timeout,
            )
            policy = RemotePolicy(
                remote=name,
                own_user_id=settings.user_id,
                allowed_servers=frozenset(settings.allowed_servers),
            )
            self.sides[name] = RemoteSide(settings, client, policy)
            self.health[name] = ComponentHealth(f"remote:{name}")

    async def close(self) -> None:
        # The syncers' tasks are the task group's: stopped before this.
        for session in self._sessions:
            await session.close()
        self._sessions.clear()

    async def join(self, remote: str, room: str) -> str:
        """The bridge's account joins a remote room (ID or alias): its room ID, or
        RemoteJoinError saying why not (not invited, encrypted, unreachable)."""
        side = self.sides[remote]
        try:
            room_id = await side.client.join(room)
        except TransientError as e:
            raise RemoteJoinError(f"{remote} cannot be reached now ({e}); try again later") from e
        except RemoteAuthError as e:
            raise RemoteJoinError(
                f"{remote} refused the bridge's access token ({e}); the administrator must "
                "give the bridge a new one in the config"
            ) from e
        except PermanentError as e:
            raise RemoteJoinError(
                f"{remote} did not let the bridge's account {side.settings.user_id} join "
                f"{room} ({e}). Someone in that room must invite it first (or make the room "
                "public to it)."
            ) from e
        try:
            encryption = await side.client.get_state(room_id, "m.room.encryption")
        except (TransientError, PermanentError) as e:
            raise RemoteJoinError(f"cannot read the state of {room} on {remote} ({e})") from e
        if encryption is not None:
            await self._leave_quietly(side, room_id)
            raise RemoteJoinError(
                f"{room} on {remote} is end-to-end encrypted: Passerelle cannot read or write "
                "encrypted messages, and never relays in clear into a room that expects "
                "encryption."
            )
        return room_id

    @staticmethod
    async def _leave_quietly(side: RemoteSide, room_id: str) -> None:
        try:
            await side.client.leave(room_id)
        except (TransientError, PermanentError) as e:
            log.info("could not leave %s on %s: %s", room_id, side.settings.name, e)

    async def sync_config_links(self, bot_join: Callable[[RoomID], Awaitable[bool]]) -> None:
        """Remote links written in the config are (re)created at start-up; a room that cannot
        be joined on either side leaves its link paused, with the reason in the log."""
        for spec in self.config.remote_links:
            try:
                remote_room = await self.join(spec.remote, spec.remote_room)
            except RemoteJoinError as e:
                log.warning("config link %s ⇄ %s waits: %s", spec.room_id, spec.remote_room, e)
                existing = [
                    link
                    for link in await link_db.links_in_room(self.db, RoomID(spec.room_id))
                    if link.kind == REMOTE_KIND and split_remote_key(link.remote)[0] == spec.remote
                ]
                for link in existing:
                    await link_db.set_paused(self.db, link.id, True)
                continue
            link = await link_db.save_link(
                self.db,
                room_id=RoomID(spec.room_id),
                kind=REMOTE_KIND,
                remote=remote_link_key(spec.remote, remote_room),
                settings=LinkSettings(),
                source="config",
                created_by=None,
            )
            room = await rooms.get_room(self.db, link.room_id)
            if room is not None and room.encrypted:
                log.warning(
                    "%s is encrypted: its link to %s stays paused", link.room_id, spec.remote
                )
                await link_db.set_paused(self.db, link.id, True)
                continue
            if not await bot_join(link.room_id):
                log.warning(
                    "the bot cannot join %s: the link to %s waits for an invite",
                    link.room_id,
                    spec.remote,
                )
                await link_db.set_paused(self.db, link.id, True)

    async def refresh(self) -> None:
        """Start the syncers of remotes that have active links; tell each which rooms."""
        links = [link for link in await link_db.all_links(self.db) if link.kind == REMOTE_KIND]
        wanted: dict[str, set[str]] = {name: set() for name in self.sides}
        for link in links:
            name, room_id = split_remote_key(link.remote)
            if name in wanted and not link.paused:
                wanted[name].add(room_id)
        for name, room_ids in wanted.items():
            self._rooms[name] = room_ids
            if name in self.stopped:
                continue
            if name not in self._started and room_ids:
                self._start(name)
            syncer = self._syncers.get(name)
            if syncer is not None:
                syncer.rooms_changed()

    def is_stopped(self, name: str) -> bool:
        return name in self.stopped

    async def token_refused(self, name: str, why: str) -> None:
        """The remote no longer accepts the bridge's token: it stops as a whole (other
        remotes and mail go on), with one log line and one notice in each linked room."""
        if name in self.stopped:
            return
        self.stopped[name] = why
        self.health[name].failed(f"the access token was refused: {why}")
        log.error(
            "remote %s stopped: its access token was refused (%s); give the bridge a new "
            "token in the config and restart it",
            name,
            why,
        )
        self._started.discard(name)
        await self.leases.drop(remote_lease(name))  # never the calling task itself
        await self._tell_stopped(name)

    def _start(self, name: str) -> None:
        side = self.sides[name]

        async def token_refused(why: str) -> None:
            await self.token_refused(name, why)

        def sync() -> Coroutine[Any, Any, None]:
            syncer = RemoteSyncer(
                side.client,
                DbSyncStore(self.db, name),
                self.health[name],
                rooms=lambda: self._rooms.get(name, set()),
                on_stored=self.on_stored,
                on_token_refused=token_refused,
                timeout_ms=int(side.settings.sync_timeout * 1000),
                own_user_id=side.settings.user_id,
            )
            self._syncers[name] = syncer
            log.info("reading %s (%s)", name, side.settings.address)
            return syncer.run()

        self._started.add(name)
        self.leases.hold(remote_lease(name), sync)

    async def _tell_stopped(self, name: str) -> None:
        """Each room linked to a stopped remote hears it once."""
        for link in await link_db.all_links(self.db):
            if link.kind != REMOTE_KIND or split_remote_key(link.remote)[0] != name:
                continue
            text = (
                f"{name} no longer accepts the bridge's access token: nothing is relayed "
                "with it until an administrator gives the bridge a new token and restarts it. "
                "Messages written here meanwhile are kept and sent then."
            )
            try:
                await self.client.send_event(
                    link.room_id,
                    "m.room.message",
                    notice_content(text),
                    derived_txn_id("remote-stopped", name, str(link.id), self.stopped[name][:50]),
                )
            except (TransientError, PermanentError) as e:
                log.warning("could not tell %s that %s stopped: %s", link.room_id, name, e)

    async def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, health in self.health.items():
            state = health.as_dict()
            if name in self.stopped:
                state["stopped"] = self.stopped[name]
            state["rooms"] = len(self._rooms.get(name, ()))
            state["inbox"] = await remote_db.inbox_counts(self.db, name)
            out[name] = state
        return out


def describe_remote_link(link: Link) -> str:
    name, room_id = split_remote_key(link.remote)
    paused = "; paused" if link.paused else ""
    source = " (from the config file)" if link.source == "config" else ""
    return f"{room_id} on {name}: relayed both ways{paused}{source}"
