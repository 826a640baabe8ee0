"""The demo's legacy system: a room with an inbound and an outbound webhook made through the
provisioning API, and a small receiver in the demo process that verifies what the bridge POSTs."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from bridge.config import Config
from bridge.core.tasks import wait_for
from bridge.registration import atomic_write
from bridge.webhooks.signature import SignatureError, decode_secret, verify_headers

if TYPE_CHECKING:  # the harness needs the demo's extras; demo.py imports this module first
    from bridge.harness.synapse import MatrixTestClient

HOOK_ROOM_NAME = "Supervision (demo)"
INBOUND_HOOK = "alertes"
OUTBOUND_HOOK = "ticketing"
LEGACY_PATH = "/legacy"
ROOM_FILE = "hooks-room"
PROVISIONING_SECRET_FILE = "provisioning-secret"  # the config's provisioning.shared_secret_file
INBOUND_SECRET_FILE = f"{INBOUND_HOOK}.whsec"  # shown once by the API: kept for the next runs
ALERT = "Alerte : disque plein sur srv-42"
ANSWER = "Pris en charge"
TIMEOUT = 30.0
PROVISION_PATH = "/_passerelle/provision/v1"


def provisioning_secret(folder: Path) -> Path:
    """The provisioning API's shared secret, made on the first run (mode 0600): its file."""
    path = folder / PROVISIONING_SECRET_FILE
    if not path.exists():
        atomic_write(path, secrets.token_hex(32) + "\n")
    return path


def config_sections(folder: Path, receiver_port: int) -> dict[str, Any]:
    """The demo config's `provisioning:` and `webhooks:` sections."""
    return {
        "provisioning": {"shared_secret_file": provisioning_secret(folder).name},
        "webhooks": {"egress": [f"http://127.0.0.1:{receiver_port}{LEGACY_PATH}"]},
    }


class LegacyReceiver:
    """What a legacy system does with outbound hooks: POST /legacy/{hook} verified with the
    hook's secret; what passes is kept (and printed once `echo` is set)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.keys: dict[str, bytes] = {}
        self.received: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.echo = False
        self._arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(LEGACY_PATH + "/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        key = self.keys.get(name)
        if key is None:
            return web.json_response({"error": "unknown hook"}, status=404)
        body = await request.read()
        try:
            verify_headers(key, request.headers, body, now=time.time(), tolerance=300)
        except SignatureError as e:
            self._refuse(f"{name}: {e}")
            return web.json_response({"error": "not verified"}, status=401)
        payload = json.loads(body)  # the bridge signed it: JSON of the README's shape
        self.received.append(payload)
        self._arrived.set()
        if self.echo:
            data = payload["data"]
            shown = data.get("text")
            shown = data.get("redacts") if shown is None else json.dumps(shown, ensure_ascii=False)
            print(
                f"  legacy system ← {payload['type']} from {data['sender']}: {shown}", flush=True
            )
        return web.json_response({"ok": True})

    def _refuse(self, why: str) -> None:
        self.refused.append(why)
        if self.echo:
            print(f"  legacy system refused a request: {why}", flush=True)

    async def wait_for_event(self, event_id: str, within: float) -> dict[str, Any]:
        """The verified delivery of that Matrix event; RuntimeError if none came in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            for payload in self.received:
                if payload.get("data", {}).get("event_id") == event_id:
                    return payload
            self._arrived.clear()
            try:
                await wait_for(self._arrived.wait(), deadline - loop.time())
            except TimeoutError:
                refused = f" (refused: {'; '.join(self.refused)})" if self.refused else ""
                raise RuntimeError(
                    f"the legacy receiver got no verified delivery of {event_id} from webhook "
                    f"{OUTBOUND_HOOK} within {within:.0f} s{refused}"
                ) from None


@dataclass(frozen=True)
class HooksDemo:
    """What the summary tells about the webhook room."""

    room_id: str
    inbound_url: str
    secret_file: Path
    send_command: str  # a shell line that signs and sends an inbound request
    provisioning_secret_file: Path
    provisioning_url: str
    delivered: dict[str, Any]  # what the legacy receiver got for the demo user's answer


