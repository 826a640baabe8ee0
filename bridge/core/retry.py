"""Running one unit of work until it settles: success, or given up after repeated failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bridge.core.backoff import Backoff
from bridge.core.errors import Ignored, Refused, TransientError


def describe(error: BaseException) -> str:
    """One line naming the error, for logs and the database."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:500]


async def settle(
    work: Callable[[], Awaitable[None]],
    *,
    label: str,
    count_failure: Callable[[str], Awaitable[int]],
    give_up: Callable[[str], Awaitable[None]],
    max_attempts: int,
    log: logging.Logger,
    initial: float = 1.0,
    maximum: float = 60.0,
) -> bool:
    """Run `work` until it succeeds (True) or has failed `max_attempts` times (False).

    A TransientError (the other side is down) is waited out with capped backoff for as long as
    it takes and does not count as an attempt: it says nothing about the work itself. Any other
    failure counts; past the limit `give_up` records why and the caller moves on.
    """
    backoff = Backoff(initial=initial, maximum=maximum)
    while True:
        try:
            await work()
            return True
        except TransientError as e:
            delay = backoff.next_delay()
            log.warning("%s waits: %s; retrying in %.1f s", label, e, delay)
        except Exception as e:
            reason = describe(e)
            attempts = await count_failure(reason)
            if attempts >= max_attempts:
                log.error("%s failed %d times, giving up: %s", label, attempts, reason, exc_info=e)
                await give_up(reason)
                return False
            delay = backoff.next_delay()
            log.warning(
                "%s failed (attempt %d of %d): %s; retrying in %.1f s",
                label,
                attempts,
                max_attempts,
                reason,
                delay,
            )
        await asyncio.sleep(delay)


async def settle_stored(
    handle: Callable[[], Awaitable[None]],
    finish: Callable[[str, str], Awaitable[None]],
    *,
    refused_state: str,
    label: str,
    count_failure: Callable[[str], Awaitable[int]],
    give_up: Callable[[str], Awaitable[None]],
    max_attempts: int,
    log: logging.Logger,
    initial: float = 1.0,
) -> bool:
    """`settle` for one item of a durable intake (a stored mail, a stored remote event): a
    refusal or a skip is a final outcome, recorded with `finish(state, reason)`; any other
    failure is retried, then given up."""

    async def work() -> None:
        try:
            await handle()
        except Refused as e:
            await finish(refused_state, str(e))
        except Ignored as e:
            log.debug("%s ignored: %s", label, e)
            await finish("ignored", str(e))

    return await settle(
        work,
        label=label,
        count_failure=count_failure,
        give_up=give_up,
        max_attempts=max_attempts,
        log=log,
        initial=initial,
    )
