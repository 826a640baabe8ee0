"""GroupCommit: records written off the send path, many per commit, in order, failures alone."""

from __future__ import annotations

import asyncio

import pytest

from bridge.core.recorder import GroupCommit
from bridge.core.tasks import TaskGroup


class Store:
    """A store whose commits can be held open and made to fail for chosen items."""

    def __init__(self) -> None:
        self.commits: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.bad: set[int] = set()

    async def write(self, items: list[int]) -> None:
        self.entered.set()
        await self.gate.wait()
        if self.bad & set(items):
            raise RuntimeError(f"cannot write {sorted(self.bad & set(items))}")
        self.commits.append(list(items))


def recorder(
    store: Store, tasks: TaskGroup, max_batch: int = 100
) -> tuple[GroupCommit[int], list[int], list[tuple[int, str]]]:
    done: list[int] = []
    failed: list[tuple[int, str]] = []
    group: GroupCommit[int] = GroupCommit(
        store.write,
        tasks,
        "test",
        done=done.append,
        failed=lambda item, e: failed.append((item, str(e))),
        max_batch=max_batch,
    )
    return group, done, failed


async def test_records_gathered_during_a_commit_share_the_next_one() -> None:
    tasks, store = TaskGroup(), Store()
    group, done, failed = recorder(store, tasks)
    store.gate.clear()
    group.add(1)
    await store.entered.wait()  # the first commit is running, held open
    for item in range(2, 8):
        group.add(item)
    assert group.pending() == 6
    store.gate.set()
    await asyncio.wait_for(group.wait_idle(), 5)
    assert store.commits == [[1], [2, 3, 4, 5, 6, 7]]
    assert group.commits == 2
    assert done == list(range(1, 8))
    assert failed == []
    await tasks.close()


async def test_a_bad_record_fails_alone_and_the_others_are_written_in_order() -> None:
    tasks, store = TaskGroup(), Store()
    group, done, failed = recorder(store, tasks)
    store.gate.clear()
    store.bad = {4}
    group.add(1)
    await store.entered.wait()
    for item in range(2, 7):
        group.add(item)
    store.gate.set()
    await asyncio.wait_for(group.wait_idle(), 5)
    assert store.commits == [[1], [2], [3], [5], [6]]
    assert done == [1, 2, 3, 5, 6]
    assert failed == [(4, "cannot write [4]")]
    await tasks.close()


async def test_a_batch_never_exceeds_max_batch() -> None:
    tasks, store = TaskGroup(), Store()
    group, done, _ = recorder(store, tasks, max_batch=3)
    store.gate.clear()
    group.add(0)
    await store.entered.wait()
    for item in range(1, 8):
        group.add(item)
    store.gate.set()
    await asyncio.wait_for(group.wait_idle(), 5)
    assert store.commits == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert done == list(range(8))
    await tasks.close()


async def test_a_failing_callback_does_not_stop_the_writer() -> None:
    tasks, store = TaskGroup(), Store()

    def explode(item: int) -> None:
        raise ValueError(f"callback {item}")

    group: GroupCommit[int] = GroupCommit(
        store.write, tasks, "test", done=explode, failed=lambda _i, _e: None
    )
    group.add(1)
    group.add(2)
    await asyncio.wait_for(group.wait_idle(), 5)
    group.add(3)
    await asyncio.wait_for(group.wait_idle(), 5)
    assert [item for commit in store.commits for item in commit] == [1, 2, 3]
    await tasks.close()


async def test_cancelled_with_records_queued_it_still_ends_idle() -> None:
    """The bridge stops: queued records are dropped (their items stay pending in the store,
    to be sent again with the same transaction IDs), and nobody waits forever."""
    tasks, store = TaskGroup(), Store()
    group, done, _ = recorder(store, tasks)
    store.gate.clear()
    group.add(1)
    group.add(2)
    await store.entered.wait()
    await tasks.close()
    await asyncio.wait_for(group.wait_idle(), 5)
    assert done == []
    assert group.pending() == 0


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(Store().write, TaskGroup(), "test", done=print, failed=print, max_batch=0)
