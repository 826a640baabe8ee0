"""Two bridge instances on one PostgreSQL database behind a round-robin balancer: they share
the work, one is killed (SIGKILL) mid-stream, the other takes its leases over, and every mail,
message and webhook request is relayed once, in order."""

from __future__ import annotations

import asyncio
import copy
import email
import email.policy
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.db.schema import lease, mail_outbox
from bridge.harness.dovecot import DovecotServer
from bridge.harness.ports import free_port
from bridge.registration import atomic_write, dump_yaml
from bridge.webhooks.signature import sign
from tests.conftest import BridgeProcess, SynapseSetup, UserFactory, http_json
from tests.e2e.test_bot import message_from, replies_to
from tests.e2e.test_mail_to_matrix import PASSWORD, MailSetup, bridge_config_with_mailbox
from tests.e2e.test_webhooks_in import KEY, SECRET
from tests.integration.test_smtp import ScriptedHandler, start_sink

FROM_ADDRESS = "passerelle@achats.gouv.fr"
STREAM = 12  # mails in, and messages out
KILL_AT = 4  # the holder is killed after this many of each


class Balancer:
    """A round-robin HTTP proxy in a thread of its own (the test's blocking calls must not
    stall it): each request goes to the next instance; one that refuses the connection, or
    drops it, is skipped (appservice transactions are idempotent, so a retry is safe)."""

    def __init__(self, port: int, backends: list[int]) -> None:
        self.port = port
        self.backends = backends
        self.served: dict[int, int] = dict.fromkeys(backends, 0)
        self._next = itertools.cycle(range(len(backends)))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("balancer did not start")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        first = next(self._next)
        for i in range(len(self.backends)):
            port = self.backends[(first + i) % len(self.backends)]
            url = f"http://127.0.0.1:{port}{request.path_qs}"
            try:
                async with self._session.request(
                    request.method, url, data=body, headers=headers
                ) as upstream:
                    payload = await upstream.read()
                    self.served[port] += 1
                    return web.Response(
                        status=upstream.status,
                        body=payload,
                        content_type=upstream.content_type,
                    )
            except (TimeoutError, aiohttp.ClientConnectionError):
                continue  # refused or dropped: the next instance
        return web.Response(status=502, text="no instance answered")


@pytest.fixture
def balanced(synapse_setup: SynapseSetup) -> Iterator[Balancer]:
    """The balancer on the port Synapse's registration points at, to two instance ports."""
    balancer = Balancer(synapse_setup.config.appservice.port, [free_port(), free_port()])
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop()


async def _post_hook(port: int, text: str) -> int:
    body = json.dumps({"text": text}).encode()
    webhook_id = f"msg_{uuid.uuid4().hex}"
    now = int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(now),
        "webhook-signature": sign(KEY, webhook_id, now, body),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/webhooks/v1/ci", data=body, headers=headers) as r,
    ):
        return r.status


async def _leases(db_url: str) -> dict[str, str]:
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(lease.c.name, lease.c.owner))).all()
    finally:
        await engine.dispose()
    return {str(name): str(owner) for name, owner in rows}


async def _queued_events(db_url: str) -> list[str]:
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(mail_outbox.c.event_id).order_by("id"))).all()
    finally:
        await engine.dispose()
    return [str(row[0]) for row in rows]


