"""Processes pinned to CPUs, to run two sides of a bench as if on machines of their own.

`split_cores` puts the mail servers (Postfix and Dovecot: master processes, their children and
every thread) on the last core, and the rest of the run (this script, the bridge, Synapse,
PostgreSQL's server) on the others. Children forked later inherit their parent's CPUs, so the
smtpd, cleanup and LMTP processes Postfix and Dovecot start during the phase stay on their side.
Everything is given every core back on exit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from bench.measure import live_pids, postgres_processes, proc_stat


def process_tree(root: int) -> set[int]:
    """`root` and every process descended from it, as they are now."""
    children: dict[int, list[int]] = {}
    for pid in live_pids():
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(proc_stat(pid)[1][1]), []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def pin(pids: Iterable[int], cpus: set[int]) -> int:
    """Every thread of each process on `cpus`; returns how many threads were pinned. A process
    gone in between is skipped."""
    pinned = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task.name), cpus)
                    pinned += 1
    return pinned


def read_pid(pid_file: Path) -> int:
    return int(pid_file.read_text().split()[0])


@contextlib.contextmanager
def split_cores(mta_roots: Iterable[int], rest: Iterable[int]) -> Iterator[dict[str, list[int]]]:
    """The process trees of `mta_roots` on the last core, the processes of `rest` (not their
    children: the mail servers may be this script's) and PostgreSQL's server on the others,
    for the body; then every one of them on every core again."""
    every = set(range(os.cpu_count() or 1))
    if len(every) < 2:
        raise RuntimeError("--split-cores needs at least two cores")
    mta_cpus, rest_cpus = {max(every)}, every - {max(every)}
    roots, others = list(mta_roots), set(rest) | set(postgres_processes())
    try:
        pin(others, rest_cpus)
        pin({pid for root in roots for pid in process_tree(root)}, mta_cpus)
        yield {"mta_cpus": sorted(mta_cpus), "rest_cpus": sorted(rest_cpus)}
    finally:
        pin(others | {pid for root in roots for pid in process_tree(root)}, every)
