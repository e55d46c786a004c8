"""Shared pieces of the benchmarks: trials, statistics, rows, environment, children.

Why trials run in child processes: every trial then starts from the same state (no
warm caches or leftover memory from an earlier case), and its peak memory is its own
(``ru_maxrss`` of a fresh interpreter), not the maximum of everything run before.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "
SENDER = "anna@example.com"
SENDER_NAME = "Anna Berg"
RECIPIENT = "kund@example.org"


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    quick: bool
    trials: int
    cases: tuple[int, ...]
    json_path: Path
    work_dir: Path
    profile: bool

    def n(self, full: int, quick: int) -> int:
        """The message count for this run: ``full`` normally, ``quick`` with --quick."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Spread:
    """Median with min and max of repeated trials (the numbers the table shows)."""

    median: float
    min: float
    max: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        if not values:
            raise ValueError("no values")
        return cls(median(values), min(values), max(values), tuple(values))


@dataclass
class Row:
    """One line of the table: a variant of a case, measured over several trials."""

    case: int
    name: str
    rate: Spread | None
    unit: str = "msg/s"
    limit: bool = False
    ratio: Spread | None = None
    peak_rss_mb: float | None = None
    requests_per_message: float | None = None
    notes: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    against: str = ""
    """What the row is measured against (the case's limit row, or a fixed goal)."""
    goal: str = ""
    """The goal in words, e.g. ``≥ 0.9 × limit``."""
    goal_ratio: float | None = None
    """For a ratio goal: the least median ratio that meets it."""
    met: bool | None = None
    """Whether the goal is met (None: no goal); set from ``goal_ratio`` if not given."""
    goal_result: str = ""
    """What the goals table shows as the ratio when the goal is not a ratio to the
    row's limit (memory and rate flat, for instance)."""
    goal_id: str = ""
    """The number of the issue's goal this row measures (it then shows in the goals
    table); empty for reference rows and figures measured besides."""

    def __post_init__(self) -> None:
        if self.goal_ratio is not None:
            self.goal = self.goal or f"≥ {self.goal_ratio:g} × limit"
            if self.met is None and self.ratio is not None:
                self.met = self.ratio.median >= self.goal_ratio

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def ratios(values: Sequence[float], limit: Spread | None) -> Spread | None:
    """Each trial's value over the limit's median (how close to the wire)."""
    if limit is None or not limit.median:
        return None
    return Spread.of([v / limit.median for v in values])


def peak_rss_mb(pid: int | str = "self") -> float | None:
    """A process's peak resident memory (VmHWM), in MiB; None once it has exited.

    Why not ``ru_maxrss``: Linux carries the high-water mark across exec, so a child
    started by a big parent (fork or vfork, then exec) reports the parent's size.
    VmHWM belongs to the address space the program really runs in.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None if pid != "self" else _ru_maxrss_mb()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return None if pid != "self" else _ru_maxrss_mb()


def _ru_maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def free_port() -> int:
    """A TCP port nobody listens on right now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- child processes --------------------------------------------------------------


def run_child(
    target: str,
    params: Mapping[str, Any],
    timeout: float = 900.0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``module:function(params)`` in a fresh interpreter and return its result dict.

    The child adds its own peak RSS. A failing child raises with its stderr tail, so a
    broken case says why instead of printing a wrong number.
    """
    command = [sys.executable, "-m", "bench.child", target, json.dumps(dict(params))]
    proc = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return result
    tail = "\n".join(proc.stderr.splitlines()[-25:])
    raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{tail}")


def wait_watching_memory(procs: Sequence[subprocess.Popen[Any]]) -> list[tuple[int, float]]:
    """Wait for every process; each one's (exit code, peak RSS in MiB).

    The peak is the last VmHWM read while the process ran (read every 50 ms; the
    high-water mark only grows, so at most the last 50 ms before exit are missed).
    """
    peaks = [0.0] * len(procs)
    while True:
        running = False
        for i, proc in enumerate(procs):
            if proc.poll() is None:
                running = True
                peaks[i] = max(peaks[i], peak_rss_mb(proc.pid) or 0.0)
        if not running:
            break
        time.sleep(0.05)
    return [(int(proc.returncode), peak) for proc, peak in zip(procs, peaks, strict=True)]


def timed(action: Callable[[], Any]) -> float:
    """Seconds ``action`` took (monotonic, high resolution)."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def timed_cpu(action: Callable[[], Any]) -> tuple[float, float]:
    """Seconds ``action`` took, and the CPU seconds the process spent meanwhile (every
    thread of it: a worker sends and records in threads of its own)."""
    cpu = time.process_time()
    seconds = timed(action)
    return seconds, time.process_time() - cpu


# --- environment --------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of the software that decides the numbers."""
    import sqlite3

    names = (
        "crm-mail",
        "SQLAlchemy",
        "psycopg",
        "exchangelib",
        "msal",
        "requests",
        "urllib3",
        "lxml",
        "Django",
        "aiosmtpd",
        "pluggy",
        "pyinstrument",
        "py-spy",
        "psutil",
    )
    found = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["git"] = _git_head()
    return found


def _git_head() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "crm_core", "plugins"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' (core/plugins modified)' if dirty else ''}"


def machine() -> dict[str, Any]:
    """The machine the numbers were taken on, and how busy it was."""
    import psutil  # type: ignore[import-untyped]

    cpu = platform.processor() or platform.machine()
    with_name = Path("/proc/cpuinfo")
    if with_name.exists():
        for line in with_name.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def postgres_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin, if PostgreSQL's server is installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.parent.name.split(".")],
    )
    for candidate in reversed(found):
        if (candidate / "initdb").exists():
            return candidate
    return None


def have_postgres_user() -> bool:
    """True when a ``postgres`` account exists to run a throwaway cluster as."""
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return shutil.which("su") is not None
