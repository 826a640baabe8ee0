"""The client-server API of an external homeserver, as one ordinary user with an access token."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

import aiohttp
from yarl import URL

from bridge.core.errors import PermanentError, TransientError
from bridge.remote import jsonsafe

log = logging.getLogger("passerelle.remote.client")

# mxc://<server name>/<media ID>, as the spec allows them (no path tricks); as in matrix/client.py.
_MXC = re.compile(r"mxc://([A-Za-z0-9.:\[\]-]{1,255})/([A-Za-z0-9_-]{1,255})", re.ASCII)
# The server part of a room ID or alias that we are willing to pass on as server_name / via.
_SERVER_NAME = re.compile(
    r"(?:[A-Za-z0-9.-]{1,255}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?", re.ASCII
)
# type/subtype as RFC 6838 allows them, lower case (aiohttp lower-cases content_type).
_MIME = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}", re.ASCII)

SYNC_MAX_BYTES = 64 * 1024 * 1024
JSON_MAX_BYTES = 1024 * 1024
# An error body is only read for its errcode.
ERROR_MAX_BYTES = 64 * 1024
_CHUNK = 64 * 1024
# A hostile server could ask us to wait for ever; more than an hour is not believed.
_MAX_RETRY_AFTER_MS = 3_600_000
_AUTH_ERRCODES = frozenset({"M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"})
_API = "/_matrix/client/v3"


class RemoteRequestError(PermanentError):
    """The remote homeserver refused a request (a 4xx other than 401 and 429)."""

    def __init__(self, message: str, *, status: int, errcode: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode


class RemoteAuthError(PermanentError):
    """Our access token stopped working (401, M_UNKNOWN_TOKEN, M_MISSING_TOKEN): a person must
    give the bridge a new one; retrying will not help. Not a RemoteRequestError, so code that
    handles a refused request does not swallow it by accident."""

    def __init__(self, message: str, *, status: int, errcode: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.errcode = errcode


class RemoteProtocolError(PermanentError):
    """The remote homeserver answered something that is not the API (not JSON, wrong types,
    too large)."""


class RemoteRateLimited(TransientError):
    """429 / M_LIMIT_EXCEEDED; retry_after_ms is the server's hint (capped), when it gave one."""

    def __init__(self, message: str, *, retry_after_ms: int | None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


def _segment(value: str) -> str:
    """One URL path segment: every reserved character escaped (IDs contain !, :, $ and /)."""
    if not isinstance(value, str) or not value:
        raise PermanentError("empty or non-string path segment")
    return quote(value, safe="")


def _server_part(room_id_or_alias: str) -> str | None:
    """The server of '#alias:server' or '!opaque:server' (room IDs of v12 rooms have none)."""
    if room_id_or_alias[:1] not in ("#", "!"):
        return None
    _, sep, server = room_id_or_alias.partition(":")
    if not sep or _SERVER_NAME.fullmatch(server) is None:
        return None
    return server


def _clean_text(value: object, limit: int = 200) -> str:
    """Server-supplied text made safe for a log line or an error message."""
    if not isinstance(value, str):
        return ""
    return "".join(ch if ch.isprintable() else "?" for ch in value[:limit])


def _decode_json(raw: bytes) -> Any:
    """Parse strictly; values nested too deeply become null (see jsonsafe)."""
    return jsonsafe.loads(raw)


def _str_field(body: dict[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise RemoteProtocolError(f"remote homeserver answered {what} without a valid {key!r}")
    return value


def _retry_after_ms(body: object, header: str | None) -> int | None:
    value: int | None = None
    if isinstance(body, dict):
        hint = body.get("retry_after_ms")
        if isinstance(hint, int) and not isinstance(hint, bool) and hint >= 0:
            value = hint
    if value is None and header is not None and header.strip().isdigit():
        value = int(header.strip()[:9]) * 1000
    return min(value, _MAX_RETRY_AFTER_MS) if value is not None else None


class RemoteClient:
    """An external homeserver's client-server API over plain aiohttp, as one user.

    The caller owns the session (and its TLS settings). Outages, 5xx and rate limits raise
    TransientError (RemoteRateLimited for 429); a dead token raises RemoteAuthError; other
    refusals raise RemoteRequestError; answers that are not the API raise RemoteProtocolError.
    Every response is treated as hostile: sizes are capped and every field read is type-checked.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        access_token: str,
        session: aiohttp.ClientSession,
        *,
        request_timeout: float,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._access_token = access_token
        self._session = session
        self.request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"RemoteClient({self.name!r}, {self.base_url!r})"

    # --- plumbing -------------------------------------------------------------------------

    def _url(self, path: str, query: dict[str, str] | None) -> URL:
        # The path is already quoted segment by segment; yarl must not re-quote it (%2F in an
        # event ID would become a real slash).
        text = self.base_url + path
        if query:
            text += "?" + urlencode(query, quote_via=quote)
        return URL(text, encoded=True)

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._access_token}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
        query: dict[str, str] | None = None,
        max_bytes: int = JSON_MAX_BYTES,
        total_timeout: float | None = None,
    ) -> Any:
        """One call; the decoded JSON body of a 2xx answer (any JSON type), or an exception."""
        if json_body is not None:
            data = json.dumps(json_body, ensure_ascii=False).encode("utf-8")
            content_type = "application/json"
        total = self.request_timeout if total_timeout is None else total_timeout
        started = time.monotonic()
        try:
            async with self._session.request(
                method,
                self._url(path, query),
                data=data,
                headers=self._headers(content_type),
                timeout=aiohttp.ClientTimeout(total=total),
                allow_redirects=False,
                raise_for_status=False,  # whatever the caller's session says: we classify
            ) as resp:
                if not 200 <= resp.status < 300:
                    await self._raise_for_status(method, path, resp)
                raw = await self._read_capped(resp, max_bytes)
        except aiohttp.InvalidURL as e:
            raise PermanentError(f"{self.name}: invalid URL for {method} {path}") from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            log.debug("%s: %s %s failed: %r", self.name, method, path, e)
            raise TransientError(
                f"{self.name}: homeserver unreachable: {e or type(e).__name__}"
            ) from e
        if raw is None:
            raise RemoteProtocolError(
                f"{self.name}: answer to {method} {path} is larger than {max_bytes} bytes"
            )
        log.debug(
            "%s: %s %s -> %d (%d bytes, %.0f ms)",
            self.name,
            method,
            path,
            resp.status,
            len(raw),
            (time.monotonic() - started) * 1000,
        )
        try:
            return _decode_json(raw)
        except ValueError as e:
            raise RemoteProtocolError(f"{self.name}: answer to {method} {path} is not JSON") from e

    async def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = await self._request(method, path, **kwargs)
        if not isinstance(body, dict):
            raise RemoteProtocolError(
                f"{self.name}: answer to {method} {path} is not a JSON object"
            )
        return body

    @staticmethod
    async def _read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes | None:
        """The body, or None as soon as it is known to exceed max_bytes."""
        if (resp.content_length or 0) > max_bytes:
            return None
        data = bytearray()
        async for chunk in resp.content.iter_chunked(_CHUNK):
            data += chunk
            if len(data) > max_bytes:
                return None
        return bytes(data)

    async def _raise_for_status(
        self, method: str, path: str, resp: aiohttp.ClientResponse
    ) -> NoReturn:
        raw = await self._read_capped(resp, ERROR_MAX_BYTES)
        body: Any = None
        if raw:
            try:
                body = _decode_json(raw)
            except ValueError:
                body = None
        errcode: str | None = None
        error = ""
        if isinstance(body, dict):
            code = body.get("errcode")
            errcode = _clean_text(code, 100) or None
            error = _clean_text(body.get("error"))
        status = resp.status
        text = f"{self.name}: {method} {path} -> {status} {errcode or '-'}: {error}".rstrip(": ")
        log.debug("%s", text)
        if status == 401 or errcode in _AUTH_ERRCODES:
            raise RemoteAuthError(text, status=status, errcode=errcode)
        if status == 429 or errcode == "M_LIMIT_EXCEEDED":
            retry = _retry_after_ms(body, resp.headers.get("Retry-After"))
            raise RemoteRateLimited(text, retry_after_ms=retry)
        if status >= 500:
            raise TransientError(text)
        raise RemoteRequestError(text, status=status, errcode=errcode)

    # --- account and rooms ----------------------------------------------------------------

    async def whoami(self) -> str:
        """The user ID the token belongs to."""
        body = await self._object("GET", f"{_API}/account/whoami")
        user_id = _str_field(body, "user_id", "whoami")
        if not user_id.startswith("@"):
            raise RemoteProtocolError(f"{self.name}: whoami answered a malformed user_id")
        return user_id

    async def join(self, room_id_or_alias: str) -> str:
        """Join a room by ID or alias; returns the room ID."""
        server = _server_part(room_id_or_alias)
        # via replaced server_name (MSC4156); Synapse reads via first, older servers server_name.
        query = {"server_name": server, "via": server} if server else None
        body = await self._object(
            "POST", f"{_API}/join/{_segment(room_id_or_alias)}", json_body={}, query=query
        )
        return self._room_id(body, "join")

    def _room_id(self, body: dict[str, Any], what: str) -> str:
        room_id = _str_field(body, "room_id", what)
        if not room_id.startswith("!"):
            raise RemoteProtocolError(f"{self.name}: {what} answered a malformed room_id")
        return room_id

    async def resolve_alias(self, alias: str) -> str:
        """The room ID an alias points at; RemoteRequestError M_NOT_FOUND when none."""
        body = await self._object("GET", f"{_API}/directory/room/{_segment(alias)}")
        return self._room_id(body, "alias lookup")

    async def leave(self, room_id: str) -> None:
        await self._object("POST", f"{_API}/rooms/{_segment(room_id)}/leave", json_body={})

    # --- events ---------------------------------------------------------------------------

    async def sync(self, since: str | None, filter_json: str, timeout_ms: int) -> dict[str, Any]:
        """One long-poll of /sync; the raw answer (its next_batch checked to be a string)."""
        query = {"filter": filter_json, "timeout": str(max(0, int(timeout_ms)))}
        if since is not None:
            query["since"] = since
        body = await self._object(
            "GET",
            f"{_API}/sync",
            query=query,
            max_bytes=SYNC_MAX_BYTES,
            total_timeout=self.request_timeout + max(0, timeout_ms) / 1000,
        )
        _str_field(body, "next_batch", "sync")
        return body

    async def messages(
        self,
        room_id: str,
        from_token: str | None,
        direction: str,
        limit: int,
        filter_json: str | None = None,
    ) -> dict[str, Any]:
        """A page of /messages (for gaps /sync reports as limited); its chunk checked to be a
        list of objects."""
        if direction not in ("b", "f"):
            raise ValueError(f"direction must be 'b' or 'f', not {direction!r}")
        query = {"dir": direction, "limit": str(max(1, int(limit)))}
        if from_token is not None:
            query["from"] = from_token
        if filter_json is not None:
            query["filter"] = filter_json
        body = await self._object("GET", f"{_API}/rooms/{_segment(room_id)}/messages", query=query)
        chunk = body.get("chunk")
        if not isinstance(chunk, list) or not all(isinstance(ev, dict) for ev in chunk):
            raise RemoteProtocolError(f"{self.name}: /messages answered without a valid chunk")
        return body

    async def send_event(
        self, room_id: str, event_type: str, content: dict[str, Any], txn_id: str
    ) -> str:
        """Send a message event; the same txn_id from the same login returns the same event."""
        path = f"{_API}/rooms/{_segment(room_id)}/send/{_segment(event_type)}/{_segment(txn_id)}"
        body = await self._object("PUT", path, json_body=content)
        return self._event_id(body, "send")

    async def redact(
        self, room_id: str, event_id: str, txn_id: str, reason: str | None = None
    ) -> str:
        """Redact an event; returns the redaction's event ID."""
        path = f"{_API}/rooms/{_segment(room_id)}/redact/{_segment(event_id)}/{_segment(txn_id)}"
        content = {"reason": reason} if reason is not None else {}
        body = await self._object("PUT", path, json_body=content)
        return self._event_id(body, "redact")

    def _event_id(self, body: dict[str, Any], what: str) -> str:
        event_id = _str_field(body, "event_id", what)
        if not event_id.startswith("$"):
            raise RemoteProtocolError(f"{self.name}: {what} answered a malformed event_id")
        return event_id

    # --- state and members ----------------------------------------------------------------

    async def get_state(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        """One state event's content, or None when the room has no such state."""
        path = (
            f"{_API}/rooms/{_segment(room_id)}/state/{_segment(event_type)}/"
            f"{quote(state_key, safe='')}"
        )
        try:
            return await self._object("GET", path)
        except RemoteRequestError as e:
            if e.status == 404 or e.errcode == "M_NOT_FOUND":
                return None
            raise

    async def room_state(self, room_id: str) -> list[dict[str, Any]]:
        """The room's current state events (entries that are not objects are dropped)."""
        path = f"{_API}/rooms/{_segment(room_id)}/state"
        body = await self._request("GET", path)
        if not isinstance(body, list):
            raise RemoteProtocolError(f"{self.name}: room state is not a JSON list")
        return [event for event in body if isinstance(event, dict)]

    async def joined_members(self, room_id: str) -> dict[str, dict[str, str | None]]:
        """user_id -> {"display_name": str | None, "avatar_url": str | None}."""
        body = await self._object("GET", f"{_API}/rooms/{_segment(room_id)}/joined_members")
        joined = body.get("joined")
        if not isinstance(joined, dict):
            raise RemoteProtocolError(f"{self.name}: joined_members answered without 'joined'")
        members: dict[str, dict[str, str | None]] = {}
        for user_id, info in joined.items():
            if not isinstance(user_id, str) or not user_id.startswith("@"):
                continue
            info = info if isinstance(info, dict) else {}
            name = info.get("display_name")
            avatar = info.get("avatar_url")
            members[user_id] = {
                "display_name": name if isinstance(name, str) else None,
                "avatar_url": avatar if isinstance(avatar, str) else None,
            }
        return members

    async def get_profile(self, user_id: str) -> dict[str, str]:
        """The user's global displayname and avatar_url (only the string ones); {} on 404."""
        try:
            body = await self._object("GET", f"{_API}/profile/{_segment(user_id)}")
        except RemoteRequestError as e:
            if e.status == 404:
                return {}
            raise
        return {
            key: value
            for key in ("displayname", "avatar_url")
            if isinstance(value := body.get(key), str)
        }

    # --- media ----------------------------------------------------------------------------

    async def download(self, mxc: str, max_bytes: int) -> tuple[bytes, str] | None:
        """(data, content type) through authenticated media, or None when larger than
        max_bytes (the download stops there). A malformed URI is refused before any request."""
        match = _MXC.fullmatch(mxc) if isinstance(mxc, str) else None
        if match is None:
            raise PermanentError(f"{self.name}: not a valid mxc:// URI")
        server, media_id = (quote(part, safe="") for part in match.groups())
        path = f"/_matrix/client/v1/media/download/{server}/{media_id}"
        try:
            # Redirects are allowed here (the spec lets media be served elsewhere); aiohttp
            # drops the Authorization header when one leaves this origin.
            async with self._session.get(
                self._url(path, None),
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                max_redirects=3,
                raise_for_status=False,
            ) as resp:
                if resp.status != 200:
                    await self._raise_for_status("GET", path, resp)
                data = await self._read_capped(resp, max_bytes)
                mime = resp.content_type
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise TransientError(
                f"{self.name}: homeserver unreachable: {e or type(e).__name__}"
            ) from e
        if data is None:
            log.debug("%s: %s is larger than %d bytes", self.name, mxc, max_bytes)
            return None
        if _MIME.fullmatch(mime) is None:
            mime = "application/octet-stream"
        return data, mime

    async def upload(self, data: bytes, content_type: str, filename: str) -> str:
        """Upload media; returns its mxc:// URI."""
        body = await self._object(
            "POST",
            "/_matrix/media/v3/upload",
            data=data,
            content_type=content_type,
            query={"filename": filename},
        )
        uri = _str_field(body, "content_uri", "upload")
        if _MXC.fullmatch(uri) is None:
            raise RemoteProtocolError(f"{self.name}: upload answered a malformed content_uri")
        return uri
