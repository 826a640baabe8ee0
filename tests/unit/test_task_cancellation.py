"""Cancellation is never lost: `wait_for` keeps a cancel that races with its result, and
`TaskGroup.close` cancels again a task that swallowed its cancel (a CI run hung 120 s in a
teardown on such a loop)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from bridge.core.tasks import TaskGroup, wait_for


async def _wake_loop(wake: asyncio.Event, waiter: object, rounds: list[int]) -> None:
    while True:
        rounds.append(1)
        await waiter(wake.wait(), 10)  # type: ignore[operator]
        wake.clear()


async def _cancel_as_it_wakes(waiter: object) -> bool:
    """Set the event and cancel the waiting task in one step; True if the task ended."""
    wake = asyncio.Event()
    rounds: list[int] = []
    task = asyncio.create_task(_wake_loop(wake, waiter, rounds))
    await asyncio.sleep(0.01)  # waiting inside wait_for
    wake.set()
    await asyncio.sleep(0)  # the inner wait() completes; wait_for's own step is not run yet
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return bool(done)


async def test_wait_for_keeps_a_cancel_that_races_with_the_result() -> None:
    assert await _cancel_as_it_wakes(wait_for)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in 3.12's asyncio.wait_for")
async def test_asyncio_wait_for_of_this_python_loses_it() -> None:
    """Why `wait_for` exists: the same race loses the cancel with asyncio's own."""
    assert not await _cancel_as_it_wakes(asyncio.wait_for)


async def test_wait_for_still_times_out_and_returns() -> None:
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.Event().wait(), 0.01)

    async def answer() -> int:
        return 42

    assert await wait_for(answer(), 1) == 42
    assert await wait_for(answer(), None) == 42


async def test_close_cancels_again_a_task_that_swallowed_its_cancel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    group = TaskGroup()
    cancels: list[int] = []

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(1)  # swallowed, like a library that "handles" it
        await asyncio.Event().wait()

    task = group.spawn(stubborn(), "stubborn")
    await asyncio.sleep(0)
    await asyncio.wait_for(group.close(), 5)
    assert task.cancelled()
    assert cancels == [1]
    assert "task stubborn is still running after its cancel" in caplog.text