async def _until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout} s")
        await asyncio.sleep(0.25)


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_instances_share_the_work_and_survive_a_sigkill(
    synapse_setup: SynapseSetup,
    dovecot: DovecotServer,
    make_user: UserFactory,
    balanced: Balancer,
    db_url: str,
    tmp_path: Path,
) -> None:
    handler = ScriptedHandler()
    sink, smtp_port = start_sink(handler)
    user = f"list{uuid.uuid4().hex[:8]}"
    address = dovecot.add_user(user, PASSWORD)
    raw = bridge_config_with_mailbox(synapse_setup, dovecot, address)
    raw["mail"].update(
        {
            "smtp": {"host": "127.0.0.1", "port": smtp_port, "tls": "none"},
            "from_address": FROM_ADDRESS,
            "retry_delays": [0.5],
        }
    )
    # The room exists before the bridge (its inbound webhook is in the config); the bot is
    # invited once the instances run.
    alice = await make_user("alice")
    room_id = await alice.create_room(name="Achats")
    raw["webhooks"] = {"hooks": {"ci": {"room": room_id, "secret": SECRET}}}
    instances: dict[str, BridgeProcess] = {}
    for name, port in zip(("one", "two"), balanced.backends, strict=True):
        config = copy.deepcopy(raw)
        config["appservice"]["port"] = port
        config["instance"] = {"leases": True, "id": name, "lease_ttl": 6, "lease_renew": 2}
        path = tmp_path / f"config-{name}.yaml"
        atomic_write(path, dump_yaml(config))
        instances[name] = BridgeProcess(path, db_url, tmp_path / f"bridge-{name}.log")
    one, two = instances["one"], instances["two"]
    try:
        one.start()  # alone at first: it holds every lease
        two.start()
        bot = synapse_setup.config.bot_mxid
        await alice.invite(room_id, bot)
        await alice.wait_for_membership(room_id, bot, "join")
        await alice.wait_for_event(room_id, message_from(bot))
        question = await alice.send_text(
            room_id, f"!passerelle link {address} allow achats.gouv.fr"
        )
        answer = await alice.wait_for_event(room_id, replies_to(question, bot))
        assert "Linked" in answer["content"]["body"], answer["content"]["body"]
        setup = MailSetup(one, dovecot, address, user, alice, room_id, bot)

        # The link made through one instance reaches the other ("changed" notification), and
        # the two split the work: the mailbox is handed to the second instance.
        mailbox = f"mailbox:{address}"

        async def split() -> bool:
            held = await _leases(db_url)
            return held.get(mailbox) == "two" and held.get("worker:dispatcher") == "one"

        await _until("the mailbox handed to the second instance", split, 30)
        for process, here in ((one, False), (two, True)):
            _, health = http_json(process.base_url + "/health")
            assert health["mailboxes"][address]["here"] is here
            assert ("worker:dispatcher" in health["instance"]["leases"]) is not here

        async def taken_over() -> bool:
            held = await _leases(db_url)
            return all(owner == "two" for name, owner in held.items() if name != "instance:one")

        async def takeover_time(killed_at: float) -> float:
            await _until("the second instance holding every lease", taken_over, 30)
            return time.monotonic() - killed_at

        sent_events: list[str] = []
        watch: asyncio.Task[float] | None = None
        for i in range(STREAM):
            if i == KILL_AT:
                assert (await _leases(db_url))["worker:outbox"] == "one"
                one.stop(kill=True)
                watch = asyncio.create_task(takeover_time(time.monotonic()))
            await setup.deliver(setup.mail(f"Flux {i}", f"courrier numéro {i:02d}")[1])
            sent_events.append(await alice.send_text(room_id, f"message numéro {i:02d}"))
            # Through the balancer: taken by either instance, relayed by the lease holder.
            assert await _post_hook(balanced.port, f"requête numéro {i:02d}") == 202
            await asyncio.sleep(0.3)
        assert watch is not None
        takeover = await watch
        assert takeover < 30, takeover

        async def all_posted() -> list[str] | None:
            bodies = [e["content"].get("body", "") for e in await setup.events_from_ghosts()]
            found = [b for b in bodies if "courrier numéro" in b]
            return found if len({b for b in found}) >= STREAM else None

        async def all_mailed() -> list[Any] | None:
            with handler.lock:
                got = [m for m in handler.messages if b"message num" in m.content]
            ids = {email.message_from_bytes(m.content)["Message-ID"] for m in got}
            # Distinct Message-IDs: a repeated send (same ID) does not count twice.
            return got if len(ids) >= STREAM else None

        async def all_hooks() -> list[str] | None:
            bodies = [e["content"].get("body", "") for e in await alice.messages(room_id, 500)]
            found = [b for b in bodies if b.startswith("requête numéro")]
            return found if len(set(found)) >= STREAM else None

        posted = await _until("every mail posted", all_posted, 90)
        hooked = await _until("every webhook request posted", all_hooks, 60)
        mailed = await _until("every message mailed", all_mailed, 90)
        await asyncio.sleep(2)  # a duplicate would come now
        posted = await all_posted() or posted
        hooked = await all_hooks() or hooked
        assert hooked == [f"requête numéro {i:02d}" for i in range(STREAM)], hooked

        # Mail → Matrix: each once, in the order the mails arrived.
        numbers = [int(b.split("courrier numéro ")[1][:2]) for b in posted]
        assert numbers == list(range(STREAM)), numbers
        # Matrix → mail: each event queued once, in the room's order; each mail sent under
        # one Message-ID (an SMTP send cut by the kill may be repeated, with the same ID).
        assert await _queued_events(db_url) == sent_events
        with handler.lock:
            mailed = [m for m in handler.messages if b"message num" in m.content]
        by_number: dict[int, set[str]] = {}
        for message in mailed:
            parsed = email.message_from_bytes(message.content, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            plain = parsed.get_body(preferencelist=("plain",))
            assert plain is not None
            number = int(str(plain.get_content()).split("message numéro ")[1][:2])
            by_number.setdefault(number, set()).add(str(parsed["Message-ID"]))
        assert sorted(by_number) == list(range(STREAM))
        assert all(len(ids) == 1 for ids in by_number.values()), by_number
        # Synapse's transactions went through the balancer to both instances.
        assert all(count > 0 for count in balanced.served.values()), balanced.served
        print(f"takeover after SIGKILL: {takeover:.1f} s; served {balanced.served}")
    finally:
        for process in instances.values():
            process.stop()
        sink.stop()
