"""Case 6: SMTP over a link with 20 ms round-trip time (a real network, not loopback).

Every variant sends the same tiny mails to a fresh SMTP server process through the
latency proxy (:mod:`tests.servers.latency`, run in the benchmark's parent process,
which only waits while a trial runs), which delays each direction by 10 ms:

* Django's SMTP backend ``send_messages`` (one connection, a round trip per command):
  the reference, and the goal is crm-mail at ≥ 4 × its rate;
* raw smtplib ``sendmail`` of pre-built bytes on one connection (no pipelining),
  for reference;
* crm-mail: enqueue, then one ``Worker.run_once`` on SQLite (claim, render, send,
  record), with PIPELINING and ``mail.max_connections`` at its default of 3
  (Microsoft 365's limit per mailbox).

The proxy counts each variant's connections, the most open at once, and the client's
flights (writes the client makes before the server answers: the round trips). Each
row's name says the connections it used, as the proxy saw them; the crm-mail row carries
goal 5 (≥ 4 × Django's rate, at most 3 connections).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.case_smtp import warmup_count
from bench.core import Options, Row, Spread, log, run_child
from bench.postgres import Postgres
from bench.servers import exactly_once, smtp_server, wait_for_ids
from tests.servers.latency import LatencyProxy

RTT_MS = 20.0
GOAL = 4.0

MOST_CONNECTIONS = 3
"""Exchange Online's limit per sender account, which the goal keeps."""

VARIANTS = (
    ("django", "bench.case_smtp:child_django", "Django SMTP backend send_messages, 1 connection"),
    (
        "raw",
        "bench.case_smtp:child_raw_smtplib",
        "raw smtplib sendmail, 1 connection, no pipelining",
    ),
    (
        "crm",
        "bench.case_smtp:child_project",
        f"crm-mail dispatch, SQLite (claim, send, record), PIPELINING, up to "
        f"{MOST_CONNECTIONS} connections (mail.max_connections)",
    ),
)


def _trial(opts: Options, key: str, target: str, n: int) -> dict[str, Any]:
    """One child against a fresh server behind a fresh proxy; exactly once, checked."""
    with smtp_server(opts.work_dir) as server, LatencyProxy(server.port, RTT_MS / 1000) as proxy:
        warmup = warmup_count(n)
        params: dict[str, Any] = {"port": proxy.port, "n": n, "warmup": warmup}
        if key == "crm":
            folder = Path(tempfile.mkdtemp(prefix="latency-", dir=opts.work_dir))
            params["database_url"] = f"sqlite:///{folder / 'crm.db'}"
            params["dir"] = str(folder)
        result = run_child(target, params)
        received = wait_for_ids(server, warmup + n)
        check = exactly_once(result.pop("ids"), received[warmup:])
        result["connections"] = proxy.connections
        result["peak_connections"] = proxy.peak_connections
        result["flights"] = sum(proxy.flights())
        result["messages"] = warmup + n
    if check["missing"] or check["duplicates"] or check["unexpected"]:
        raise RuntimeError(f"{key} at {RTT_MS} ms: not exactly once at the server: {check}")
    if key == "crm" and result["states"] != {"sent": warmup + n}:
        raise RuntimeError(f"crm-mail at {RTT_MS} ms: rows not all sent: {result['states']}")
    result["check"] = check
    return result


def run_case6(opts: Options, pg: Postgres | None) -> list[Row]:
    """Django, raw smtplib and crm-mail through a 20 ms round-trip link, side by side."""
    n = opts.n(300, 60)
    results: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in VARIANTS}
    for trial in range(opts.trials):
        for key, target, _ in VARIANTS:  # interleaved, so drifting load hits each alike
            log(f"case 6 trial {trial + 1}/{opts.trials}: {key} ({n} mails, {RTT_MS:g} ms RTT)")
            results[key].append(_trial(opts, key, target, n))
    seconds = {"django": "seconds", "raw": "seconds", "crm": "dispatch_seconds"}
    django = Spread.of([n / r["seconds"] for r in results["django"]])
    rows = []
    for key, _, name in VARIANTS:
        found = results[key]
        rates = [n / r[seconds[key]] for r in found]
        ratio = Spread.of([rate / django.median for rate in rates])
        most = max(r["peak_connections"] for r in found)
        row = Row(
            6,
            f"{name}, {RTT_MS:g} ms RTT" + (" (reference)" if key == "django" else ""),
            Spread.of(rates),
            limit=key == "django",
            ratio=ratio,
            peak_rss_mb=max(r["peak_rss_mb"] for r in found),
            notes=_notes(found, n, most),
            details={"trials": found, "connections": most},
        )
        if key == "crm":
            row.goal = f"≥ {GOAL:g} × Django, ≤ {MOST_CONNECTIONS} connections"
            row.met = ratio.median >= GOAL and most <= MOST_CONNECTIONS
            row.goal_id = "5"
        rows.append(row)
    return rows


def _notes(found: list[dict[str, Any]], n: int, most: int) -> str:
    last = found[-1]
    flights = last["flights"] / last["messages"]
    return (
        f"{n} mails, exactly once at the server; at most {most} connection(s) open at once "
        "as the proxy saw them (a session's close can overlap the next one's opening by "
        f"half a round trip); {flights:.2f} client writes per mail (incl. warm-up and "
        "sessions)"
    )
