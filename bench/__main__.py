"""``python -m bench`` (``make bench``): every case, one table, and the same as JSON.

Usage (from the repository root)::

    python -m bench                        # the full run documented in docs/performance.md
    python -m bench --quick                # small N, for a smoke run
    python -m bench --cases 1,3            # some cases only
    python -m bench --cases 6              # SMTP over a 20 ms round-trip link
    python -m bench --cases 9              # STARTTLS + AUTH (a Postfix-shaped server)
    python -m bench --json PATH            # where the JSON goes (bench/results/latest.json)
    python -m bench --profile              # also profile case 1's project trial (py-spy)
    python -m bench --cases "" --profile   # only the profile
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.core import REPO, Options, Row, Spread, log, machine, package_versions
from bench.postgres import Postgres, postgres

CASE_TITLES = {
    1: "SMTP, one connection",
    2: "SMTP, worker processes on PostgreSQL",
    3: "Exchange (EWS stand-in)",
    4: "Enqueue through the Python API",
    5: "Scale: 100,000 queued mails, one worker",
    6: "SMTP over a 20 ms round-trip link (pipelining, parallel connections)",
    7: "Latency: commit to the server's 250, idle worker",
    8: "Start-up: `crm outbox work` to its first claim",
    9: "SMTP, Postfix-shaped: STARTTLS + AUTH",
}

GOALS = {
    "1": ("dispatch (claim, send, record) ≥ 0.9 × raw smtplib, SQLite and PostgreSQL", (1, 9)),
    "2": ("end to end (enqueue + dispatch) ≥ 0.7 × raw smtplib", (1, 9)),
    "3": ("enqueue_many ≥ 0.25 × the driver's executemany; single enqueue ≥ 3 × before", (4,)),
    "4": ("commit → the server's 250, idle worker: p50 ≤ 50 ms, p99 ≤ 250 ms", (7,)),
    "5": ("20 ms RTT: ≥ 4 × Django's rate, at most 3 connections", (6,)),
    "6": ("100,000 queued mails: worker memory flat, rate flat", (5,)),
    "7": ("start-up to the first claim < 0.3 × before", (8,)),
}
"""The issue's goals, and the cases whose rows measure them (``Row.goal_id``)."""


