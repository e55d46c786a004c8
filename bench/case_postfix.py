"""Case 9: a Postfix-shaped server: STARTTLS, then AUTH, as a real relay asks.

The SMTP stand-in runs in its own process with STARTTLS (a certificate of a test CA
made for the run) and requires AUTH after TLS; every client verifies the certificate
against that CA. The variants, interleaved in each trial round, each against a fresh
server process:

* raw smtplib: connect, STARTTLS, EHLO, login, ``sendmail`` of pre-built bytes on one
  connection (the limit);
* Django's SMTP backend ``send_messages`` (``EMAIL_USE_TLS``, user and password);
* crm-mail on SQLite: enqueue, then one ``Worker.run_once`` (``smtp.security``
  starttls, ``smtp.auth`` password, ``tls.ca_bundle`` the test CA), with
  ``mail.max_connections`` at its default (3) and PIPELINING as the stand-in offers it.

Besides the rate, each child measures its own CPU time over the timed part: CPU per
mail is what a busy machine pays, whatever the connections hide.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.case_smtp import warmup_count
from bench.core import Options, Row, Spread, log, ratios, run_child
from bench.postgres import Postgres
from bench.servers import exactly_once, wait_for_ids
from tests.servers.smtp import start_smtp_process
from tests.servers.tls import make_test_ca

USER = "relay-user"
PASSWORD = "relay-password-1"  # ASCII: smtplib and Django cannot send other
VARIANTS = (
    ("raw", "child_raw_smtplib"),
    ("django", "child_django"),
    ("sqlite", "child_project"),
)
LIMIT = "raw smtplib, STARTTLS + AUTH, pre-built bytes, one connection (limit)"


def _trial(opts: Options, key: str, target: str, n: int, ca_dir: Path) -> dict[str, Any]:
    """One child against a fresh STARTTLS + AUTH server; exactly once, checked."""
    ca = make_test_ca(ca_dir)
    folder = Path(tempfile.mkdtemp(prefix="postfix-", dir=opts.work_dir))
    server = start_smtp_process(
        folder, security="starttls", auth_user=USER, auth_password=PASSWORD, ca=ca
    )
    try:
        warmup = warmup_count(n)
        params: dict[str, Any] = {
            "port": server.port,
            "n": n,
            "warmup": warmup,
            "tls": {"ca": str(ca.ca_pem), "user": USER, "password": PASSWORD},
        }
        if key == "sqlite":
            params["database_url"] = f"sqlite:///{folder / 'crm.db'}"
            params["dir"] = str(folder)
        # Django verifies against the default trust store: the test CA is put there. Raw
        # smtplib names the CA file, and crm-mail adds it (tls.ca_bundle) to the system
        # trust store, which it loads as in production (the whole ca-certificates bundle).
        env = {"SSL_CERT_FILE": str(ca.ca_pem)} if key == "django" else None
        result = run_child(f"bench.case_smtp:{target}", params, env=env)
        received = wait_for_ids(server, warmup + n)
        check = exactly_once(result.pop("ids"), received[warmup:])
    finally:
        server.stop()
    if check["missing"] or check["duplicates"] or check["unexpected"]:
        raise RuntimeError(f"case 9 {key}: not exactly once at the server: {check}")
    if key == "sqlite" and result["states"] != {"sent": warmup + n}:
        raise RuntimeError(f"case 9 crm-mail: rows not all sent: {result['states']}")
    return result


def run_case9(opts: Options, pg: Postgres | None) -> list[Row]:
    """STARTTLS + AUTH: raw smtplib, Django and crm-mail side by side, rate and CPU."""
    n = opts.n(2000, 300)
    ca_dir = Path(tempfile.mkdtemp(prefix="ca-", dir=opts.work_dir))
    results: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in VARIANTS}
    for trial in range(opts.trials):
        for key, target in VARIANTS:  # interleaved, so drifting load hits every variant
            log(f"case 9 trial {trial + 1}/{opts.trials}: {key} ({n} mails, STARTTLS + AUTH)")
            results[key].append(_trial(opts, key, target, n, ca_dir))
    limit = Spread.of([n / r["seconds"] for r in results["raw"]])
    raw_cpu = _cpu_per_mail(results["raw"], "cpu_seconds", n)
    rows = [
        Row(
            9,
            LIMIT,
            limit,
            limit=True,
            ratio=Spread.of([1.0] * len(results["raw"])),
            peak_rss_mb=max(r["peak_rss_mb"] for r in results["raw"]),
            notes=_cpu_note(raw_cpu, raw_cpu, n),
        ),
        _row("Django SMTP backend send_messages, STARTTLS + AUTH", results["django"], n, limit),
        _row(
            "crm-mail end to end, SQLite, STARTTLS + AUTH (enqueue + dispatch)",
            results["sqlite"],
            n,
            limit,
            "seconds",
            goal_ratio=0.7,
            goal_id="2",
        ),
        _row(
            "crm-mail dispatch only, SQLite, STARTTLS + AUTH (claim, send, record)",
            results["sqlite"],
            n,
            limit,
            "dispatch_seconds",
            goal_ratio=0.9,
            goal_id="1",
        ),
    ]
    for row in rows[1:]:
        key = "dispatch_cpu_seconds" if "dispatch only" in row.name else "cpu_seconds"
        row.notes = _cpu_note(_cpu_per_mail(row.details["trials"], key, n), raw_cpu, n)
    return rows


def _row(
    name: str,
    found: list[dict[str, Any]],
    n: int,
    limit: Spread,
    key: str = "seconds",
    goal_ratio: float | None = None,
    goal_id: str = "",
) -> Row:
    rates = [n / r[key] for r in found]
    return Row(
        9,
        name,
        Spread.of(rates),
        ratio=ratios(rates, limit),
        peak_rss_mb=max(r["peak_rss_mb"] for r in found),
        details={"trials": found},
        goal_ratio=goal_ratio,
        goal_id=goal_id,
    )


def _cpu_per_mail(found: list[dict[str, Any]], key: str, n: int) -> float:
    """The median of the trials' CPU milliseconds per mail."""
    return Spread.of([r[key] * 1000 / n for r in found]).median


def _cpu_note(cpu_ms: float, raw_ms: float, n: int) -> str:
    return (
        f"{n} mails, exactly once at the server; CPU {cpu_ms:.2f} ms per mail "
        f"({cpu_ms / raw_ms:.1f} × raw smtplib's)"
    )