class _Provisioning:
    """The provisioning API over HTTP, as the demo user."""

    def __init__(self, session: aiohttp.ClientSession, config: Config, user_id: str) -> None:
        self.session = session
        self.base = config.appservice.address.rstrip("/") + PROVISION_PATH
        secret = config.provisioning.shared_secret
        assert secret is not None
        self.headers = {"Authorization": f"Bearer {secret}"}
        self.user_id = user_id

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.session.request(
            method,
            self.base + path,
            params={"user_id": self.user_id},
            json=body,
            headers=self.headers,
        ) as response:
            text = await response.text()
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # not the API's own answer (is it on?)
            answer = {"error": text[:200]}
        return response.status, answer


def send_script(secret_file: Path, url: str) -> str:
    """Python (no single quote: it is shown in one) that signs `{"text": argv[1]}` with the
    hook's secret as Standard Webhooks prescribes, POSTs it and prints the status."""
    return ";".join(
        [
            "import base64,hashlib,hmac,json,sys,time,urllib.request as r",
            f"k=base64.b64decode(open({json.dumps(str(secret_file))}).read().strip()[6:])",
            'b=json.dumps({"text":sys.argv[1],"sender":"Supervision"}).encode()',
            'i="msg_%d"%time.time_ns()',
            "t=str(int(time.time()))",
            's=base64.b64encode(hmac.new(k,f"{i}.{t}.".encode()+b,hashlib.sha256).digest())',
            f"q=r.Request({json.dumps(url)},b,"
            '{"content-type":"application/json","webhook-id":i,"webhook-timestamp":t,'
            '"webhook-signature":"v1,"+s.decode()})',
            "print(r.urlopen(q).status)",
        ]
    )


async def _hook_room(folder: Path, client: MatrixTestClient, bot: str) -> str:
    """The webhook room, with the bot in it (made once, kept in the state folder)."""
    saved = folder / ROOM_FILE
    if saved.exists():
        return saved.read_text(encoding="utf-8").strip()
    room_id = await client.create_room(invite=[bot], name=HOOK_ROOM_NAME)
    await client.wait_for_membership(room_id, bot, "join", timeout=TIMEOUT)
    atomic_write(saved, room_id + "\n")
    return room_id


async def _inbound_hook(folder: Path, api: _Provisioning, room_id: str) -> Path:
    """Hook `alertes`, made once: its secret is kept in the state folder (the API shows it only
    when the hook is made; one made by a run that did not keep it is made again)."""
    path = folder / INBOUND_SECRET_FILE
    body = {"room_id": room_id, "name": INBOUND_HOOK}
    status, answer = await api.call("POST", "/webhooks", body)
    if status == 409 and not path.exists():
        await api.call("DELETE", f"/webhooks/{INBOUND_HOOK}")
        status, answer = await api.call("POST", "/webhooks", body)
    if status == 201:
        atomic_write(path, answer["secret"] + "\n")
    elif status != 409:
        raise RuntimeError(f"provisioning POST /webhooks ({INBOUND_HOOK}): {status} {answer}")
    return path


async def _outbound_hook(api: _Provisioning, room_id: str, receiver: LegacyReceiver) -> None:
    """Hook `ticketing`, made again each run: the receiver's port is new each time."""
    status, answer = await api.call("DELETE", f"/webhooks/{OUTBOUND_HOOK}")
    if status not in (200, 404):
        raise RuntimeError(f"provisioning DELETE /webhooks/{OUTBOUND_HOOK}: {status} {answer}")
    url = f"http://127.0.0.1:{receiver.port}{LEGACY_PATH}/{OUTBOUND_HOOK}"
    body = {"room_id": room_id, "name": OUTBOUND_HOOK, "url": url}
    status, answer = await api.call("POST", "/webhooks", body)
    if status != 201:
        raise RuntimeError(f"provisioning POST /webhooks ({OUTBOUND_HOOK}): {status} {answer}")
    receiver.keys[OUTBOUND_HOOK] = decode_secret(answer["secret"])


