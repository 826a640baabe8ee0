"""Every hook, inbound and outbound, from the config and made in rooms: kept in memory, changed
with the DB."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from bridge.config.webhooks import HookSettings, OutHookSettings
from bridge.db import room_hooks
from bridge.db.engine import Database
from bridge.db.room_hooks import RoomHook
from bridge.webhooks.signature import decode_secret


class HookDirectory:
    """The hooks by name. `hooks` is one live mapping (the relay reads it); room hooks are
    loaded at start-up and changed only through this object, after their row is written."""

    def __init__(
        self,
        configured: Mapping[str, HookSettings],
        clock: Callable[[], float] = time.time,
        *,
        outgoing: Mapping[str, OutHookSettings] | None = None,
    ) -> None:
        self.configured = dict(configured)
        self.hooks: dict[str, HookSettings] = dict(configured)
        self.configured_out = dict(outgoing or {})
        self.outgoing: dict[str, OutHookSettings] = dict(self.configured_out)
        self.room_hooks: dict[str, RoomHook] = {}
        self._clock = clock
        # Told when a room hook is made, changed or removed here (other instances reload).
        self.on_change: Callable[[], None] | None = None

    async def load(self, db: Database) -> None:
        """Room hooks as the database has them (at start-up, or after another instance
        changed them): new and changed ones put, removed ones dropped."""
        stored = await room_hooks.all_hooks(db)
        for name in set(self.room_hooks) - {hook.name for hook in stored}:
            self._drop(name)
        for hook in stored:
            if hook.name not in self.configured and hook.name not in self.configured_out:
                self._put(hook)

    def put(self, hook: RoomHook) -> None:
        self._put(hook)
        if self.on_change is not None:
            self.on_change()

    def _put(self, hook: RoomHook) -> None:
        self.room_hooks[hook.name] = hook
        if hook.url is not None:
            self.outgoing[hook.name] = OutHookSettings(
                hook.name, hook.room_id, hook.url, hook.secret
            )
        else:
            self.hooks[hook.name] = HookSettings(hook.name, hook.room_id, hook.secret)

    def drop(self, name: str) -> None:
        self._drop(name)
        if self.on_change is not None:
            self.on_change()

    def _drop(self, name: str) -> None:
        self.room_hooks.pop(name, None)
        if name not in self.configured:
            self.hooks.pop(name, None)
        if name not in self.configured_out:
            self.outgoing.pop(name, None)

    def taken(self, name: str) -> bool:
        """Whether a hook of either direction has this name."""
        return name in self.hooks or name in self.outgoing

    def outgoing_in(self, room_id: str) -> list[OutHookSettings]:
        """The outbound hooks that receive this room's messages."""
        return [hook for hook in self.outgoing.values() if hook.room_id == room_id]

    def signing_keys(self, name: str) -> list[bytes]:
        """The keys an outbound delivery is signed with now: the secret, and the previous one
        while a rotation's grace lasts (the receiver may check either)."""
        hook = self.outgoing.get(name)
        return [] if hook is None else self._keys(hook.secret, name)

    def keys(self, name: str) -> list[bytes] | None:
        """The keys a request to `name` may be signed with now, or None for no such hook."""
        hook = self.hooks.get(name)
        if hook is None:
            return None
        return self._keys(hook.secret, name)

    def _keys(self, secret: str, name: str) -> list[bytes]:
        keys = [decode_secret(secret)]
        room_hook = self.room_hooks.get(name)
        if (
            room_hook is not None
            and room_hook.previous_secret is not None
            and room_hook.previous_expires_at is not None
            and self._clock() * 1000 < room_hook.previous_expires_at
        ):
            keys.append(decode_secret(room_hook.previous_secret))
        return keys
