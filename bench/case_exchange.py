"""Case 3: Exchange through the EWS stand-in, against exchangelib in a plain loop.

* the limit for that path: exchangelib ``Message(...).send_and_save()`` one mail at a
  time, with an app-only token fetched once with msal and a pinned configuration
  (no autodiscover, version given), as a careful script would do it;
* this project: the mail queued through ``enqueue.enqueue`` (one transaction, SQLite),
  then one ``Worker.run_once``; the EWS transport batches up to 50 mails per
  CreateItem request, which is safe because EWS answers per message.

Counted by the stand-ins (in their own process): EWS HTTP requests and Entra ID token
requests. Each trial gets fresh stand-ins, so the counts are the trial's own. Pacing
is off for these (the stand-in is not Exchange Online, and no ``mail.*`` limit is set).

A paced row: one run with ``mail.rate_per_minute`` set, the worker polling until every
mail is sent; its figure is the most mails handed over in any rolling minute (from the
attempt log, the database's clock), next to the limit. It takes a little over a
minute, because a minute's budget only frees a minute later.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.core import RECIPIENT, Options, Row, Spread, log, ratios, run_child, timed
from bench.postgres import Postgres
from bench.servers import EwsProcess


def warmup_count(n: int) -> int:
    """Mails sent untimed first (imports, token, TLS session, folder lookups)."""
    return max(10, min(50, n // 20))


def _delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int:
    return int(after[key]) - int(before[key])


def child_exchangelib_loop(params: dict[str, Any]) -> dict[str, Any]:
    """exchangelib ``send_and_save`` in a plain loop (one CreateItem per mail)."""
    import time

    import msal
    from exchangelib import (
        IMPERSONATION,
        OAUTH2,
        Account,
        Configuration,
        FailFast,
        Identity,
        Mailbox,
        Message,
        OAuth2Credentials,
        Version,
    )
    from exchangelib.version import EXCHANGE_O365
    from oauthlib.oauth2 import OAuth2Token

    from bench.ews_process import read_stats
    from bench.world import body, subject
    from crm_core.mail.message import make_message_id

    info = params["ews"]
    start = read_stats(info["control_port"])
    app = msal.ConfidentialClientApplication(
        info["client_id"],
        client_credential=info["secret"],
        authority=f"{info['entra_url']}/{info['tenant']}",
        instance_discovery=False,
    )
    token = app.acquire_token_for_client(scopes=["https://outlook.office365.com/.default"])
    credentials = OAuth2Credentials(
        client_id=info["client_id"],
        client_secret=None,
        tenant_id=info["tenant"],
        identity=Identity(primary_smtp_address=info["mailbox"]),
        access_token=OAuth2Token(
            {
                "access_token": token["access_token"],
                "token_type": "Bearer",
                "expires_at": time.time() + 3000,
            }
        ),
    )
    config = Configuration(
        credentials=credentials,
        service_endpoint=info["ews_url"],
        auth_type=OAUTH2,
        version=Version(build=EXCHANGE_O365),
        retry_policy=FailFast(),
    )
    account = Account(info["mailbox"], config=config, autodiscover=False, access_type=IMPERSONATION)
    domain = info["mailbox"].rpartition("@")[2]

    def send(first: int, count: int) -> list[str]:
        ids = []
        for i in range(first, first + count):
            message_id = make_message_id(domain)
            Message(
                account=account,
                folder=account.sent,
                subject=subject(i),
                body=body(i),
                to_recipients=[Mailbox(email_address=RECIPIENT)],
                message_id=message_id,
            ).send_and_save()
            ids.append(message_id)
        return ids

    send(0, params["warmup"])
    before = read_stats(info["control_port"])
    seconds = timed(lambda: send(params["warmup"], params["n"]))
    after = read_stats(info["control_port"])
    return _counts(params, start, before, after, seconds)


def child_project(params: dict[str, Any]) -> dict[str, Any]:
    """This project: enqueue in one transaction, then one worker dispatches via EWS."""
    from bench.ews_process import read_stats
    from bench.world import EXCHANGE_CONFIG, add_exchange_sender, enqueue, new_secret_key, open_crm
    from bench.world import states as count_states
    from crm_core.mail.worker import Worker

    info = params["ews"]
    start = read_stats(info["control_port"])
    crm = open_crm(Path(params["dir"]), params["database_url"], new_secret_key(), EXCHANGE_CONFIG)
    sender = add_exchange_sender(crm, info)
    worker = Worker(crm, name="bench-worker")
    enqueue(crm, params["warmup"], sender=sender)
    warm = worker.run_once()
    assert warm.sent == params["warmup"], warm
    enqueue_seconds = timed(lambda: enqueue(crm, params["n"], params["warmup"], sender))
    before = read_stats(info["control_port"])
    stats = []
    seconds = timed(lambda: stats.append(worker.run_once()))
    after = read_stats(info["control_port"])
    result = _counts(params, start, before, after, seconds)
    result.update(
        enqueue_seconds=enqueue_seconds, stats=stats[0].as_dict(), states=count_states(crm)
    )
    crm.close()
    return result


PACED_LIMIT = 20
PACED_MAILS = 30


def child_paced(params: dict[str, Any]) -> dict[str, Any]:
    """A paced run: ``mail.rate_per_minute`` set, the worker runs until all is sent."""
    import threading
    import time

    from sqlalchemy import select

    from bench.world import EXCHANGE_CONFIG, add_exchange_sender, enqueue, new_secret_key, open_crm
    from bench.world import states as count_states
    from crm_core.mail.worker import Worker
    from crm_core.models import OutboxAttempt, OutboxMessage

    info = params["ews"]
    crm = open_crm(Path(params["dir"]), params["database_url"], new_secret_key(), EXCHANGE_CONFIG)
    sender = add_exchange_sender(crm, info)
    with crm.transaction() as session:
        crm.set_system_setting(session, "mail.rate_per_minute", str(params["limit"]))
    enqueue(crm, params["n"], sender=sender)
    stop = threading.Event()
    worker = Worker(crm, name="bench-paced")
    runner = threading.Thread(target=worker.run, args=(stop,))
    started = time.monotonic()
    runner.start()
    while count_states(crm).get("sent", 0) < params["n"] and time.monotonic() - started < 300:
        stop.wait(0.2)
    stop.set()
    runner.join()
    with crm.transaction() as session:
        times = sorted(session.scalars(select(OutboxAttempt.started_at)))
        attempts = max(session.scalars(select(OutboxMessage.attempts)))
    peak = max(
        sum(1 for t in times if first <= t < first + timedelta(minutes=1)) for first in times
    )
    span = (times[-1] - times[0]).total_seconds()
    result = {
        "peak_per_minute": peak,
        "span_seconds": span,
        "most_attempts": attempts,
        "states": count_states(crm),
    }
    crm.close()
    return result


def _counts(
    params: dict[str, Any],
    start: dict[str, Any],
    before: dict[str, Any],
    after: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Requests in the timed part, tokens over the whole process (warm-up included)."""
    ews = _delta(before, after, "ews_requests")
    entra = _delta(before, after, "token_requests") + _delta(before, after, "entra_other_requests")
    return {
        "seconds": seconds,
        "ews_requests": ews,
        "http_requests": ews + entra,
        "create_items": after["ops"].get("CreateItem", 0) - before["ops"].get("CreateItem", 0),
        "token_requests_whole_run": _delta(start, after, "token_requests"),
        "mails_whole_run": params["warmup"] + params["n"],
        "delivered": _delta(before, after, "delivered"),
        "distinct_delivered": _delta(before, after, "distinct_delivered"),
    }


