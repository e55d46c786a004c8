"""Where the time goes: case 1's project trial (SQLite) sampled with py-spy.

Why py-spy and not an in-process profiler: the worker sends from a pool thread while
its main thread claims and records; py-spy samples every thread of the real process
from outside, with no tracing overhead in the code under test. Idle samples (a thread
waiting for the SMTP server's reply) are left out, so the shares are of CPU time.

The collapsed stacks are split into the two phases of the trial: ``enqueue`` (the
API, in one transaction) and dispatch (``Worker.run_once`` and its sending thread).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.core import REPO, Options, log
from bench.postgres import Postgres
from bench.servers import smtp_server

PHASES = {
    "enqueue": ("enqueue (bench/world.py",),
    "dispatch": (
        "run_once (crm_core/mail/worker.py",
        "_send_group (crm_core/mail/worker.py",
        # threads of their own: the batch's other connections, and its reporting thread
        "_guarded (smtp_mail/batch.py",
        "_run (smtp_mail/batch.py",
    ),
}
SKIP = ("_bootstrap", "_bootstrap_inner", "run (threading.py", "_worker (concurrent")


def _frame_name(frame: str) -> str:
    """``func (path:line)`` -> ``func (short/path)``: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    for marker in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


PROJECT = ("crm_core/", "smtp_mail/", "exchange_mail/", "maildir_mail/")


def _package(name: str) -> str:
    """The top-level module of a frame, e.g. ``sqlalchemy`` or ``email`` or ``crm_core``."""
    path = name.rpartition(" (")[2].rstrip(")")
    for marker in PROJECT:
        if marker in path:
            return marker.rstrip("/")
    first = path.split("/", 1)[0]
    return first.removesuffix(".py") or path


def summarise(raw: str, top: int = 16) -> dict[str, Any]:
    """Per phase: project functions by inclusive share, and self time by package."""
    phases: dict[str, Any] = {}
    for phase, markers in PHASES.items():
        inclusive: Counter[str] = Counter()
        packages: Counter[str] = Counter()
        total = 0
        for line in raw.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit() or not any(m in stack for m in markers):
                continue
            count = int(count_text)
            names = [_frame_name(f) for f in stack.split(";") if not f.startswith(SKIP)]
            total += count
            for name in set(names):
                if any(m in name for m in PROJECT):
                    inclusive[name] += count
            if names:
                packages[_package(names[-1])] += count
        phases[phase] = {
            "samples": total,
            "project_inclusive": [(n, c / total) for n, c in inclusive.most_common(top)],
            "self_by_package": [(n, c / total) for n, c in packages.most_common(10)],
        }
    return phases


def as_text(summary: dict[str, Any]) -> str:
    """The summary as Markdown tables (pasted into docs/performance.md)."""
    parts = []
    for phase, data in summary.items():
        parts.append(f"#### {phase}: {data['samples']} samples\n")
        parts.append("| share (inclusive) | project function |\n|---:|---|")
        for name, share in data["project_inclusive"]:
            parts.append(f"| {share:.0%} | `{name}` |")
        parts.append("\n| share (self) | package where the sample was taken |\n|---:|---|")
        for name, share in data["self_by_package"]:
            parts.append(f"| {share:.0%} | `{name}` |")
        parts.append("")
    return "\n".join(parts)


def profile_dispatch(opts: Options, pg: Postgres | None) -> dict[str, Any]:
    """Run case 1's SQLite project trial under ``py-spy record``; the summary."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"text": "py-spy is not installed (pip install -e '.[bench]')", "phases": {}}
    n = opts.n(2000, 300)
    folder = Path(tempfile.mkdtemp(prefix="profile-", dir=opts.work_dir))
    out = folder / "stacks.txt"
    with smtp_server(opts.work_dir) as server:
        params = {
            "port": server.port,
            "n": n,
            "warmup": 20,
            "database_url": f"sqlite:///{folder / 'crm.db'}",
            "dir": str(folder),
        }
        command = [sys.executable, "-m", "bench.child", "bench.case_smtp:child_project"]
        log(f"profile: py-spy on case 1's SQLite trial ({n} mails)")
        subprocess.run(
            [
                spy,
                "record",
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                str(out),
                "--",
                *command,
                json.dumps(params),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
    summary = summarise(out.read_text(encoding="utf-8"))
    return {"n": n, "phases": summary, "text": as_text(summary)}
