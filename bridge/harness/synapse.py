"""Launch a real Synapse homeserver for tests and the demo, plus a small async Matrix client."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import hmac
import http.client
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import aiohttp
import yaml

from bridge.harness.ports import free_port


def _unlimited() -> dict[str, float | int]:
    """Far above anything a test or the demo does (a fresh dict: no YAML anchors)."""
    return {"per_second": 100_000.0, "burst_count": 1_000_000}


def _rate_limits() -> dict[str, Any]:
    """Every rate limiter Synapse 1.163 reads from its config (synapse/config/ratelimiting.py)."""
    return {
        "rc_message": _unlimited(),
        "rc_registration": _unlimited(),
        "rc_registration_token_validity": _unlimited(),
        "rc_login": {
            "address": _unlimited(),
            "account": _unlimited(),
            "failed_attempts": _unlimited(),
        },
        "rc_admin_redaction": _unlimited(),
        "rc_joins": {"local": _unlimited(), "remote": _unlimited()},
        "rc_joins_per_room": _unlimited(),
        "rc_key_requests": _unlimited(),
        "rc_3pid_validation": _unlimited(),
        "rc_invites": {
            "per_room": _unlimited(),
            "per_user": _unlimited(),
            "per_issuer": _unlimited(),
        },
        "rc_third_party_invite": _unlimited(),
        "rc_media_create": _unlimited(),
        "rc_presence": {"per_user": _unlimited()},
        "rc_delayed_event_mgmt": _unlimited(),
        "rc_room_creation": _unlimited(),
        "rc_reports": _unlimited(),
        "rc_user_directory": _unlimited(),
        "rc_profile": _unlimited(),
    }


_LOG_FORMAT = "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"

# Never route loopback requests through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MatrixRequestError(Exception):
    """A homeserver answered with an HTTP error; carries the status and the Matrix errcode."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.errcode: str | None = None
        self.error: str | None = None
        if isinstance(body, dict):
            errcode = body.get("errcode")
            error = body.get("error")
            self.errcode = errcode if isinstance(errcode, str) else None
            self.error = error if isinstance(error, str) else None
        detail = self.error if self.error is not None else str(body)[:500]
        super().__init__(f"{method} {path} -> HTTP {status} {self.errcode or '-'}: {detail}")


def _decode_body(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _request_json(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    *,
    token: str | None = None,
    timeout: float = 30,
) -> dict[str, Any]:
    """Blocking JSON request; raises MatrixRequestError on an HTTP error status."""
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    path = urllib.parse.urlsplit(url).path
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            raw: bytes = response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            error_body = _decode_body(exc.read())
        raise MatrixRequestError(method, path, exc.code, error_body) from None
    decoded = _decode_body(raw)
    if not isinstance(decoded, dict):
        raise MatrixRequestError(method, path, 200, f"not a JSON object: {decoded!r}")
    return decoded


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text.splitlines()[-lines:]) or f"({path.name} is empty)"


