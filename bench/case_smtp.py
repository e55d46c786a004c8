"""Cases 1 and 2: SMTP on one connection against the peers, and several worker processes.

Case 1 rows, each trial against a fresh SMTP server process:

* raw smtplib sending pre-built bytes on one connection (the practical limit);
* Django's SMTP e-mail backend ``send_messages`` (the common peer; it renders MIME);
* this project end to end: ``enqueue.enqueue`` of every mail in one transaction, then one
  ``Worker.run_once`` (claim, render, send, record every state), on SQLite and on
  PostgreSQL; the dispatch part alone is shown as its own row.

Case 2: the same mail queued on PostgreSQL, then 1, 2 and 4 real
``python -m crm_core outbox work --once`` processes; the server's record of
Message-IDs shows each mail arrived exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.core import (
    RECIPIENT,
    SENDER,
    SENDER_NAME,
    Options,
    Row,
    Spread,
    log,
    ratios,
    run_child,
    timed_cpu,
    wait_watching_memory,
)
from bench.postgres import Postgres
from bench.servers import exactly_once, smtp_server, wait_for_ids

CASE_LIMIT = "raw smtplib, pre-built bytes (limit)"


def warmup_count(n: int) -> int:
    """Mails sent untimed first in each trial process (imports, caches, first connect)."""
    return max(20, min(200, n // 10))


# --- children (each runs in a fresh interpreter, see bench.child) ---------------------


def child_raw_smtplib(params: dict[str, Any]) -> dict[str, Any]:
    """smtplib.sendmail of pre-rendered messages on one connection."""
    import email.policy
    import smtplib
    import ssl
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    from bench.world import body, subject

    def render(i: int) -> tuple[str, bytes]:
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["Message-ID"] = make_msgid(domain="example.com")
        msg["Date"] = formatdate()
        msg["From"] = f"{SENDER_NAME} <{SENDER}>"
        msg["To"] = RECIPIENT
        msg["Subject"] = subject(i)
        msg.set_content(body(i))
        return str(msg["Message-ID"]), msg.as_bytes()

    tls = params.get("tls")

    def send(batch: list[tuple[str, bytes]]) -> None:
        with smtplib.SMTP("127.0.0.1", params["port"], timeout=30) as conn:
            if tls is not None:  # as a Postfix relay asks: STARTTLS, EHLO again, AUTH
                conn.starttls(context=ssl.create_default_context(cafile=tls["ca"]))
                conn.login(tls["user"], tls["password"])
            for _, data in batch:
                conn.sendmail(SENDER, [RECIPIENT], data)

    send([render(i) for i in range(params["warmup"])])
    batch = [render(i) for i in range(params["n"])]
    seconds, cpu = timed_cpu(lambda: send(batch))
    return {"seconds": seconds, "cpu_seconds": cpu, "ids": [mid for mid, _ in batch]}


def child_django(params: dict[str, Any]) -> dict[str, Any]:
    """Django's SMTP backend: ``get_connection().send_messages(messages)``."""
    import django  # type: ignore[import-untyped]
    from django.conf import settings  # type: ignore[import-untyped]

    tls = params.get("tls") or {}
    settings.configure(
        EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        EMAIL_PORT=params["port"],
        EMAIL_USE_TLS=bool(tls),  # verified against SSL_CERT_FILE, set by the parent
        EMAIL_HOST_USER=tls.get("user", ""),
        EMAIL_HOST_PASSWORD=tls.get("password", ""),
        EMAIL_TIMEOUT=30,
    )
    django.setup()
    from django.core.mail import EmailMessage, get_connection  # type: ignore[import-untyped]
    from django.core.mail.message import make_msgid  # type: ignore[import-untyped]

    from bench.world import body, subject

    def messages(count: int) -> list[EmailMessage]:
        return [
            EmailMessage(
                subject(i),
                body(i),
                f"{SENDER_NAME} <{SENDER}>",
                [RECIPIENT],
                headers={"Message-ID": make_msgid(domain="example.com")},
            )
            for i in range(count)
        ]

    get_connection().send_messages(messages(params["warmup"]))
    batch = messages(params["n"])
    seconds, cpu = timed_cpu(lambda: get_connection().send_messages(batch))
    ids = [m.extra_headers["Message-ID"] for m in batch]
    return {"seconds": seconds, "cpu_seconds": cpu, "ids": ids}


