"""The `webhook` command's parsing and its refusals before any side effect; the hook
directory's keys during and after a rotation."""

from __future__ import annotations

import base64
from typing import Any

from bridge.config import parse_config
from bridge.core.commands import Command, CommandContext, CommandProcessor, parse_command
from bridge.core.errors import TransientError
from bridge.core.ids import RoomID, UserID
from bridge.core.permissions import PermissionLevel
from bridge.db.room_hooks import RoomHook
from bridge.relay.hook_admin import CheckTarget, HookAdmin
from bridge.relay.hook_commands import WebhookCommands, new_secret
from bridge.relay.link_commands import LinkCommands
from bridge.webhooks.directory import HookDirectory
from bridge.webhooks.egress import EgressRefused
from bridge.webhooks.signature import decode_secret
from tests.unit.test_config import minimal

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
ROOM = "!ops:example.org"
URL = "https://t.example.org/in?token=abc"


class Unexpected:
    """A database or client the refusals tested here must never touch."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected use of {name}")


def commands(
    power: int = 100,
    level: PermissionLevel = PermissionLevel.USER,
    check_target: CheckTarget | None = None,
) -> Any:
    outgoing = {"tickets": {"room": ROOM, "url": URL, "secret": SECRET}}
    config = parse_config(
        minimal(
            webhooks={
                "hooks": {"ci": {"room": ROOM, "secret": SECRET}},
                "outgoing": outgoing,
                "egress": ["https://t.example.org/"],
            }
        ),
        env={},
    )
    directory = HookDirectory(config.webhooks.hooks, outgoing=config.webhooks.outgoing)
    links = LinkCommands(config, Unexpected(), Unexpected(), Unexpected())  # type: ignore[arg-type]
    admin = HookAdmin(config, Unexpected(), directory, links, check_target=check_target)  # type: ignore[arg-type]
    hooks = WebhookCommands(config, Unexpected(), Unexpected(), directory, links, admin)  # type: ignore[arg-type]

    async def power_level() -> int:
        return power

    ctx = CommandContext(UserID("@a:example.org"), RoomID(ROOM), level, False, power_level)
    return hooks, ctx


def test_parsed_as_the_webhook_command() -> None:
    assert parse_command("!passerelle webhook new Build-7", "!passerelle", is_direct=False) == (
        Command("webhook", ("new", "Build-7"))
    )
    assert parse_command("webhook list", "!passerelle", is_direct=True) == Command(
        "webhook", ("list",)
    )


async def test_help_lists_the_webhook_commands() -> None:
    processor = CommandProcessor("!passerelle", Unexpected())  # type: ignore[arg-type]
    hooks, _ = commands()
    hooks.register(processor)
    reply = await processor.run(Command("help", ()), PermissionLevel.USER, is_direct=False)
    assert (
        "!passerelle webhook new NAME | out NAME URL | list | revoke NAME | rotate NAME"
        in reply.text
    )


async def test_usage_name_power_and_clash_refused_before_anything_is_written() -> None:
    hooks, ctx = commands()
    for args in [(), ("new",), ("frob", "x"), ("list", "x"), ("new", "a", "b")]:
        assert (await hooks.webhook(ctx, args)).text.startswith("Usage: webhook new NAME")
    assert "1 to 32 of a-z" in (await hooks.webhook(ctx, ("new", "no_underscore"))).text
    clash = await hooks.webhook(ctx, ("new", "CI"))
    assert clash.text == "A webhook named ci already exists; choose another name."
    assert "in the config file" in (await hooks.webhook(ctx, ("revoke", "ci"))).text
    assert "No webhook nope" in (await hooks.webhook(ctx, ("rotate", "nope"))).text
    weak, weak_ctx = commands(power=0)
    refused = await weak.webhook(weak_ctx, ("new", "deploy"))
    assert refused.text == "Managing webhooks needs the admin permission, or power level 50 here."
    listed = await hooks.webhook(ctx, ("list",))
    assert listed.text == (
        "Webhooks of this room:\n• ci — posts here — from the config file\n"
        "• tickets — receives this room's messages at https://t.example.org/in?… — from the "
        "config file"
    )
    assert "whsec_" not in listed.text
    assert "token" not in listed.text


async def test_outbound_refusals_before_anything_is_written() -> None:
    hooks, ctx = commands()
    for args in [("out", "x"), ("out", "x", "https://a", "b")]:
        assert (await hooks.webhook(ctx, args)).text.startswith("Usage: webhook new NAME")
    assert "not available" in (await hooks.webhook(ctx, ("out", "x", "https://a/"))).text
    clash = await hooks.webhook(ctx, ("out", "tickets", "https://t.example.org/"))
    assert clash.text == "A webhook named tickets already exists; choose another name."
    assert "config file" in (await hooks.webhook(ctx, ("rotate", "tickets"))).text

    async def refuse(url: str) -> str:
        raise EgressRefused(f"{url} resolves to 169.254.169.254, which is link-local")

    async def unknown(url: str) -> str:
        raise TransientError("no such host")

    hooks, ctx = commands(check_target=refuse)
    reply = await hooks.webhook(ctx, ("out", "meta", "http://metadata.internal/"))
    assert reply.text == (
        "That URL is not allowed (webhooks.egress): http://metadata.internal/ resolves to "
        "169.254.169.254, which is link-local"
    )
    hooks, ctx = commands(check_target=unknown)
    reply = await hooks.webhook(ctx, ("out", "meta", "http://nowhere.example/"))
    assert reply.text == "That URL cannot be used now: no such host"
    weak, weak_ctx = commands(power=0, check_target=refuse)
    refused = await weak.webhook(weak_ctx, ("out", "x", "http://a/"))
    assert refused.text == "Managing webhooks needs the admin permission, or power level 50 here."


def test_directory_keys_during_and_after_the_grace() -> None:
    now = [1000.0]
    directory = HookDirectory({}, clock=lambda: now[0])
    old, new = new_secret(), new_secret()
    assert len(decode_secret(old)) == 32
    directory.put(RoomHook("deploy", ROOM, new, old, 2_000_000, "@a:example.org", 0))
    assert directory.keys("deploy") == [decode_secret(new), decode_secret(old)]
    now[0] = 2000.0
    assert directory.keys("deploy") == [decode_secret(new)]
    directory.drop("deploy")
    assert directory.keys("deploy") is None
    assert directory.keys("other") is None


def test_admin_lists_config_and_room_hooks_without_secrets() -> None:
    hooks, _ = commands()
    admin = hooks.admin
    directory = admin.directory
    other = "!other:example.org"
    directory.put(RoomHook("deploy", ROOM, new_secret(), new_secret(), 1, "@a:example.org", 5))
    directory.put(RoomHook("elsewhere", other, new_secret(), None, None, "@b:example.org", 6))
    here = admin.hooks(RoomID(ROOM))
    assert [(h.name, h.source, h.direction) for h in here] == [
        ("ci", "config", "inbound"),
        ("deploy", "room", "inbound"),
        ("tickets", "config", "outbound"),
    ]
    # The grace ended long ago (1 ms after the epoch): no rotation shown.
    assert here[1].rotating_until is None
    assert here[1].created_by == "@a:example.org"
    assert here[1].url.endswith("/webhooks/v1/deploy")
    assert [h.name for h in admin.hooks()] == ["ci", "deploy", "elsewhere", "tickets"]
    assert here[2].url == "https://t.example.org/in?…"
    assert admin.find("ci") == here[0]
    assert admin.find("nope") is None
    assert "whsec_" not in repr(admin.hooks())
