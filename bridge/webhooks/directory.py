"""Every inbound hook, from the config and made in rooms: kept in memory, changed with the DB."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from bridge.config.webhooks import HookSettings
from bridge.db import room_hooks
from bridge.db.engine import Database
from bridge.db.room_hooks import RoomHook
from bridge.webhooks.signature import decode_secret


class HookDirectory:
    """The hooks by name. `hooks` is one live mapping (the relay reads it); room hooks are
    loaded at start-up and changed only through this object, after their row is written."""

    def __init__(
        self, configured: Mapping[str, HookSettings], clock: Callable[[], float] = time.time
    ) -> None:
        self.configured = dict(configured)
        self.hooks: dict[str, HookSettings] = dict(configured)
        self.room_hooks: dict[str, RoomHook] = {}
        self._clock = clock

    async def load(self, db: Database) -> None:
        for hook in await room_hooks.all_hooks(db):
            if hook.name not in self.configured:
                self.put(hook)

    def put(self, hook: RoomHook) -> None:
        self.room_hooks[hook.name] = hook
        self.hooks[hook.name] = HookSettings(hook.name, hook.room_id, hook.secret)

    def drop(self, name: str) -> None:
        self.room_hooks.pop(name, None)
        if name not in self.configured:
            self.hooks.pop(name, None)

    def keys(self, name: str) -> list[bytes] | None:
        """The keys a request to `name` may be signed with now, or None for no such hook."""
        hook = self.hooks.get(name)
        if hook is None:
            return None
        keys = [decode_secret(hook.secret)]
        room_hook = self.room_hooks.get(name)
        if (
            room_hook is not None
            and room_hook.previous_secret is not None
            and room_hook.previous_expires_at is not None
            and self._clock() * 1000 < room_hook.previous_expires_at
        ):
            keys.append(decode_secret(room_hook.previous_secret))
        return keys
