"""Case 4: mails queued per second through the Python API (``enqueue.enqueue``).

Two shapes of use: a bulk send (every mail in one transaction) and a CRM where users
click "send" (one transaction per mail). The limit is the database driver inserting
the same outbox rows with ``executemany`` in one transaction: what it costs to write
the rows at all, without validation, sender checks or the ORM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.core import Options, Row, Spread, log, ratios, run_child, timed
from bench.postgres import Postgres

MAIN_RATIOS = {
    "sqlite": {"one_transaction": 868 / 21_010, "per_mail": 677 / 21_010},
    "postgres": {"one_transaction": 323 / 34_480, "per_mail": 218 / 34_480},
}
"""Single enqueue before this work (154c824, docs/performance.md), as ratios to the
driver's executemany measured in the same run: the goal is 3 × these."""
BULK_GOAL = 0.25


def _goal(backend: str, key: str) -> tuple[float, str]:
    if key == "many":
        return BULK_GOAL, f"≥ {BULK_GOAL} × limit"
    before = MAIN_RATIOS[backend][key]
    return 3 * before, f"≥ 3 × before ({before:.3f} × limit) = {3 * before:.2f} × limit"


def child_enqueue(params: dict[str, Any]) -> dict[str, Any]:
    """Time both shapes of enqueue and the driver's own insert of the same rows."""
    from bench.world import (
        SMTP_CONFIG,
        add_smtp_sender,
        enqueue,
        enqueue_bulk,
        new_secret_key,
        open_crm,
    )

    n = params["n"]
    crm = open_crm(Path(params["dir"]), params["database_url"], new_secret_key(), SMTP_CONFIG)
    add_smtp_sender(crm, 2525)  # nothing is sent in this case
    enqueue(crm, params["warmup"])
    enqueue(crm, params["warmup"], start=params["warmup"], one_transaction=False)
    enqueue_bulk(crm, params["warmup"], start=2 * params["warmup"])
    many = timed(lambda: enqueue_bulk(crm, n, start=30_000_000))
    bulk = timed(lambda: enqueue(crm, n, start=10_000_000))
    single = timed(lambda: enqueue(crm, n, start=20_000_000, one_transaction=False))
    raw = _driver_insert(crm, n)
    crm.close()
    return {"many": many, "one_transaction": bulk, "per_mail": single, "driver": raw}


def _driver_insert(crm: Any, n: int) -> float:
    """Seconds for the DB-API driver to insert ``n`` copies of a queued row, one commit."""
    from crm_core.models import OutboxMessage

    table = OutboxMessage.__table__
    columns = [c.name for c in table.columns if c.name not in ("id", "message_id")]
    postgres = crm.engine.dialect.name == "postgresql"
    mark = "%s" if postgres else "?"
    raw = crm.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute(f"SELECT {', '.join(columns)} FROM outbox LIMIT 1")
        template = list(cursor.fetchone())
        if postgres:
            from psycopg.types.json import Json

            template = [Json(v) if isinstance(v, dict | list) else v for v in template]
        raw.commit()
        sql = (
            f"INSERT INTO outbox (message_id, {', '.join(columns)}) "
            f"VALUES ({', '.join([mark] * (len(columns) + 1))})"
        )
        rows = [(f"<driver.{i}@example.com>", *template) for i in range(n)]

        def insert() -> None:
            cursor.executemany(sql, rows)
            raw.commit()

        return timed(insert)
    finally:
        raw.close()


def run_case4(opts: Options, pg: Postgres | None) -> list[Row]:
    """Enqueue rates on SQLite and PostgreSQL, against the driver's executemany."""
    n = opts.n(2000, 300)
    backends = ["sqlite"] + (["postgres"] if pg is not None else [])
    results: dict[str, list[dict[str, Any]]] = {b: [] for b in backends}
    for trial in range(opts.trials):
        for backend in backends:
            log(f"case 4 trial {trial + 1}/{opts.trials}: {backend} ({n} mails per shape)")
            folder = tempfile.mkdtemp(prefix="enqueue-", dir=opts.work_dir)
            params: dict[str, Any] = {"n": n, "warmup": max(20, n // 20), "dir": folder}
            if backend == "sqlite":
                params["database_url"] = f"sqlite:///{Path(folder) / 'crm.db'}"
                results[backend].append(run_child("bench.case_enqueue:child_enqueue", params))
            else:
                assert pg is not None
                with pg.database() as url:
                    params["database_url"] = url
                    results[backend].append(run_child("bench.case_enqueue:child_enqueue", params))
    rows = []
    for backend in backends:
        label = "SQLite" if backend == "sqlite" else "PostgreSQL"
        found = results[backend]
        limit_rates = [n / r["driver"] for r in found]
        limit = Spread.of(limit_rates)
        rss = max(r["peak_rss_mb"] for r in found)
        rows.append(
            Row(
                4,
                f"driver executemany of the same rows, one transaction, {label} (limit)",
                limit,
                limit=True,
                ratio=Spread.of([1.0] * len(found)),
                notes=f"{n} rows",
                details={"trials": found},
            )
        )
        shapes = (
            ("many", "enqueue_many, one call"),
            ("one_transaction", "one transaction"),
            ("per_mail", "one by one"),
        )
        for key, shape in shapes:
            rates = [n / r[key] for r in found]
            goal_ratio, goal = _goal(backend, key)
            rows.append(
                Row(
                    4,
                    f"crm-mail enqueue, {shape}, {label}",
                    Spread.of(rates),
                    ratio=ratios(rates, limit),
                    peak_rss_mb=rss,
                    notes=f"{n} mails"
                    + ("; a commit per mail" if key == "per_mail" else "; one commit")
                    + ("; a recipient each" if key == "many" else ""),
                    details={"seconds": [r[key] for r in found]},
                    goal=goal,
                    goal_ratio=goal_ratio,
                    # the goal 3: bulk, and single enqueue in the caller's
                    # transaction; one commit per mail is measured besides
                    goal_id="" if key == "per_mail" else "3",
                )
            )
    return rows