async def _outbox_settled(api: _Provisioning) -> None:
    """Wait until the bridge recorded the delivery the receiver got: stopped before, it would
    send it again on the next run, to this run's port, which the new egress list refuses."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        status, answer = await api.call("GET", "/status")
        if status == 200 and answer.get("webhook_outbox", {}).get("pending") == 0:
            return
        if loop.time() >= deadline:
            raise RuntimeError(
                f"webhook {OUTBOUND_HOOK}'s delivery was not recorded within {TIMEOUT:.0f} s: "
                f"{status} {answer.get('webhook_outbox')}"
            )
        await asyncio.sleep(0.1)


async def _send_alert(script: str, text: str) -> None:
    """Run the very line the summary prints."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=os.environ | {"no_proxy": "*"},  # urllib would send even 127.0.0.1 to a proxy
    )
    out, err = await wait_for(process.communicate(), TIMEOUT)
    if process.returncode != 0 or out.decode().strip() != "202":
        raise RuntimeError(f"the signed inbound request failed: {out.decode()}{err.decode()}")


async def _wait_in_room(
    client: MatrixTestClient, room_id: str, sender: str, marker: str
) -> dict[str, Any]:
    def match(event: dict[str, Any]) -> bool:
        body = str(event.get("content", {}).get("body", ""))
        return event.get("sender") == sender and marker in body

    try:
        return await client.wait_for_event(room_id, match, timeout=TIMEOUT)
    except AssertionError:
        raise RuntimeError(
            f"the signed request to webhook {INBOUND_HOOK} was accepted but its message did not "
            f"show up in {HOOK_ROOM_NAME} ({room_id}) from {sender} within {TIMEOUT:.0f} s"
        ) from None


async def run_hooks(
    folder: Path, config: Config, client: MatrixTestClient, receiver: LegacyReceiver
) -> HooksDemo:
    """The webhook room and its two hooks (through the provisioning API), then a message each
    way: a signed request posts in the room, the demo user's answer reaches the receiver."""
    room_id = await _hook_room(folder, client, config.bot_mxid)
    inbound_url = f"{config.appservice.address.rstrip('/')}/webhooks/v1/{INBOUND_HOOK}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        api = _Provisioning(session, config, client.user_id)
        secret_file = await _inbound_hook(folder, api, room_id)
        await _outbound_hook(api, room_id, receiver)
        script = send_script(secret_file, inbound_url)
        marker = secrets.token_hex(4)
        await _send_alert(script, f"{ALERT} ({marker})")
        ghost = config.hook_ghost_mxid(INBOUND_HOOK)
        alert = await _wait_in_room(client, room_id, ghost, marker)
        answer = await client.send_event(
            room_id,
            "m.room.message",
            {
                "msgtype": "m.text",
                "body": f"{ANSWER} ({marker})",
                "m.relates_to": {"m.in_reply_to": {"event_id": alert["event_id"]}},
            },
        )
        delivered = await receiver.wait_for_event(answer, TIMEOUT)
        await _outbox_settled(api)
    return HooksDemo(
        room_id=room_id,
        inbound_url=inbound_url,
        secret_file=secret_file,
        send_command=f"python3 -c {shlex.quote(script)} 'Bonjour de la supervision'",
        provisioning_secret_file=folder / PROVISIONING_SECRET_FILE,
        provisioning_url=f"{config.appservice.address.rstrip('/')}{PROVISION_PATH}",
        delivered=delivered,
    )


def print_summary(hooks: HooksDemo, user_id: str) -> None:
    """The webhook part of the demo's summary: what was checked and how to try it."""
    data = hooks.delivered.get("data", {})
    print(
        f"\nThe room '{HOOK_ROOM_NAME}' ({hooks.room_id}) has two webhooks, made through the "
        f"provisioning API: a signed request to the inbound hook '{INBOUND_HOOK}' was posted "
        f"there by its ghost (“{ALERT} (…)”), and {user_id}'s answer went to the outbound "
        f"hook '{OUTBOUND_HOOK}', whose legacy system (a receiver in this process) verified it: "
        f"{hooks.delivered.get('type')} “{data.get('text')}”."
    )
    print(f"  Inbound URL: {hooks.inbound_url}  (secret in {hooks.secret_file})")
    print("  Send one, signed as Standard Webhooks prescribes (README, Webhooks):")
    print(f"    {hooks.send_command}")
    print(
        "  What you write in that room is POSTed, signed, to the legacy system, which prints "
        "each delivery here."
    )
    secret = shlex.quote(str(hooks.provisioning_secret_file))
    print(f"  Provisioning API (its secret in {hooks.provisioning_secret_file}):")
    print(
        f'    curl -sS -H "Authorization: Bearer $(cat {secret})" '
        f"'{hooks.provisioning_url}/webhooks?user_id={user_id}'"
    )
