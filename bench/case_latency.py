"""Case 7: latency from a commit to the SMTP server's 250, with an idle worker.

A real ``crm outbox work`` process (not ``--once``) waits, idle, with the default
``poll_seconds``; this process queues one mail at a time (``enqueue`` in its own
transaction) every 100 ms and notes when each commit returned. The SMTP server reports
each Message-ID as it answers 250 (read here from its stdout, on the same monotonic
clock). The numbers: p50, p99 and max of (250 − commit) over every mail, and every
mail exactly once at the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.core import Options, Row, Spread, log, run_child
from bench.postgres import Postgres
from bench.servers import exactly_once, smtp_server, wait_for_ids

GOAL_P50_MS = 50.0
GOAL_P99_MS = 250.0
INTERVAL = 0.1


def child_latency(params: dict[str, Any]) -> dict[str, Any]:
    """Start the SMTP server and an idle worker; queue a mail every 100 ms; latencies."""
    from bench.world import SMTP_CONFIG, add_smtp_sender, crm_env, enqueue, new_secret_key, open_crm

    folder = Path(params["dir"])
    key = new_secret_key()
    crm = open_crm(folder, params["database_url"], key, SMTP_CONFIG)
    with smtp_server(folder) as server:
        add_smtp_sender(crm, server.port)
        env = {**os.environ, **crm_env(params["database_url"], key, folder / "crm.toml")}
        worker = subprocess.Popen(
            [sys.executable, "-m", "crm_core", "outbox", "work"],
            cwd=folder,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            warm = enqueue(crm, params["warmup"], start=0, one_transaction=False)
            wait_for_ids(server, len(warm), timeout=120)
            time.sleep(1.0)  # the worker is idle again
            committed: dict[str, float] = {}
            next_at = time.monotonic()
            for i in range(params["n"]):
                next_at += INTERVAL
                (message_id,) = enqueue(crm, 1, start=1000 + i, one_transaction=False)
                committed[message_id] = time.monotonic()
                time.sleep(max(next_at - time.monotonic(), 0.0))
            received = wait_for_ids(server, len(warm) + params["n"], timeout=120)
            answered = server.accepted_at()
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    crm.close()
    check = exactly_once(warm + list(committed), received)
    if check["missing"] or check["duplicates"] or check["unexpected"]:
        raise RuntimeError(f"not exactly once at the server: {check}")
    latencies = sorted((answered[m] - t) * 1000.0 for m, t in committed.items())
    return {"latencies_ms": latencies, "check": check}


def percentile(sorted_values: list[float], share: float) -> float:
    """The nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, round(share * len(sorted_values)) - 1))
    return sorted_values[index]


def run_case7(opts: Options, pg: Postgres | None) -> list[Row]:
    """p50, p99 and max latency on SQLite and PostgreSQL, one trial each (500 mails)."""
    n = opts.n(500, 50)
    backends = ["sqlite"] + (["postgres"] if pg is not None else [])
    rows = []
    for backend in backends:
        label = "SQLite" if backend == "sqlite" else "PostgreSQL"
        log(f"case 7: {label}, {n} single mails every {INTERVAL * 1000:.0f} ms")
        folder = tempfile.mkdtemp(prefix="latency-", dir=opts.work_dir)
        params: dict[str, Any] = {"n": n, "warmup": 5, "dir": folder}
        if backend == "sqlite":
            params["database_url"] = f"sqlite:///{Path(folder) / 'crm.db'}"
            found = run_child("bench.case_latency:child_latency", params)
        else:
            assert pg is not None
            with pg.database() as url:
                params["database_url"] = url
                found = run_child("bench.case_latency:child_latency", params)
        ms = found["latencies_ms"]
        p50, p99, top = percentile(ms, 0.5), percentile(ms, 0.99), ms[-1]
        met = p50 <= GOAL_P50_MS and p99 <= GOAL_P99_MS
        rows.append(
            Row(
                7,
                f"commit → server's 250, idle `crm outbox work`, {label}",
                Spread.of([p50]),
                unit="ms p50",
                against=f"p50 ≤ {GOAL_P50_MS:.0f} ms, p99 ≤ {GOAL_P99_MS:.0f} ms",
                goal=f"p50 ≤ {GOAL_P50_MS:.0f} ms, p99 ≤ {GOAL_P99_MS:.0f} ms",
                met=met,
                goal_id="4",
                notes=f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {top:.1f} ms over {n} mails, "
                f"one every {INTERVAL * 1000:.0f} ms; exactly once at the server",
                details={"p50": p50, "p99": p99, "max": top, "check": found["check"]},
            )
        )
    return rows