def parse(argv: Sequence[str] | None) -> Options:
    """The command line as :class:`Options`."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small N (a smoke run)")
    parser.add_argument(
        "--cases",
        default=",".join(str(c) for c in CASE_TITLES),
        help="comma-separated case numbers",
    )
    parser.add_argument("--trials", type=int, default=3, help="timed trials per variant")
    parser.add_argument(
        "--json", type=Path, default=REPO / "bench" / "results" / "latest.json", dest="json_path"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy profile of case 1")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    cases = tuple(sorted({int(c) for c in args.cases.split(",") if c.strip()}))
    unknown = [c for c in cases if c not in CASE_TITLES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {sorted(CASE_TITLES)}")
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="crm-bench-"))
    options = Options(args.quick, args.trials, cases, args.json_path, work, args.profile)
    if not args.keep:
        import atexit

        atexit.register(shutil.rmtree, work, True)
    return options


RUNNERS = {
    1: "bench.case_smtp:run_case1",
    2: "bench.case_smtp:run_case2",
    3: "bench.case_exchange:run_case3",
    4: "bench.case_enqueue:run_case4",
    5: "bench.case_scale:run_case5",
    6: "bench.case_rtt:run_case6",
    7: "bench.case_latency:run_case7",
    8: "bench.case_startup:run_case8",
    9: "bench.case_postfix:run_case9",
}


def runner(case: int) -> Callable[[Options, Postgres | None], list[Row]]:
    """The function that runs ``case`` (imported only when that case runs)."""
    module, _, name = RUNNERS[case].partition(":")
    found: Callable[[Options, Postgres | None], list[Row]] = getattr(
        importlib.import_module(module), name
    )
    return found


def fmt_spread(spread: Spread | None, digits: int = 0, unit: str = "") -> str:
    """``median (min–max)``."""
    if spread is None:
        return "—"
    f = f"{{:,.{digits}f}}"
    return f"{f.format(spread.median)}{unit} ({f.format(spread.min)}–{f.format(spread.max)})"


def _result(row: Row) -> str:
    digits = 1 if row.unit.startswith("ms") else 0
    return fmt_spread(row.rate, digits) + (f" {row.unit}" if row.rate else "")


def goals_table(rows: Sequence[Row], cases: Sequence[int]) -> str:
    """Every goal of the issue, one line per row that measures it: the variant, what it
    is measured against, the result, the ratio, the goal and whether it is met. A goal
    whose case did not run says so."""
    lines = [
        "| goal | variant | measured against | result, median (min–max) | ratio "
        "| goal | met |\n|---|---|---|---|---|---|---|"
    ]
    limits = _limits(rows)
    for goal_id, (words, measured_by) in GOALS.items():
        found = [r for r in rows if r.goal_id == goal_id]
        if not found:
            which = ", ".join(str(c) for c in measured_by)
            ran = any(c in cases for c in measured_by)
            why = "no row (see the detail table)" if ran else f"case {which} not run"
            lines.append(f"| {goal_id} | {words}: {why} | — | — | — | — | — |")
            continue
        for row in found:
            met = {True: "**met**", False: "**not met**", None: "—"}[row.met]
            ratio = row.goal_result or (fmt_spread(row.ratio, 2) if row.ratio else "—")
            against = row.against or limits.get(id(row), "—")
            lines.append(
                f"| {goal_id} | case {row.case}: {row.name} | {against} | {_result(row)} "
                f"| {ratio} | {row.goal} | {met} |"
            )
    return "\n".join(lines)


def _limits(rows: Sequence[Row]) -> dict[int, str]:
    """Each row's limit row (a case's rows follow the limit they are measured against)."""
    found: dict[int, str] = {}
    limit_name = "—"
    for row in rows:
        if row.limit:
            limit_name = row.name
        elif not row.against:
            found[id(row)] = limit_name
    return found


def table(rows: Sequence[Row]) -> str:
    """The rows as one Markdown table (what the docs show): each variant, what it is
    measured against (its case's limit row, measured in the same run), the ratio, and
    the goal with whether it is met."""
    head = (
        "| case | variant | measured against | rate, median (min–max) | × limit | goal | met "
        "| peak RSS | requests per mail | notes |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    limit_name = "—"
    for row in rows:
        if row.limit:
            limit_name = row.name  # a case's rows follow the limit they are measured against
        rate = fmt_spread(row.rate, 1 if row.unit.startswith("ms") else 0) + (
            f" {row.unit}" if row.rate else ""
        )
        against = "—" if row.limit else row.against or limit_name
        ratio = "limit" if row.limit else fmt_spread(row.ratio, 2)
        met = {True: "**yes**", False: "**no**", None: "—"}[row.met]
        lines.append(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                row.case,
                row.name,
                against,
                rate,
                ratio,
                row.goal or "—",
                met,
                f"{row.peak_rss_mb:,.0f} MiB" if row.peak_rss_mb is not None else "—",
                f"{row.requests_per_message:.3f}" if row.requests_per_message is not None else "—",
                row.notes,
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen cases, print the table, write the JSON."""
    opts = parse(argv)
    started = time.time()
    env: dict[str, Any] = {"versions": package_versions(), "machine": machine()}
    rows: list[Row] = []
    per_case: dict[str, Any] = {}
    with postgres() as pg:
        if pg is not None:
            env["versions"]["postgresql-server"] = pg.version
            env["postgresql"] = pg.how
        for case in opts.cases:
            log(f"case {case}: {CASE_TITLES[case]}")
            load_before = machine()["load_average"]
            case_start = time.time()
            found = runner(case)(opts, pg)
            rows.extend(found)
            per_case[str(case)] = {
                "title": CASE_TITLES[case],
                "seconds": round(time.time() - case_start, 1),
                "load_average_before": load_before,
                "load_average_after": machine()["load_average"],
            }
        if opts.profile:
            from bench.profile import profile_dispatch

            env["profile"] = profile_dispatch(opts, pg)
    env["machine_after"] = machine()
    goals = goals_table(rows, opts.cases)
    report = {
        "goals_table": goals,
        "quick": opts.quick,
        "trials": opts.trials,
        "seconds": round(time.time() - started, 1),
        "environment": env,
        "cases": per_case,
        "rows": [r.as_dict() for r in rows],
        "table": table(rows),
    }
    opts.json_path.parent.mkdir(parents=True, exist_ok=True)
    opts.json_path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(_environment_text(env))
    print()
    print("Goals (issue 14): every goal, each row that measures it")
    print()
    print(goals)
    print()
    print("Every row (the details: limits, references, peak memory, notes)")
    print()
    print(report["table"])
    if "profile" in env:
        print()
        print(env["profile"]["text"])
    log(f"done in {report['seconds']} s; JSON in {opts.json_path}")
    return 0


def _environment_text(env: dict[str, Any]) -> str:
    m = env["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (
        f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['memory_gib']} GiB, "
        f"{m['os']}; load average at start {m['load_average']}, "
        f"at end {env['machine_after']['load_average']}\nSoftware: {versions}"
    )


if __name__ == "__main__":
    sys.exit(main())
