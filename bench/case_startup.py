"""Case 8: start-up, from launching ``crm outbox work --once`` to its first claim.

An SMTP-only installation with one mail queued. The time is from just before the
process is started to the first attempt's ``started_at`` (the claim; on this machine
the database's clock and this process's are the same clock). The reference row is
the floor any worker on the ORM pays: a fresh interpreter importing
``sqlalchemy.orm``. Also recorded: which of the optional packages (plugins for other
transports, exchangelib, msal, requests, flask) the worker imported, read from
``python -X importtime``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from statistics import median
from typing import Any

from bench.core import Options, Row, Spread, log, run_child
from bench.postgres import Postgres

HEAVY = ("exchange_mail", "maildir_mail", "exchangelib", "msal", "requests", "flask")
MAIN_SECONDS_OVER_REFERENCE = 1.51
"""Before this work (77594fd, imports as on main): first claim over the reference,
median of 7 runs on this machine under load (docs/performance.md)."""
GOAL_SHARE = 0.3


def child_startup(params: dict[str, Any]) -> dict[str, Any]:
    """Start worker processes one after another; seconds to each one's first claim."""
    from sqlalchemy import func, select

    from bench.servers import smtp_server
    from bench.world import SMTP_CONFIG, add_smtp_sender, crm_env, enqueue, new_secret_key, open_crm
    from crm_core.models import OutboxAttempt

    folder = Path(params["dir"])
    firsts: list[float] = []
    reference: list[float] = []
    imported: set[str] = set()
    with smtp_server(folder) as server:
        for run in range(params["runs"]):
            where = folder / f"run{run}"
            key = new_secret_key()
            url = f"sqlite:///{where / 'crm.db'}" if params["sqlite"] else params["database_url"]
            crm = open_crm(where, url, key, SMTP_CONFIG)
            if run == 0 or params["sqlite"]:
                add_smtp_sender(crm, server.port)
            enqueue(crm, 1, start=run)
            env = {**os.environ, **crm_env(url, key, where / "crm.toml")}
            # The last run lists the imports; the timed ones run without -X importtime.
            trace = ["-X", "importtime"] if run == params["runs"] - 1 else []
            command = [sys.executable, *trace, "-m", "crm_core", "outbox", "work", "--once"]
            started = time.time()
            done = subprocess.run(command, cwd=where, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"worker failed: {done.stderr[-2000:]}")
            with crm.transaction() as session:
                first = session.scalar(select(func.max(OutboxAttempt.started_at)))
            crm.close()
            assert first is not None
            if trace:
                imported |= {m for m in HEAVY if _imported(done.stderr, m)}
                continue
            firsts.append(first.replace(tzinfo=first.tzinfo or UTC).timestamp() - started)
            started = time.time()
            subprocess.run([sys.executable, "-c", "import sqlalchemy.orm"], check=True)
            reference.append(time.time() - started)
    return {"first_claim": firsts, "reference": reference, "imported": sorted(imported)}


def _imported(importtime: str, module: str) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == module for line in importtime.splitlines())


def run_case8(opts: Options, pg: Postgres | None) -> list[Row]:
    """Seconds to the first claim against the interpreter + SQLAlchemy floor."""
    runs = opts.n(8, 4)
    folder = tempfile.mkdtemp(prefix="startup-", dir=opts.work_dir)
    log(f"case 8: {runs} worker starts on SQLite")
    found = run_child(
        "bench.case_startup:child_startup", {"dir": folder, "runs": runs, "sqlite": True}
    )
    reference = Spread.of(found["reference"])
    firsts = found["first_claim"]
    ratio = Spread.of([f / reference.median for f in firsts])
    goal = GOAL_SHARE * MAIN_SECONDS_OVER_REFERENCE
    heavy = ", ".join(found["imported"]) or "none"
    return [
        Row(
            8,
            "fresh interpreter: `import sqlalchemy.orm` (reference)",
            Spread.of([s * 1000 for s in found["reference"]]),
            unit="ms",
            limit=True,
            ratio=Spread.of([1.0] * len(found["reference"])),
            notes=f"{runs - 1} runs",
        ),
        Row(
            8,
            "`crm outbox work --once` to its first claim, SMTP only, SQLite",
            Spread.of([s * 1000 for s in firsts]),
            unit="ms",
            ratio=ratio,
            goal=f"≤ {GOAL_SHARE} × before ({MAIN_SECONDS_OVER_REFERENCE:.2f} × reference) "
            f"= {goal:.2f} × reference",
            met=median(r for r in ratio.values) <= goal if goal else None,
            goal_id="7",
            notes=f"{runs - 1} timed runs; optional packages it imported (one more run, "
            f"`-X importtime`): {heavy}",
            details=found,
        ),
    ]
