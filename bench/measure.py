"""What every benchmark here measures with: CPU of each process, the machine's load, py-spy
profiles, percentiles, the temporary folder and the commit measured."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")
# Other processes using more than this many cores on average during a phase: its numbers are
# not to be trusted (this machine has 2 cores).
BUSY_CORES = 0.5


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


async def retry_until(
    check: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.2
) -> T:
    """Poll `check` until it returns something other than None."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


# --- CPU accounting ---------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def family_cpu(master_pid_file: Path) -> float:
    """CPU seconds of a Dovecot master, its reaped children and its live children."""
    try:
        master = int(master_pid_file.read_text().split()[0])
        fields = Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return 0.0
    total = sum(int(v) for v in fields[11:15]) / _TICK
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            child = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(child[1]) == master:
                total += sum(int(v) for v in child[11:15]) / _TICK
    return total


def proc_stat(pid: int) -> tuple[str, list[str]]:
    """A process's name and the fields of /proc/PID/stat after it (OSError if it is gone)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()


def live_pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def postgres_processes() -> dict[int, list[str]]:
    """Every process named postgres (a postmaster, its backends and workers): pid -> the
    fields of its /proc/PID/stat after the name."""
    found: dict[int, list[str]] = {}
    for pid in live_pids():
        with contextlib.suppress(OSError, ValueError):
            name, fields = proc_stat(pid)
            if name == "postgres":
                found[pid] = fields
    return found


def postgres_cpu() -> float:
    """CPU seconds of PostgreSQL's server processes, whichever cluster (the postmaster, its
    backends and background workers, and the children it has reaped): part of what is being
    measured when a database of the run lives there, not "other processes"."""
    found = postgres_processes()
    total = 0
    for fields in found.values():
        total += int(fields[11]) + int(fields[12])
        if int(fields[1]) not in found:  # the postmaster: its reaped children too
            total += int(fields[13]) + int(fields[14])
    return total / _TICK


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (all cores) since boot, steal included."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / _TICK


def machine_steal() -> float:
    """CPU seconds the hypervisor gave to other machines while this one's cores wanted to run
    (all cores, since boot): it slows every process of a phase without showing in their own
    CPU time."""
    values = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return int(values[7]) / _TICK if len(values) > 7 else 0.0


def find_pid(needle: str) -> int | None:
    """The process whose command line contains `needle` (Synapse: its config path)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if needle in cmdline and "homeserver" in cmdline:
                return int(entry.name)
    return None


@dataclass
class CpuMeter:
    """CPU seconds spent by Synapse, the bridge, Dovecot, PostgreSQL's server, this script and
    everything else in a phase."""

    synapse_pid: int | None
    bridge_pid: int | None
    dovecot_pid_file: Path
    _start: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        times = os.times()
        return {
            "synapse": process_cpu(self.synapse_pid),
            "bridge": process_cpu(self.bridge_pid),
            "dovecot": family_cpu(self.dovecot_pid_file),
            "postgres": postgres_cpu(),
            "bench": times.user + times.system,
            "machine": machine_cpu(),
            "steal": machine_steal(),
            "wall": time.monotonic(),
        }

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        used = {k: round(end[k] - self._start[k], 2) for k in end}
        known = ("synapse", "bridge", "dovecot", "postgres", "bench", "steal")
        used["others"] = round(used["machine"] - sum(used[k] for k in known), 2)
        return used


def appservice_transactions(metrics_url: str | None) -> tuple[float, float]:
    """How many appservice transactions the bridge has taken from the homeserver, and the
    seconds it spent storing and answering them (its /metrics histogram); zeros if none."""
    if metrics_url is None:
        return 0.0, 0.0
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    count = total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "passerelle_appservice_transaction_seconds":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count = sample.value
                elif sample.name.endswith("_sum"):
                    total = sample.value
    return count, total


@dataclass
class Probes:
    """What watches a phase: CPU accounting always, py-spy when asked, and with `metrics_url`
    the appservice transactions the bridge took (`transactions` after each stop)."""

    meter: CpuMeter
    profiler: Profiler
    synapse_pid: int | None
    bridge_pid: int | None
    metrics_url: str | None = None
    transactions: dict[str, float] = field(default_factory=dict)
    _txn_start: tuple[float, float] = (0.0, 0.0)

    def start(self, name: str, *, bridge: bool) -> None:
        self.profiler.start(f"{name}-synapse", self.synapse_pid)
        if bridge:
            self.profiler.start(f"{name}-bridge", self.bridge_pid)
        self._txn_start = appservice_transactions(self.metrics_url)
        self.meter.start()

    def stop(self) -> dict[str, float]:
        cpu = self.meter.stop()
        self.profiler.stop()
        if self.metrics_url is not None:
            count, total = appservice_transactions(self.metrics_url)
            taken = count - self._txn_start[0]
            spent = total - self._txn_start[1]
            self.transactions = {
                "count": taken,
                "answer_ms_mean": round(1000 * spent / taken, 2) if taken else 0.0,
            }
        return cpu


