"""Calls to the homeserver as the bot or a ghost, with failures mapped to transient/permanent."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from typing import Any
from urllib.parse import quote

import aiohttp
from mautrix.api import MediaPath, Method, Path
from mautrix.appservice import AppServiceAPI
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MatrixStandardRequestError
from mautrix.types import UserID as MautrixUserID

from bridge.config import Config
from bridge.core.errors import PermanentError, TransientError
from bridge.core.health import ComponentHealth
from bridge.core.ids import EventID, RoomID, UserID

log = logging.getLogger("passerelle.matrix.client")

# mxc://<server name>/<media ID>, as the spec allows them (no path tricks).
_MXC = re.compile(r"mxc://([A-Za-z0-9.:\[\]-]{1,255})/([A-Za-z0-9_-]{1,255})", re.ASCII)
_DOWNLOAD_CHUNK = 64 * 1024

# What "infinite" power means for our comparisons.
CREATOR_POWER_LEVEL = 1 << 53


def derived_txn_id(*parts: str) -> str:
    """A transaction ID derived from what caused the send, so a retry is deduplicated.

    Synapse keys its idempotency cache by the appservice's token, not by the `user_id` it acts
    as, so the ID must be unique across the bot and every ghost: the parts name the purpose.
    """
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:40]
    return f"pas.{digest}"


class MatrixClient:
    """The homeserver's client-server API, as the appservice (mautrix's AppServiceAPI)."""

    def __init__(
        self, config: Config, session: aiohttp.ClientSession, health: ComponentHealth
    ) -> None:
        self.config = config
        self.health = health
        self.bot_mxid = config.bot_mxid
        self._session = session
        self._api = AppServiceAPI(
            base_url=config.homeserver.address,
            bot_mxid=MautrixUserID(config.bot_mxid),
            token=config.appservice.as_token,
            log=logging.getLogger("passerelle.matrix.http"),  # type: ignore[arg-type]
            client_session=session,
            default_retry_count=0,
        )

    async def request(
        self,
        method: Method,
        path: Any,
        content: dict[str, Any] | bytes | None = None,
        *,
        as_user: UserID | None = None,
        query: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        sensitive: bool = False,
    ) -> dict[str, Any]:
        """`sensitive`: the body is never logged (mautrix logs bodies at DEBUG)."""
        api = self._api if as_user in (None, self.bot_mxid) else self._api.user(as_user)  # type: ignore[arg-type]
        try:
            if sensitive and isinstance(content, dict):
                # mautrix logs a dict body at DEBUG, but only the size of bytes.
                content = json.dumps(content).encode("utf-8")
                headers = {**(headers or {}), "Content-Type": "application/json"}
            result = await api.request(method, path, content, headers=headers, query_params=query)
        except MatrixRequestError as e:
            raise self._classify(e) from e
        except (TimeoutError, MatrixConnectionError, aiohttp.ClientError, OSError) as e:
            raise TransientError(f"homeserver unreachable: {e or type(e).__name__}") from e
        return result if isinstance(result, dict) else {}

    @staticmethod
    def _classify(error: MatrixRequestError) -> Exception:
        errcode = error.errcode if isinstance(error, MatrixStandardRequestError) else None
        status = error.http_status
        text = f"homeserver answered {status} {errcode or ''}: {error.message or ''}".strip()
        if status >= 500 or status == 429 or errcode == "M_LIMIT_EXCEEDED":
            return TransientError(text)
        return PermanentError(text)

    @staticmethod
    def errcode_of(error: BaseException) -> str | None:
        cause = error.__cause__
        if isinstance(cause, MatrixStandardRequestError):
            return cause.errcode
        return None

    async def versions(self) -> list[str]:
        result = await self.request(Method.GET, Path.versions)
        versions = result.get("versions")
        return [str(v) for v in versions] if isinstance(versions, list) else []

    async def register(self, localpart: str) -> None:
        """Register a user in our namespace; already registered is fine."""
        content = {
            "type": "m.login.application_service",
            "username": localpart,
            "inhibit_login": True,
        }
        try:
            await self.request(Method.POST, Path.v3.register, content)
        except PermanentError as e:
            if self.errcode_of(e) != "M_USER_IN_USE":
                raise

    async def set_displayname(self, mxid: UserID, name: str) -> None:
        await self.request(
            Method.PUT, Path.v3.profile[mxid].displayname, {"displayname": name}, as_user=mxid
        )

    async def get_displayname(self, mxid: UserID) -> str | None:
        try:
            result = await self.request(Method.GET, Path.v3.profile[mxid].displayname)
        except PermanentError:
            return None
        name = result.get("displayname")
        return name if isinstance(name, str) else None

    async def ping(self, txn_id: str) -> int:
        """Ask the homeserver to ping us back (MSC2659); returns its round trip in ms."""
        result = await self.request(
            Method.POST,
            Path.v1.appservice[self.config.appservice.id].ping,
            {"transaction_id": txn_id},
        )
        duration = result.get("duration_ms")
        return int(duration) if isinstance(duration, int) else -1

    async def join(self, room_id: RoomID, *, as_user: UserID | None = None) -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].join, {}, as_user=as_user)

    async def leave(
        self, room_id: RoomID, reason: str | None = None, *, as_user: UserID | None = None
    ) -> None:
        content = {"reason": reason} if reason else {}
        await self.request(Method.POST, Path.v3.rooms[room_id].leave, content, as_user=as_user)

    async def send_event(
        self,
        room_id: RoomID,
        event_type: str,
        content: dict[str, Any],
        txn_id: str,
        *,
        as_user: UserID | None = None,
        ts: int | None = None,
        sensitive: bool = False,
    ) -> EventID:
        result = await self.request(
            Method.PUT,
            Path.v3.rooms[room_id].send[event_type][txn_id],
            content,
            as_user=as_user,
            query={"ts": str(ts)} if ts is not None else None,
            sensitive=sensitive,
        )
        event_id = result.get("event_id")
        if not isinstance(event_id, str):
            raise PermanentError("homeserver answered a send without an event_id")
        return EventID(event_id)

    async def redact(
        self,
        room_id: RoomID,
        event_id: EventID,
        txn_id: str,
        *,
        reason: str | None = None,
        as_user: UserID | None = None,
    ) -> EventID:
        content = {"reason": reason} if reason else {}
        result = await self.request(
            Method.PUT,
            Path.v3.rooms[room_id].redact[event_id][txn_id],
            content,
            as_user=as_user,
        )
        redaction = result.get("event_id")
        if not isinstance(redaction, str):
            raise PermanentError("homeserver answered a redaction without an event_id")
        return EventID(redaction)

    async def set_avatar_url(self, mxid: UserID, url: str) -> None:
        await self.request(
            Method.PUT, Path.v3.profile[mxid].avatar_url, {"avatar_url": url}, as_user=mxid
        )

    async def get_state(
        self, room_id: RoomID, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        """One state event's content, or None when the room has no such state."""
        path = Path.v3.rooms[room_id].state[event_type]
        try:
            return await self.request(Method.GET, path[state_key] if state_key else path)
        except PermanentError as e:
            if self.errcode_of(e) == "M_NOT_FOUND":
                return None
            raise

    async def member_count(self, room_id: RoomID) -> int:
        """Members who joined or are invited."""
        result = await self.request(
            Method.GET, Path.v3.rooms[room_id].members, query={"not_membership": "leave"}
        )
        chunk = result.get("chunk")
        if not isinstance(chunk, list):
            return 0
        return sum(
            1
            for ev in chunk
            if isinstance(ev, dict)
            and isinstance(ev.get("content"), dict)
            and ev["content"].get("membership") in ("join", "invite")
        )

    async def create_direct_room(self, user_id: UserID) -> RoomID:
        """A new private room of the bot's, with `user_id` invited as to a direct chat."""
        result = await self.request(
            Method.POST,
            Path.v3.createRoom,
            {"preset": "trusted_private_chat", "invite": [user_id], "is_direct": True},
        )
        room_id = result.get("room_id")
        if not isinstance(room_id, str):
            raise PermanentError("homeserver answered createRoom without a room_id")
        return RoomID(room_id)

    async def add_direct_chat(self, user_id: UserID, room_id: RoomID) -> None:
        """Record the room as a direct chat with user_id in the bot's m.direct account data."""
        path = Path.v3.user[self.bot_mxid].account_data["m.direct"]
        try:
            direct = await self.request(Method.GET, path)
        except PermanentError as e:
            if self.errcode_of(e) != "M_NOT_FOUND":
                raise
            direct = {}
        known = direct.get(user_id)
        rooms = [r for r in known if isinstance(r, str)] if isinstance(known, list) else []
        if room_id not in rooms:
            await self.request(Method.PUT, path, {**direct, user_id: [*rooms, room_id]})

    async def invite(self, room_id: RoomID, user_id: UserID) -> None:
        await self.request(Method.POST, Path.v3.rooms[room_id].invite, {"user_id": user_id})

    async def upload(
        self, data: bytes, content_type: str, filename: str, *, as_user: UserID | None = None
    ) -> str:
        """Upload media; returns its mxc:// URI."""
        result = await self.request(
            Method.POST,
            MediaPath.v3.upload,
            data,
            as_user=as_user,
            query={"filename": filename},
            headers={"Content-Type": content_type},
        )
        uri = result.get("content_uri")
        if not isinstance(uri, str) or not uri.startswith("mxc://"):
            raise PermanentError("homeserver answered an upload without a content_uri")
        return uri

    async def upload_limit(self) -> int | None:
        """The homeserver's m.upload.size, or None when it does not say."""
        result = await self.request(Method.GET, "/_matrix/client/v1/media/config")
        size = result.get("m.upload.size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

    async def power_level(self, room_id: RoomID, user_id: UserID) -> int:
        """The user's power level; room creators in room versions with MSC4289 (v12 on)
        are not listed in m.room.power_levels and outrank everyone."""
        if await self._is_privileged_creator(room_id, user_id):
            return CREATOR_POWER_LEVEL
        levels = await self.get_state(room_id, "m.room.power_levels") or {}
        users = levels.get("users")
        if isinstance(users, dict) and isinstance(users.get(user_id), int):
            return int(users[user_id])
        default = levels.get("users_default", 0)
        return int(default) if isinstance(default, int) else 0

    async def send_state(
        self, room_id: RoomID, event_type: str, state_key: str, content: dict[str, Any]
    ) -> None:
        await self.request(
            Method.PUT, Path.v3.rooms[room_id].state[event_type][state_key], content
        )

    async def _is_privileged_creator(self, room_id: RoomID, user_id: UserID) -> bool:
        try:
            event = await self.request(
                Method.GET,
                Path.v3.rooms[room_id].state["m.room.create"],
                query={"format": "event"},
            )
        except PermanentError:
            return False
        content = event.get("content")
        if not isinstance(content, dict):
            return False
        version = str(content.get("room_version", "1"))
        if not version.isdigit() or int(version) < 12:
            return False
        extra = content.get("additional_creators")
        return event.get("sender") == user_id or (isinstance(extra, list) and user_id in extra)

    async def joined_members(self, room_id: RoomID) -> dict[UserID, tuple[str | None, str | None]]:
        """Joined members with their room display name and avatar (None when not set)."""
        result = await self.request(Method.GET, Path.v3.rooms[room_id].joined_members)
        joined = result.get("joined")
        members: dict[UserID, tuple[str | None, str | None]] = {}
        if isinstance(joined, dict):
            for user_id, info in joined.items():
                info = info if isinstance(info, dict) else {}
                name, avatar = info.get("display_name"), info.get("avatar_url")
                members[UserID(str(user_id))] = (
                    name if isinstance(name, str) else None,
                    avatar if isinstance(avatar, str) else None,
                )
        return members

    async def download(self, mxc: str, max_bytes: int) -> bytes | None:
        """Media through authenticated media (/_matrix/client/v1/media/download), as the bot.
        None when it is larger than max_bytes (the download stops there); PermanentError for
        a malformed URI or media the homeserver refuses, TransientError for an outage."""
        match = _MXC.fullmatch(mxc)
        if match is None:
            raise PermanentError("not an mxc:// URI")
        server, media_id = (quote(part, safe="") for part in match.groups())
        url = (
            f"{self.config.homeserver.address.rstrip('/')}"
            f"/_matrix/client/v1/media/download/{server}/{media_id}"
        )
        headers = {"Authorization": f"Bearer {self.config.appservice.as_token}"}
        try:
            async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status >= 500 or resp.status == 429:
                    raise TransientError(f"homeserver answered {resp.status} to a download")
                if resp.status != 200:
                    raise PermanentError(f"homeserver answered {resp.status} to a download")
                if (resp.content_length or 0) > max_bytes:
                    return None
                data = bytearray()
                async for chunk in resp.content.iter_chunked(_DOWNLOAD_CHUNK):
                    data += chunk
                    if len(data) > max_bytes:
                        return None
                return bytes(data)
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransientError(f"homeserver unreachable: {e or type(e).__name__}") from e
