"""Capped exponential backoff for reconnect and retry loops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 1.0
    maximum: float = 60.0
    factor: float = 2.0
    jitter: float = 0.1
    _current: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        """The delay before the next attempt; grows until it reaches the cap."""
        self._current = (
            self.initial if self._current == 0 else min(self._current * self.factor, self.maximum)
        )
        return self._current * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0