# --- py-spy (optional) ------------------------------------------------------------------------


@dataclass
class Profiler:
    """py-spy attached to a process for one phase, in raw (collapsed stacks) format."""

    folder: Path | None
    native: bool = False
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, pid: int | None) -> None:
        exe = shutil.which("py-spy")
        if self.folder is None or exe is None or pid is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._procs.append(
            subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "100",
                    # --native needs the process paused while its stack is read.
                    *([] if self.native else ["--nonblocking"]),
                    "--idle",
                    "--threads",
                    *(["--native"] if self.native else []),
                    "--format",
                    "raw",
                    "--output",
                    str(self.folder / f"{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(self.folder / f"{name}.log").open("wb"),
            )
        )

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()


# A sample whose innermost frame is one of these is a thread waiting, not working: the asyncio
# or Twisted poll, an aiosqlite worker waiting for its next call, a pool thread with no work.
IDLE_FRAMES = (
    "(selectors.py:",
    "(synapse/metrics/_reactor_metrics.py:",
    "(twisted/internet/epollreactor.py:",
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "Condition.wait (threading.py:",
    "_worker (concurrent/futures/thread.py:",
)


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """From py-spy's raw output (--idle --threads, maybe --native): how busy each thread was,
    the functions the busy samples were in (innermost Python frame) and the bridge's own
    functions under them; with --native also how much of the SQLite threads' time went to
    waiting for another connection's write lock (SQLite's busy handler sleeping) and fsync."""
    per_thread: Counter[str] = Counter()
    busy_thread: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    sqlite_threads = lock_wait = fsync = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        thread = thread.split(": ", 1)[-1]
        per_thread[thread] += count
        if "_connection_worker_thread" in thread:
            sqlite_threads += count
            if any("sqlite3InvokeBusyHandler" in frame for frame in frames):
                lock_wait += count
            elif frames and frames[-1].startswith(("fdatasync", "fsync")):
                fsync += count
        python = [frame for frame in frames if ".py:" in frame]
        if not python or any(marker in python[-1] for marker in IDLE_FRAMES):
            continue
        busy_thread[thread] += count
        own[python[-1]] += count
        for frame in set(python):
            if "bridge/" in frame and "bridge/cli.py" not in frame and "__main__" not in frame:
                inclusive[frame] += count
    busy = sum(busy_thread.values())
    summary: dict[str, Any] = {
        "busy_samples": busy,
        "thread_busy_percent": {
            name: round(100 * busy_thread[name] / total, 1)
            for name, total in per_thread.most_common()
            if busy_thread[name]
        },
        "busy_innermost_percent": [(k, round(100 * v / busy, 1)) for k, v in own.most_common(top)],
        "busy_in_bridge_code_percent": [
            (k, round(100 * v / busy, 1)) for k, v in inclusive.most_common(top)
        ],
    }
    if sqlite_threads and (lock_wait or fsync):
        summary["sqlite_threads"] = {
            "threads": sum(1 for name in per_thread if "_connection_worker_thread" in name),
            "lock_wait_percent": round(100 * lock_wait / sqlite_threads, 1),
            "fsync_percent": round(100 * fsync / sqlite_threads, 1),
        }
    return summary


def disturbed_phases(results: dict[str, Any]) -> dict[str, float]:
    """The phases during which other processes, or the hypervisor's steal, took more than
    BUSY_CORES: their share."""

    def taken(cpu: dict[str, float]) -> float:
        return cpu["others"] + cpu.get("steal", 0.0)

    return {
        key: round(taken(value["cpu_s"]) / value["cpu_s"]["wall"], 2)
        for key, value in results.items()
        if isinstance(value, dict)
        and "cpu_s" in value
        and taken(value["cpu_s"]) > BUSY_CORES * value["cpu_s"]["wall"]
    }


def profile_summaries(folder: Path) -> dict[str, Any]:
    return {path.stem: profile_summary(path) for path in sorted(folder.glob("*.txt"))}


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--keep, --profile and --native, the same in every benchmark here."""
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="folder for py-spy profiles of the bridge and Synapse (needs py-spy on PATH)",
    )
    parser.add_argument(
        "--native", action="store_true", help="py-spy with --native (C frames too: SQLite, …)"
    )


@contextlib.contextmanager
def temp_folder(keep: bool) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="passerelle-bench-"))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def code_version() -> str:
    """The commit measured, marked dirty when bridge/ has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bridge"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


# --- helper processes (the SMTP sink, the copy bot) -------------------------------------------


def start_script(
    argv: Sequence[str], output: Path, ready: Path, name: str, timeout: float = 30
) -> subprocess.Popen[bytes]:
    """`python ARGV…` in a process of its own, its output into `output`; returns once it wrote
    "ready" at the start of `ready` (RuntimeError if it exits or takes longer)."""
    with output.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = output.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{name} exited {proc.returncode}: {tail}")
        if ready.exists() and ready.read_text().startswith("ready"):
            return proc
        time.sleep(0.05)
    raise RuntimeError(f"{name} not ready after {timeout} s")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 10 s; nothing if it is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