def child_project(params: dict[str, Any]) -> dict[str, Any]:
    """This project: enqueue through the API in one transaction, then one worker drains."""
    from bench.world import SMTP_CONFIG, add_smtp_sender, enqueue, new_secret_key, open_crm
    from bench.world import states as count_states
    from crm_core.mail.worker import Worker

    crm = open_crm(Path(params["dir"]), params["database_url"], new_secret_key(), SMTP_CONFIG)
    add_smtp_sender(crm, params["port"], params.get("tls"))
    worker = Worker(crm, name="bench-worker", concurrency=1)
    enqueue(crm, params["warmup"])
    warm = worker.run_once()
    assert warm.sent == params["warmup"], warm
    ids: list[str] = []
    t_enqueue, cpu_enqueue = timed_cpu(
        lambda: ids.extend(enqueue(crm, params["n"], start=params["warmup"]))
    )
    stats = []
    t_dispatch, cpu_dispatch = timed_cpu(lambda: stats.append(worker.run_once()))
    result = {
        "enqueue_seconds": t_enqueue,
        "dispatch_seconds": t_dispatch,
        "seconds": t_enqueue + t_dispatch,
        "dispatch_cpu_seconds": cpu_dispatch,
        "cpu_seconds": cpu_enqueue + cpu_dispatch,
        "ids": ids,
        "stats": stats[0].as_dict(),
        "states": count_states(crm),
    }
    crm.close()
    return result


# --- the parent: trials, checks, rows ---------------------------------------------------


def _trial(
    opts: Options, target: str, n: int, database_url: str | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """One child against a fresh SMTP server; its result and the exactly-once check."""
    with smtp_server(opts.work_dir) as server:
        warmup = warmup_count(n)
        params: dict[str, Any] = {"port": server.port, "n": n, "warmup": warmup}
        if database_url is not None:
            params["database_url"] = database_url
            params["dir"] = tempfile.mkdtemp(prefix="crm-", dir=opts.work_dir)
        result = run_child(f"bench.case_smtp:{target}", params)
        received = wait_for_ids(server, warmup + n)
        check = exactly_once(result.pop("ids"), received[warmup:])
    if check["missing"] or check["duplicates"] or check["unexpected"]:
        raise RuntimeError(f"{target}: not exactly once at the server: {check}")
    return result, check


def _sqlite_url(opts: Options) -> str:
    folder = Path(tempfile.mkdtemp(prefix="sqlite-", dir=opts.work_dir))
    return f"sqlite:///{folder / 'crm.db'}"


def run_case1(opts: Options, pg: Postgres | None) -> list[Row]:
    """SMTP, one connection: raw smtplib, Django, this project on SQLite and PostgreSQL."""
    n = opts.n(2000, 300)
    variants: list[tuple[str, str]] = [("raw", "child_raw_smtplib"), ("django", "child_django")]
    variants.append(("sqlite", "child_project"))
    if pg is not None:
        variants.append(("postgres", "child_project"))
    results: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in variants}
    for trial in range(opts.trials):
        for key, target in variants:  # interleaved, so drifting load hits every variant
            log(f"case 1 trial {trial + 1}/{opts.trials}: {key} ({n} mails)")
            if key == "sqlite":
                result, _ = _trial(opts, target, n, _sqlite_url(opts))
            elif key == "postgres":
                assert pg is not None
                url = pg.create()
                try:
                    result, _ = _trial(opts, target, n, url)
                finally:
                    pg.drop(url)
            else:
                result, _ = _trial(opts, target, n)
            results[key].append(result)
    limit = Spread.of([n / r["seconds"] for r in results["raw"]])
    rows = [
        Row(
            1,
            CASE_LIMIT,
            limit,
            limit=True,
            ratio=Spread.of([1.0] * len(results["raw"])),
            peak_rss_mb=max(r["peak_rss_mb"] for r in results["raw"]),
            notes=_cpu(results["raw"], n),
        ),
        _row(1, "Django SMTP backend send_messages", results["django"], n, limit, "seconds"),
    ]
    for key, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        if key not in results:
            continue
        rows.append(
            _row(
                1,
                f"crm-mail end to end, {label} (enqueue + dispatch)",
                results[key],
                n,
                limit,
                "seconds",
                notes="enqueue in one transaction, then one worker; all rows end `sent`",
                goal_ratio=0.7,
                goal_id="2",
            )
        )
        rows.append(
            _row(
                1,
                f"crm-mail dispatch only, {label} (claim, send, record)",
                results[key],
                n,
                limit,
                "dispatch_seconds",
                goal_ratio=0.9,
                goal_id="1",
            )
        )
    for row in rows:
        row.notes = "; ".join(x for x in (row.notes, f"{n} mails, exactly once at the server") if x)
    return rows


def _cpu(results: list[dict[str, Any]], n: int) -> str:
    cpu = Spread.of([r["cpu_seconds"] * 1000 / n for r in results]).median
    return f"CPU {cpu:.2f} ms per mail"


