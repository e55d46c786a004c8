"""Case 5: 100,000 queued mails dispatched over SMTP by one worker process, memory watched.

Setup: every mail is queued through the API, ``enqueue.enqueue_many`` in calls of
10,000 (each mail to its own recipient, with its bytes rendered at enqueue). Copying
rows, as this case did before bulk enqueue, would copy the stored bytes and with them
another mail's Message-ID.

Measured: one real ``python -m crm_core outbox work --once`` process drains them to the
SMTP server process. The parent reads the worker's peak RSS (VmHWM) every 0.1 s and
notes it each time the server's record passes another tenth of the mails. The rate's
median, min and max are over the slices between those marks, in one run (a second
100,000-mail run would not fit the time budget).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.core import Options, Row, Spread, log, peak_rss_mb, ratios
from bench.postgres import Postgres
from bench.servers import exactly_once, smtp_server, wait_for_ids

INSERT_CHUNK = 10_000


MEMORY_GROWTH = 1.1
"""Memory is flat when the peak at the end is at most this much the peak at a tenth."""
MEMORY_KEPT_MIB = 85.0
"""The issue: 85 MiB at 10,000 and at 100,000 mails before this work; keep it."""
RATE_FLAT = 0.8
"""The rate is flat when no slice of a tenth of the mails is slower than this share of
the median slice (the machine is shared: its load moves the rate too)."""


def _fill(crm: Any, n: int) -> list[str]:
    """``n`` queued mails, through ``enqueue_many`` in calls of INSERT_CHUNK."""
    from bench.world import enqueue_bulk

    ids: list[str] = []
    for first in range(0, n, INSERT_CHUNK):
        ids += enqueue_bulk(crm, min(INSERT_CHUNK, n - first), start=first)
    return ids


class _Record:
    """Counts the lines of the SMTP server's record file as it grows (no re-reading)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.count = 0

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            self.count += data.count(b"\n")
        return self.count


def run_case5(opts: Options, pg: Postgres | None) -> list[Row]:
    """One worker process dispatches N queued mails; RSS at N/10 and N; exactly once."""
    from bench.case_smtp import _trial
    from bench.world import (
        SMTP_CONFIG,
        add_smtp_sender,
        crm_env,
        dispatch_window,
        new_secret_key,
        open_crm,
        states,
    )

    n = opts.n(100_000, 3_000)
    tenth = n // 10
    folder = Path(tempfile.mkdtemp(prefix="scale-", dir=opts.work_dir))
    backend = "PostgreSQL" if pg is not None else "SQLite"
    url = pg.create() if pg is not None else f"sqlite:///{folder / 'crm.db'}"
    key = new_secret_key()
    limit_n = min(n, 10_000)
    log(f"case 5: raw smtplib limit ({limit_n} mails)")
    limit_runs = [_trial(opts, "child_raw_smtplib", limit_n)[0] for _ in range(opts.trials)]
    limit = Spread.of([limit_n / r["seconds"] for r in limit_runs])
    try:
        with smtp_server(opts.work_dir) as server:
            crm = open_crm(folder, url, key, SMTP_CONFIG)
            try:
                add_smtp_sender(crm, server.port)
                log(f"case 5: queueing {n:,} mails on {backend}")
                ids = _fill(crm, n)
                log(f"case 5: one worker process dispatches {n:,} mails")
                record = _Record(server.record_path)
                proc = subprocess.Popen(
                    [sys.executable, "-m", "crm_core", "outbox", "work", "--once", "--json"],
                    cwd=folder,
                    env={**os.environ, **crm_env(url, key, folder / "crm.toml")},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                peak = 0.0
                marks: list[tuple[int, float, float]] = []  # (mails, time, peak RSS so far)
                while proc.poll() is None:
                    peak = max(peak, peak_rss_mb(proc.pid) or 0.0)  # VmHWM: only grows
                    count = record.poll()
                    while len(marks) < 10 and count >= tenth * (len(marks) + 1):
                        marks.append((count, time.perf_counter(), peak))
                    time.sleep(0.1)
                code, final_peak = int(proc.returncode), peak
                if code != 0:
                    raise RuntimeError(f"scale worker exited {code}")
                window = dispatch_window(crm)
                final = states(crm)
            finally:
                crm.close()
            received = wait_for_ids(server, n, timeout=60)
            check = exactly_once(ids, received)
    finally:
        if pg is not None:
            pg.drop(url)
    if check["missing"] or check["duplicates"] or check["unexpected"] or final != {"sent": n}:
        raise RuntimeError(f"case 5: not exactly once: {check}, states {final}")
    slices = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in itertools.pairwise(marks) if b[1] > a[1]]
    rates = slices or [n / window]
    at_tenth = marks[0][2] if marks else peak
    memory_flat = final_peak <= min(at_tenth * MEMORY_GROWTH, MEMORY_KEPT_MIB)
    rate_flat = min(rates) >= RATE_FLAT * Spread.of(rates).median
    return [
        Row(
            5,
            f"raw smtplib, one connection, {limit_n:,} mails (limit)",
            limit,
            limit=True,
            ratio=Spread.of([1.0] * len(limit_runs)),
            peak_rss_mb=max(r["peak_rss_mb"] for r in limit_runs),
        ),
        Row(
            5,
            f"crm-mail, 1 worker process, {n:,} queued mails, {backend}",
            Spread.of(rates),
            ratio=ratios(rates, limit),
            peak_rss_mb=final_peak,
            against=f"itself: at {tenth:,} mails (memory), its median slice (rate)",
            goal_result=f"peak RSS {at_tenth:,.0f} → {final_peak:,.0f} MiB; slowest slice "
            f"{min(rates) / Spread.of(rates).median:.2f} × the median",
            goal=f"peak RSS at {n:,} ≤ {MEMORY_GROWTH:g} × at {tenth:,} and ≤ "
            f"{MEMORY_KEPT_MIB:g} MiB; every slice's rate ≥ {RATE_FLAT:g} × the median slice",
            met=memory_flat and rate_flat,
            goal_id="6",
            notes=(
                f"peak RSS {at_tenth:,.0f} MiB at {tenth:,} mails, {final_peak:,.0f} MiB at "
                f"{n:,}; {n / window:,.0f} msg/s over the whole run; rate spread over "
                f"{len(rates)} slices of {tenth:,} mails (slowest {min(rates):,.0f}); "
                f"memory {_flat(memory_flat)}, rate {_flat(rate_flat)}; exactly once at the server"
            ),
            details={
                "marks": marks,
                "window_seconds": window,
                "check": check,
            },
        ),
    ]


def _flat(flat: bool) -> str:
    return "flat" if flat else "NOT flat"