def run_case3(opts: Options, pg: Postgres | None) -> list[Row]:
    """exchangelib's plain loop against this project's dispatch, with request counts."""
    n = opts.n(1000, 100)
    variants = (("loop", "child_exchangelib_loop"), ("project", "child_project"))
    results: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in variants}
    for trial in range(opts.trials):
        for key, target in variants:
            log(f"case 3 trial {trial + 1}/{opts.trials}: {key} ({n} mails)")
            with EwsProcess(opts.work_dir) as ews:
                folder = tempfile.mkdtemp(prefix="exchange-", dir=opts.work_dir)
                params = {
                    "ews": ews.info,
                    "n": n,
                    "warmup": warmup_count(n),
                    "dir": folder,
                    "database_url": f"sqlite:///{Path(folder) / 'crm.db'}",
                }
                env = {"REQUESTS_CA_BUNDLE": ews.info["ca_pem"]} if key == "loop" else {}
                result = run_child(f"bench.case_exchange:{target}", params, env=env)
            if result["delivered"] != n or result["distinct_delivered"] != n:
                raise RuntimeError(f"case 3 {key}: delivered {result}, expected {n} once each")
            results[key].append(result)
    limit = Spread.of([n / r["seconds"] for r in results["loop"]])
    rows = []
    for key, name in (
        ("loop", "exchangelib send_and_save, plain loop (limit)"),
        ("project", "crm-mail dispatch via EWS (claim, send, record), SQLite"),
    ):
        found = results[key]
        rates = [n / r["seconds"] for r in found]
        mid = sorted(found, key=lambda r: r["seconds"])[len(found) // 2]
        tokens = max(r["token_requests_whole_run"] for r in found)
        rows.append(
            Row(
                3,
                name,
                Spread.of(rates),
                limit=key == "loop",
                ratio=ratios(rates, limit),
                peak_rss_mb=max(r["peak_rss_mb"] for r in found),
                requests_per_message=mid["ews_requests"] / n,
                notes=(
                    f"per 1,000 mails: {1000 * mid['http_requests'] / n:,.0f} HTTP requests "
                    f"({1000 * mid['ews_requests'] / n:,.0f} EWS, "
                    f"{mid['create_items']} CreateItem for {n}); token requests: {tokens} "
                    f"in the whole process ({mid['mails_whole_run']} mails incl. warm-up); "
                    f"{n} mails, each delivered once"
                ),
                details={"trials": found},
            )
        )
    if os.environ.get("REQUESTS_CA_BUNDLE") is None:
        rows[0].details["tls"] = "REQUESTS_CA_BUNDLE set to the test CA for the loop only"
    rows.append(_paced_row(opts))
    return rows


def _paced_row(opts: Options) -> Row:
    """One paced run: the most mails in any rolling minute, next to the limit."""
    log(f"case 3 paced: {PACED_MAILS} mails at mail.rate_per_minute = {PACED_LIMIT}")
    with EwsProcess(opts.work_dir) as ews:
        folder = tempfile.mkdtemp(prefix="exchange-paced-", dir=opts.work_dir)
        params = {
            "ews": ews.info,
            "n": PACED_MAILS,
            "limit": PACED_LIMIT,
            "dir": folder,
            "database_url": f"sqlite:///{Path(folder) / 'crm.db'}",
        }
        result = run_child("bench.case_exchange:child_paced", params)
    if result["states"] != {"sent": PACED_MAILS}:
        raise RuntimeError(f"case 3 paced: {result['states']}")
    return Row(
        3,
        f"crm-mail via EWS, paced at {PACED_LIMIT} a minute, SQLite",
        Spread.of([float(result["peak_per_minute"])]),
        unit="msg/min (most in any minute)",
        peak_rss_mb=result.get("peak_rss_mb"),
        notes=(
            f"limit {PACED_LIMIT} a minute (mail.rate_per_minute); {PACED_MAILS} mails handed "
            f"over across {result['span_seconds']:.0f} s; attempts per mail at most "
            f"{result['most_attempts']} (waiting spends none)"
        ),
        details={"trials": [result]},
    )