def _row(
    case: int,
    name: str,
    results: list[dict[str, Any]],
    n: int,
    limit: Spread | None,
    key: str,
    notes: str = "",
    goal_ratio: float | None = None,
    goal_id: str = "",
) -> Row:
    rates = [n / r[key] for r in results]
    cpu_key = key.replace("seconds", "cpu_seconds")
    if all(cpu_key in r for r in results):  # what the process spent, every thread of it
        cpu = Spread.of([r[cpu_key] * 1000 / n for r in results]).median
        notes = "; ".join(x for x in (notes, f"CPU {cpu:.2f} ms per mail") if x)
    return Row(
        case,
        name,
        Spread.of(rates),
        ratio=ratios(rates, limit),
        peak_rss_mb=max(r["peak_rss_mb"] for r in results),
        notes=notes,
        details={"trials": results},
        goal_ratio=goal_ratio,
        goal_id=goal_id,
    )


# --- case 2: worker processes on PostgreSQL -------------------------------------------------


def _workers_trial(opts: Options, pg: Postgres, n: int, workers: int) -> dict[str, Any]:
    from bench.world import (
        SMTP_CONFIG,
        add_smtp_sender,
        crm_env,
        dispatch_window,
        enqueue,
        new_secret_key,
        open_crm,
        states,
    )

    folder = Path(tempfile.mkdtemp(prefix=f"workers{workers}-", dir=opts.work_dir))
    url = pg.create()
    key = new_secret_key()
    try:
        with smtp_server(opts.work_dir) as server:
            crm = open_crm(folder, url, key, SMTP_CONFIG)
            try:
                add_smtp_sender(crm, server.port)
                ids = enqueue(crm, n)
                env = {**os.environ, **crm_env(url, key, folder / "crm.toml")}
                start = time.perf_counter()
                procs = [
                    subprocess.Popen(
                        [sys.executable, "-m", "crm_core", "outbox", "work", "--once", "--json"],
                        cwd=folder,
                        env=env,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                    for _ in range(workers)
                ]
                ended = wait_watching_memory(procs)  # their --json output is tiny
                rss: list[float] = []
                sent: list[int] = []
                for proc, (code, peak) in zip(procs, ended, strict=True):
                    assert proc.stdout is not None
                    output = proc.stdout.read()
                    proc.stdout.close()
                    if code != 0:
                        raise RuntimeError(f"worker exited {code}: {output[-500:]}")
                    rss.append(peak)
                    sent.append(int(json.loads(output)["sent"]))
                wall = time.perf_counter() - start
                window = dispatch_window(crm)
                final = states(crm)
            finally:
                crm.close()
            check = exactly_once(ids, wait_for_ids(server, n))
    finally:
        pg.drop(url)
    if check["missing"] or check["duplicates"] or check["unexpected"] or final != {"sent": n}:
        raise RuntimeError(f"{workers} workers: not exactly once: {check}, states {final}")
    return {
        "seconds": window,
        "wall_seconds": wall,
        "sent_per_worker": sent,
        "peak_rss_mb": max(rss),
        "check": check,
    }


def run_case2(opts: Options, pg: Postgres | None) -> list[Row]:
    """Throughput as worker processes go 1 -> 2 -> 4 on PostgreSQL, exactly once."""
    if pg is None:
        return [Row(2, "skipped: no PostgreSQL", None, notes="set CRM_BENCH_POSTGRES_URL")]
    n = opts.n(2000, 300)
    counts = (1, 2, 4)
    raw: list[dict[str, Any]] = []
    results: dict[int, list[dict[str, Any]]] = {k: [] for k in counts}
    for trial in range(opts.trials):
        log(f"case 2 trial {trial + 1}/{opts.trials}: raw smtplib ({n} mails)")
        raw.append(_trial(opts, "child_raw_smtplib", n)[0])
        for workers in counts:
            log(f"case 2 trial {trial + 1}/{opts.trials}: {workers} worker processes")
            results[workers].append(_workers_trial(opts, pg, n, workers))
    limit = Spread.of([n / r["seconds"] for r in raw])
    rows = [
        Row(
            2,
            "raw smtplib, one connection (limit)",
            limit,
            limit=True,
            ratio=Spread.of([1.0] * len(raw)),
            peak_rss_mb=max(r["peak_rss_mb"] for r in raw),
            notes=f"{n} mails",
        )
    ]
    for workers in counts:
        found = results[workers]
        walls = [n / r["wall_seconds"] for r in found]
        split = [r["sent_per_worker"] for r in found]
        row = _row(
            2,
            f"crm-mail, {'1 worker process' if workers == 1 else f'{workers} worker processes'}, "
            "PostgreSQL",
            found,
            n,
            limit,
            "seconds",
        )
        row.notes = (
            f"{n} mails, exactly once at the server; incl. process start "
            f"{Spread.of(walls).median:,.0f} msg/s; split {split[len(split) // 2]}"
        )
        rows.append(row)
    return rows