def _postgres_database_config(url: str) -> dict[str, Any]:
    """Turn postgresql://user:password@host:port/dbname?opt=v into Synapse's psycopg2 config."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"database must be 'sqlite' or a postgresql:// URL, got {url!r}")
    dbname = urllib.parse.unquote(parts.path.lstrip("/"))
    if not dbname:
        raise ValueError(f"database URL has no database name: {url!r}")
    args: dict[str, Any] = {"database": dbname, "cp_min": 1, "cp_max": 10}
    if parts.username:
        args["user"] = urllib.parse.unquote(parts.username)
    if parts.password:
        args["password"] = urllib.parse.unquote(parts.password)
    if parts.hostname:
        args["host"] = parts.hostname
    if parts.port:
        args["port"] = parts.port
    for key, value in urllib.parse.parse_qsl(parts.query):
        args[key] = value
    return {"name": "psycopg2", "args": args}


@dataclass
class SynapseServer:
    """A Synapse homeserver run as a child process, its data and config kept in data_dir."""

    data_dir: Path
    server_name: str = "localhost"
    port: int = 0
    app_service_config_files: list[Path] = field(default_factory=list)
    database: str = "sqlite"
    registration_shared_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    python: str = sys.executable
    _process: subprocess.Popen[bytes] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _output: IO[bytes] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir.resolve() / "homeserver.yaml"

    @property
    def log_config_path(self) -> Path:
        return self.data_dir.resolve() / "log.config.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's own log (WARNING and above)."""
        return self.data_dir.resolve() / "homeserver.log"

    @property
    def output_path(self) -> Path:
        """The child process's stdout and stderr (start-up crashes land here)."""
        return self.data_dir.resolve() / "synapse.out"

    @property
    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def user_id(self, localpart: str) -> str:
        return f"@{localpart.lower()}:{self.server_name}"

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.output_path} ---\n{_tail(self.output_path, lines)}\n"
            f"--- {self.log_path} ---\n{_tail(self.log_path, lines)}"
        )

    def generate_config(self) -> None:
        """Create homeserver.yaml once, then (re)apply the harness settings to it."""
        data_dir = self.data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.port == 0:
            self.port = free_port()
        if not self.config_path.exists():
            result = subprocess.run(
                [
                    self.python,
                    "-m",
                    "synapse.app.homeserver",
                    "--server-name",
                    self.server_name,
                    "--config-path",
                    str(self.config_path),
                    "--generate-config",
                    "--report-stats=no",
                    "--data-directory",
                    str(data_dir),
                ],
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"synapse --generate-config failed with code {result.returncode}:\n"
                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
                )

        config = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise RuntimeError(f"{self.config_path} is not a YAML mapping")
        config["server_name"] = self.server_name
        config["public_baseurl"] = f"{self.base_url}/"
        config["listeners"] = [
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        config["trusted_key_servers"] = []
        config["suppress_key_server_warning"] = True
        config["presence"] = {"enabled": False}
        config["url_preview_enabled"] = False
        config["federation_domain_whitelist"] = []
        config["registration_shared_secret"] = self.registration_shared_secret
        config["enable_registration"] = False
        config.update(_rate_limits())
        config["app_service_config_files"] = [
            str(Path(p).resolve()) for p in self.app_service_config_files
        ]
        config["enable_media_repo"] = True
        config["max_upload_size"] = "50M"
        config["report_stats"] = False
        config["enable_metrics"] = False
        # Cheap password hashing: registration and login are on every test's path.
        config["bcrypt_rounds"] = 4
        config["pid_file"] = str(data_dir / "homeserver.pid")
        config["media_store_path"] = str(data_dir / "media_store")
        config["signing_key_path"] = str(data_dir / f"{self.server_name}.signing.key")
        if self.database == "sqlite":
            config["database"] = {
                "name": "sqlite3",
                "args": {"database": str(data_dir / "homeserver.db")},
            }
        else:
            config["database"] = _postgres_database_config(self.database)
        config["log_config"] = str(self.log_config_path)

        log_config = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"precise": {"format": _LOG_FORMAT}},
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
            "root": {"level": "WARNING", "handlers": ["file"]},
        }
        self.log_config_path.write_text(
            yaml.safe_dump(log_config, sort_keys=False), encoding="utf-8"
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def start(self, timeout: float = 60) -> None:
        """Start Synapse and wait until the client API answers; RuntimeError with logs if not."""
        if self.is_running:
            raise RuntimeError(f"Synapse is already running on {self.base_url}")
        self.stop()  # reap a process that died by itself, close its output file
        self.generate_config()
        data_dir = self.data_dir.resolve()
        output = self.output_path.open("ab")
        try:
            output.write(f"--- starting Synapse on {self.base_url} ---\n".encode())
            output.flush()
            self._process = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "synapse.app.homeserver",
                    "--config-path",
                    str(self.config_path),
                ],
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            output.close()
            raise
        self._output = output
        atexit.register(self._kill_at_exit)

        deadline = time.monotonic() + timeout
        versions_url = f"{self.base_url}/_matrix/client/versions"
        while True:
            code = self._process.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(
                    f"Synapse exited with code {code} during start-up\n{self.log_tail()}"
                )
            if self._answers(versions_url):
                return
            if time.monotonic() >= deadline:
                self.stop(kill=True)
                raise RuntimeError(
                    f"Synapse did not answer {versions_url} within {timeout} s\n{self.log_tail()}"
                )
            time.sleep(0.1)

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with _OPENER.open(url, timeout=2) as response:
                status: int = response.status
                response.read()
        except urllib.error.HTTPError as exc:
            exc.close()
            return False
        except (OSError, http.client.HTTPException):
            return False
        return status == 200

    def stop(self, kill: bool = False, timeout: float = 15) -> None:
        """Stop Synapse (SIGTERM, or SIGKILL when kill) and wait for it; safe to call twice."""
        process = self._process
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout)
        finally:
            self._process = None
            if self._output is not None:
                self._output.close()
                self._output = None
            atexit.unregister(self._kill_at_exit)

    def _kill_at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.stop(kill=True)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def register_user(self, localpart: str, password: str, admin: bool = False) -> str:
        """Register through the shared-secret admin API; returns the MXID (also if it exists)."""
        url = f"{self.base_url}/_synapse/admin/v1/register"
        nonce = str(_request_json("GET", url)["nonce"])
        mac = hmac.new(self.registration_shared_secret.encode("utf-8"), digestmod=hashlib.sha1)
        mac.update(nonce.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(localpart.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(password.encode("utf-8"))
        mac.update(b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        try:
            response = _request_json("POST", url, body)
        except MatrixRequestError as exc:
            if exc.errcode == "M_USER_IN_USE":
                return self.user_id(localpart)
            raise
        return str(response["user_id"])

    def login(self, localpart: str, password: str) -> str:
        """Log in with a password and return a fresh access token."""
        response = _request_json(
            "POST",
            f"{self.base_url}/_matrix/client/v3/login",
            {
                "type": "m.login.password",
                "identifier": {"type": "m.id.user", "user": localpart},
                "password": password,
                "initial_device_display_name": "passerelle harness",
            },
        )
        return str(response["access_token"])

    def whoami(self, token: str) -> str | None:
        """The user an access token belongs to; None when Synapse does not accept it."""
        try:
            response = _request_json(
                "GET", f"{self.base_url}/_matrix/client/v3/account/whoami", token=token
            )
        except MatrixRequestError as exc:
            if exc.status == 401:
                return None
            raise
        return str(response["user_id"])


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _summarise(events: Sequence[dict[str, Any]], limit: int = 15) -> str:
    if not events:
        return "  (no events)"
    lines = []
    for event in events[-limit:]:
        content = event.get("content") or {}
        detail = content.get("body", content.get("membership", ""))
        state_key = event.get("state_key")
        key = f" [{state_key}]" if state_key else ""
        lines.append(
            f"  {event.get('type')}{key} from {event.get('sender')}: {str(detail)[:100]!r}"
        )
    return "\n".join(lines)


class MatrixTestClient:
    """A person-like Matrix client for tests: one user, one aiohttp session."""

    def __init__(self, base_url: str, access_token: str, user_id: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.user_id = user_id
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Query parameters of every request (an appservice's `user_id` when it acts as one).
        self.query: dict[str, str] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError(f"MatrixTestClient for {self.user_id} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.access_token}"},
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Call the client API (path from /_matrix/...); MatrixRequestError on error status."""
        session = self._get_session()
        params = {**self.query, **params} if params else self.query or None
        async with session.request(
            method, self.base_url + path, json=json_body, params=params
        ) as response:
            body = _decode_body(await response.read())
            if response.status >= 400:
                raise MatrixRequestError(method, path, response.status, body)
        if not isinstance(body, dict):
            raise MatrixRequestError(method, path, response.status, f"not a JSON object: {body}")
        return body

    async def create_room(
        self,
        *,
        invite: Sequence[str] = (),
        is_direct: bool = False,
        name: str | None = None,
        encrypted: bool = False,
        public: bool = False,
        alias_localpart: str | None = None,
    ) -> str:
        """A new room: private (invite only) unless public (anyone may join); alias_localpart
        publishes #alias_localpart:server for it."""
        if public:
            preset = "public_chat"
        else:
            preset = "trusted_private_chat" if is_direct else "private_chat"
        body: dict[str, Any] = {"preset": preset, "invite": list(invite), "is_direct": is_direct}
        if name is not None:
            body["name"] = name
        if alias_localpart is not None:
            body["room_alias_name"] = alias_localpart
        if encrypted:
            body["initial_state"] = [
                {
                    "type": "m.room.encryption",
                    "state_key": "",
                    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
                }
            ]
        response = await self.request("POST", "/_matrix/client/v3/createRoom", json_body=body)
        return str(response["room_id"])

    async def invite(self, room_id: str, user_id: str) -> None:
        await self.request(
            "POST",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/invite",
            json_body={"user_id": user_id},
        )

    async def join(self, room_id: str) -> None:
        await self.request("POST", f"/_matrix/client/v3/join/{_quote(room_id)}", json_body={})

    async def leave(self, room_id: str) -> None:
        await self.request(
            "POST", f"/_matrix/client/v3/rooms/{_quote(room_id)}/leave", json_body={}
        )

    async def send_text(
        self,
        room_id: str,
        body: str,
        *,
        msgtype: str = "m.text",
        extra: dict[str, Any] | None = None,
    ) -> str:
        content: dict[str, Any] = {"msgtype": msgtype, "body": body}
        if extra:
            content.update(extra)
        return await self.send_event(room_id, "m.room.message", content)

    async def send_event(self, room_id: str, event_type: str, content: dict[str, Any]) -> str:
        txn_id = f"harness-{uuid.uuid4().hex}"
        response = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/send/{_quote(event_type)}/{txn_id}",
            json_body=content,
        )
        return str(response["event_id"])

    async def redact(self, room_id: str, event_id: str, reason: str | None = None) -> str:
        """Redact an event; returns the redaction's event ID."""
        response = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/redact/{_quote(event_id)}/"
            f"harness-{uuid.uuid4().hex}",
            json_body={"reason": reason} if reason is not None else {},
        )
        return str(response["event_id"])

    async def logout(self) -> None:
        """Invalidate this client's access token (other logins of the user keep working)."""
        await self.request("POST", "/_matrix/client/v3/logout", json_body={})

    async def send_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        response = await self.request(
            "PUT",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/{_quote(event_type)}/"
            f"{_quote(state_key)}",
            json_body=content,
        )
        return str(response["event_id"])

    async def messages(self, room_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The room's latest events (timeline incl. state events), oldest first."""
        response = await self.request(
            "GET",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/messages",
            params={"dir": "b", "limit": str(limit)},
        )
        chunk = response.get("chunk", [])
        return [event for event in reversed(chunk) if isinstance(event, dict)]

    async def wait_for_event(
        self,
        room_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 20,  # noqa: ASYNC109 - part of the agreed API; it bounds the polling
    ) -> dict[str, Any]:
        """Poll until an event matches predicate (oldest match wins); AssertionError if none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        events: list[dict[str, Any]] = []
        last_error: MatrixRequestError | None = None
        while True:
            try:
                events = await self.messages(room_id)
                last_error = None
            except MatrixRequestError as exc:
                # Not (yet) in the room: keep polling, it may be joining right now.
                if exc.status not in (403, 404):
                    raise
                last_error = exc
            else:
                for event in events:
                    if predicate(event):
                        return event
            if loop.time() >= deadline:
                error = f"\nlast error: {last_error}" if last_error else ""
                raise AssertionError(
                    f"{self.user_id}: no matching event in {room_id} within {timeout} s; "
                    f"recent events:\n{_summarise(events)}{error}"
                )
            await asyncio.sleep(0.2)

    async def download(self, mxc: str) -> bytes:
        """Media through the authenticated endpoint (the v3 one is gone on this Synapse)."""
        if not mxc.startswith("mxc://"):
            raise ValueError(f"not an mxc:// URI: {mxc!r}")
        server, _, media_id = mxc[len("mxc://") :].partition("/")
        path = f"/_matrix/client/v1/media/download/{_quote(server)}/{_quote(media_id)}"
        async with self._get_session().get(self.base_url + path) as response:
            data = await response.read()
            if response.status >= 400:
                raise MatrixRequestError("GET", path, response.status, _decode_body(data))
            return data

    async def upload(self, data: bytes, content_type: str, filename: str) -> str:
        """Upload media; returns its mxc:// URI."""
        session = self._get_session()
        async with session.post(
            self.base_url + "/_matrix/media/v3/upload",
            data=data,
            params={"filename": filename},
            headers={"Content-Type": content_type},
        ) as response:
            body = _decode_body(await response.read())
            if response.status >= 400 or not isinstance(body, dict):
                raise MatrixRequestError("POST", "/upload", response.status, body)
        return str(body["content_uri"])

    async def set_displayname(self, name: str) -> None:
        """The user's global display name (copied into the rooms they are in)."""
        await self.request(
            "PUT",
            f"/_matrix/client/v3/profile/{_quote(self.user_id)}/displayname",
            json_body={"displayname": name},
        )

    async def joined_members(self, room_id: str) -> list[str]:
        response = await self.request(
            "GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/joined_members"
        )
        joined = response.get("joined", {})
        return sorted(joined) if isinstance(joined, dict) else []

    async def wait_for_membership(
        self,
        room_id: str,
        user_id: str,
        membership: str,
        timeout: float = 20,  # noqa: ASYNC109 - part of the agreed API; it bounds the polling
    ) -> None:
        """Poll the member state event until its membership is as wanted."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        path = f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/m.room.member/{_quote(user_id)}"
        current: str | None = None
        while True:
            try:
                content = await self.request("GET", path)
                current = str(content.get("membership"))
            except MatrixRequestError as exc:
                if exc.status not in (403, 404):
                    raise
                current = f"unknown ({exc.status} {exc.errcode})"
            if current == membership:
                return
            if loop.time() >= deadline:
                raise AssertionError(
                    f"{self.user_id}: {user_id} in {room_id} is {current}, "
                    f"not {membership}, after {timeout} s"
                )
            await asyncio.sleep(0.2)
