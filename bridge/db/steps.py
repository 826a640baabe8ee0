"""A write transaction described once, as the statements it runs one after the other, and run
by whichever path can: through SQLAlchemy (`run_steps`, any database) or straight through the
driver (`direct.Direct`, the hot paths).

The description is a generator: it yields a `Step` (a statement built once, with bound
parameters, and its values), receives what the step gave back (the first row as a tuple or
None, or the number of rows changed), decides the next one from it, and returns the
transaction's result. It must do nothing else: no I/O, no event loop, no shared state. On the
driver path it runs in SQLite's worker thread.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.expression import Executable

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One statement of a described transaction.

    `build` makes the statement (the same one at every call: it is compiled once per dialect
    under `name`); `params` holds the values of its bound parameters, plain ints, strings,
    bytes and None only (no type processing happens on the driver path). `returns`: "row"
    gives the first row as a tuple (None if there is none), "count" the rows changed."""

    name: str
    build: Callable[[], Executable]
    params: Mapping[str, Any]
    returns: Literal["row", "count"] = "count"


# What describes a transaction: its steps, the answers it receives, its result.
Steps = Generator[Step, Any, T]


def built(statement: Executable) -> Callable[[], Executable]:
    """A Step's `build` for a statement made once at import."""
    return lambda: statement


async def run_steps(conn: AsyncConnection, steps: Steps[T]) -> T:
    """Run `steps` on `conn`, inside the caller's transaction, through SQLAlchemy."""

    async def execute(step: Step) -> Any:
        result = await conn.execute(step.build(), dict(step.params))
        if step.returns == "row":
            row = result.first()
            return None if row is None else tuple(row)
        return result.rowcount

    return await drive(steps, execute)


async def drive(steps: Steps[T], execute: Callable[[Step], Awaitable[Any]]) -> T:
    """Run `steps`, each step's answer given by `execute`; their result."""
    try:
        step = next(steps)
        while True:
            step = steps.send(await execute(step))
    except StopIteration as stop:
        value: T = stop.value
        return value


def drive_sync(steps: Steps[T], execute: Callable[[Step], Any]) -> T:
    """`drive` with a blocking `execute` (in a driver's own thread)."""
    try:
        step = next(steps)
        while True:
            step = steps.send(execute(step))
    except StopIteration as stop:
        value: T = stop.value
        return value


@dataclass(frozen=True)
class Compiled:
    """A statement compiled for one dialect: its SQL, its bind names in the order the driver
    takes them, and the values the statement holds itself (a LIMIT's, say)."""

    sql: str
    params: tuple[str, ...]
    defaults: Mapping[str, Any]

    def values(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(params[p] if p in params else self.defaults[p] for p in self.params)


class Statements:
    """Statements compiled once per name for one dialect (safe from any thread)."""

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._compiled: dict[str, Compiled] = {}
        self._lock = threading.Lock()

    def get(self, name: str, build: Callable[[], Executable]) -> Compiled:
        compiled = self._compiled.get(name)
        if compiled is None:
            with self._lock:
                done = build().compile(dialect=self._dialect)  # type: ignore[attr-defined]
                compiled = self._compiled[name] = Compiled(
                    done.string, tuple(done.positiontup or ()), dict(done.params)
                )
        return compiled
