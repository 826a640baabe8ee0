"""Management commands: parsing what a person wrote, and the answers, whatever the chat network."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bridge.core.ids import RoomID, UserID
from bridge.core.permissions import PermissionLevel

# Longer text is a message, not a command: never parse it.
MAX_COMMAND_LENGTH = 2000


@dataclass(frozen=True)
class Command:
    name: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Reply:
    text: str
    html: str

    @classmethod
    def plain(cls, text: str) -> Reply:
        """A reply whose HTML is the escaped text, line by line."""
        return cls(text=text, html="<br>".join(html.escape(line) for line in text.split("\n")))


def parse_command(body: str, prefix: str, *, is_direct: bool) -> Command | None:
    """The command in a message, or None when the message is not addressed to the bot.

    In a group room a command starts with the prefix; in a direct chat the prefix is optional.
    """
    if len(body) > MAX_COMMAND_LENGTH:
        return None
    words = body.split()
    if words and words[0].casefold() == prefix.casefold():
        words = words[1:]
    elif not is_direct:
        return None
    if not words:
        return Command("help", ())
    return Command(words[0].casefold(), tuple(words[1:]))


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    level: PermissionLevel
    usage: str = ""  # the arguments, shown after the name in help


StatusSource = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class CommandContext:
    """Where a command was written and by whom; power_level asks the room when needed."""

    sender: UserID
    room_id: RoomID
    level: PermissionLevel
    is_direct: bool
    power_level: Callable[[], Awaitable[int]]


Handler = Callable[[CommandContext, tuple[str, ...]], Awaitable[Reply]]


class CommandProcessor:
    """Runs commands for a person at a permission level and returns the answer to show."""

    def __init__(self, prefix: str, status: StatusSource) -> None:
        self.prefix = prefix
        self._status = status
        self.specs = [
            CommandSpec("help", "this list", PermissionLevel.USER),
            CommandSpec(
                "status", "the bridge's health: database, homeserver, queues", PermissionLevel.USER
            ),
        ]
        self._handlers: dict[str, Handler] = {}

    def add(self, spec: CommandSpec, handler: Handler) -> None:
        """Register a command that needs to know where it was written."""
        self.specs.append(spec)
        self._handlers[spec.name] = handler

    async def run(
        self,
        command: Command,
        level: PermissionLevel,
        *,
        is_direct: bool,
        context: CommandContext | None = None,
    ) -> Reply:
        if level < PermissionLevel.USER:
            return Reply.plain("You are not allowed to use this bridge. Ask its administrator.")
        spec = next((s for s in self.specs if s.name == command.name), None)
        if spec is None:
            hint = "help" if is_direct else f"{self.prefix} help"
            shown = command.name[:50]
            return Reply.plain(f"Unknown command “{shown}”. Write “{hint}” for the list.")
        if level < spec.level:
            return Reply.plain(f"“{spec.name}” needs the {spec.level.name.lower()} permission.")
        if spec.name == "help":
            return self._help(level, is_direct=is_direct)
        if spec.name in self._handlers:
            if context is None:
                return Reply.plain(f"“{spec.name}” only works in a room.")
            return await self._handlers[spec.name](context, command.args)
        return await self._status_reply()

    def _help(self, level: PermissionLevel, *, is_direct: bool) -> Reply:
        lead = "" if is_direct else f"{self.prefix} "
        lines = [
            "Passerelle links this homeserver's rooms to mailing lists, shared mailboxes "
            "and the servers of other ministries.",
            "Commands"
            + (
                " (the prefix is optional here):" if is_direct else f" (start with {self.prefix}):"
            ),
        ]
        items = [
            (f"{lead}{s.name} {s.usage}".rstrip(), s.summary)
            for s in self.specs
            if level >= s.level
        ]
        text = "\n".join(lines + [f"• {cmd} — {summary}" for cmd, summary in items])
        html_items = "".join(
            f"<li><code>{html.escape(cmd)}</code> — {html.escape(summary)}</li>"
            for cmd, summary in items
        )
        body_html = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
        return Reply(text=text, html=f"{body_html}<ul>{html_items}</ul>")

    async def _status_reply(self) -> Reply:
        report = await self._status()
        lines = [f"Passerelle {report.get('version', '?')}: {report.get('status', '?')}"]
        database = report.get("database", {})
        lines.append(
            f"Database ({database.get('dialect', '?')}): "
            + ("ok" if database.get("ok") else f"failing: {database.get('error')}")
        )
        homeserver = report.get("homeserver", {})
        lines.append(
            "Homeserver: "
            + ("reachable" if homeserver.get("reachable") else "unreachable")
            + (
                f" (last error: {homeserver['last_error']})"
                if homeserver.get("last_error")
                else ""
            )
        )
        queue = report.get("queue", {})
        if queue:
            lines.append(
                f"Events: {queue.get('pending', 0)} pending, {queue.get('done', 0)} handled, "
                f"{queue.get('dead_letters', 0)} dead letters"
            )
        outbox = report.get("outbox")
        if isinstance(outbox, dict):
            smtp = outbox.get("smtp", {})
            error = smtp.get("last_error") if isinstance(smtp, dict) else None
            lines.append(
                f"Mail out: {outbox.get('pending', 0)} waiting, {outbox.get('sent', 0)} sent, "
                f"{outbox.get('failed', 0)} failed"
                + (f" (SMTP last error: {error})" if error else "")
            )
        lines.extend(_remote_lines(report))
        return Reply.plain("\n".join(lines))


def _remote_lines(report: dict[str, Any]) -> list[str]:
    """One line per remote homeserver, and one for what waits to go to them."""
    lines = []
    remotes = report.get("remotes")
    if isinstance(remotes, dict):
        for name, state in sorted(remotes.items()):
            if not isinstance(state, dict):
                continue
            if state.get("stopped"):
                how = f"stopped: {state['stopped']}"
            elif state.get("reachable"):
                how = "reachable"
            else:
                how = "unreachable" + (
                    f" (last error: {state['last_error']})" if state.get("last_error") else ""
                )
            lines.append(f"Remote {name}: {how}; {state.get('rooms', 0)} linked room(s)")
    out = report.get("remote_outbox")
    if isinstance(out, dict):
        lines.append(
            f"To remote rooms: {out.get('pending', 0)} waiting, {out.get('sent', 0)} sent, "
            f"{out.get('failed', 0)} failed"
        )
    return lines
