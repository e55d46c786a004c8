"""``crm outbox``: follow, retry, cancel and settle queued mail; run the worker."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

import click

from crm_core.cli.context import Context, fail, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable, shortened, table, when
from crm_core.cli.progress import Progress, ProgressHandler

if TYPE_CHECKING:
    from crm_core.app import Crm
    from crm_core.mail.operations import MessageDetail, MessageView
    from crm_core.mail.worker import WorkerStats

STATES = ("queued", "sending", "sent", "partial", "retry", "failed", "unknown", "cancelled")
"""The outbox states (crm_core.models.OutboxState), named here so --help needs no ORM."""


@click.group("outbox")
def outbox_group() -> None:
    """The durable outbox: list, inspect, retry, cancel, resolve; run the worker."""


@outbox_group.command("list")
@click.option(
    "--status", type=click.Choice(STATES), default=None, help="Only messages in this state."
)
@click.option(
    "--limit", type=click.IntRange(1), default=200, show_default=True, help="Messages shown."
)
@json_option
@pass_ctx
def outbox_list(ctx: Context, status: str | None, limit: int, as_json: bool) -> None:
    """List outbox messages, newest first; paused accounts are named first."""
    from crm_core.mail import operations, pauses

    crm = ctx.crm()
    with crm.transaction(write=False) as session:
        views = operations.list_messages(session, status, limit, crm)
        total = operations.count_messages(session, status)
        paused = pauses.pauses(session)
    if as_json:
        emit_json(
            {
                "ok": True,
                "messages": [v.as_dict() for v in views],
                "total": total,
                "paused_accounts": [
                    {"email": e, "transport": p.transport, "reason": p.reason, "since": p.paused_at}
                    for p, e in paused
                ],
            }
        )
        return
    for pause, email in paused:
        click.echo(f"Paused account {email} ({pause.transport}) since {when(pause.paused_at)}:")
        click.echo(f"  {printable(pause.reason)}")
        click.echo(f"  (fix the settings, or `crm outbox resume {email}`)")
    if not views:
        click.echo("No messages." if status is None else f"No messages in state {status}.")
        return
    for line in table(
        ("ID", "STATE", "QUEUED", "FROM", "TO", "SUBJECT", "TRIES", "NOTE"),
        [_row(v) for v in views],
    ):
        click.echo(line)
    cut = shortened(total, len(views), "use --limit to see more")
    if cut:
        click.echo(cut)


def _row(view: MessageView) -> tuple[str, ...]:
    to = ", ".join(view.to[:2]) + (f" +{len(view.to) - 2}" if len(view.to) > 2 else "")
    subject = view.subject if len(view.subject) <= 40 else view.subject[:39] + "…"
    return (
        f"#{view.id}",
        view.state,
        when(view.created_at),
        view.sender,
        to,
        subject,
        str(view.attempts),
        _note(view),
    )


def _note(view: MessageView) -> str:
    if view.recipients_summary and view.state in ("partial", "retry", "failed"):
        return view.recipients_summary
    if view.paused:
        return f"waiting: the account is paused: {view.paused}"
    if view.paced:
        return f"waiting: {view.paced}"
    if view.state == "retry":
        return f"next try {when(view.next_attempt_at)}: {view.last_error or ''}"
    if view.state in ("failed", "unknown"):
        return view.last_error or ""
    return ""


@outbox_group.command("show")
@click.argument("outbox_id", type=int)
@json_option
@pass_ctx
def outbox_show(ctx: Context, outbox_id: int, as_json: bool) -> None:
    """Show one message: state, reason, recipients and every attempt."""
    from crm_core.mail import operations

    crm = ctx.crm()
    with crm.transaction(write=False) as session:
        detail = operations.show_message(session, outbox_id, crm)
    if as_json:
        emit_json({"ok": True, **detail.as_dict()})
        return
    _print_detail(detail)


def _print_detail(detail: MessageDetail) -> None:
    view = detail.view
    say = click.echo
    say(f"Outbox #{view.id}: {view.state}")
    say(f"  Message-ID: {printable(view.message_id)}")
    say(f"  From:       {view.sender} (via {view.transport})")
    for kind, addresses in detail.recipients.items():
        if addresses:
            say(f"  {kind + ':':<11} {printable(', '.join(addresses))}")
    if view.recipients_summary:
        say(f"  Recipients: {printable(view.recipients_summary)}")
    for address, fate in detail.recipient_states.items():
        reply = f": {fate['reply']}" if fate.get("reply") else ""
        say(f"    {address}: {fate['state']}{printable(reply)}")
    say(f"  Subject:    {printable(view.subject)}")
    for name, content_type, size in detail.attachments:
        say(f"  Attachment: {printable(name)} ({content_type}, {size} bytes)")
    if detail.person:
        say(f"  Person:     {detail.person}")
    say(f"  Queued:     {when(view.created_at)}; attempts counted: {view.attempts}")
    if view.sent_at:
        say(f"  Sent:       {when(view.sent_at)}")
    if detail.server_reply:
        say(f"  Server:     {printable(detail.server_reply)}")
    if view.state == "retry":
        say(f"  Next try:   {when(view.next_attempt_at)}")
    if view.state == "sending":
        say(f"  Held by:    {detail.lease_owner} until {when(detail.lease_until)}")
    if view.paused:
        say(f"  Paused:     the sender's account is paused: {printable(view.paused)}")
    if view.paced:
        say(f"  Waiting:    {printable(view.paced)}")
    if view.last_error:
        code = f" [{view.last_code}]" if view.last_code else ""
        say(f"  Reason:     {printable(view.last_error)}{code}")
    for a in detail.attempts:
        code = f" [{a.code}]" if a.code else ""
        say(
            f"  attempt {a.number}: {when(a.started_at)} {a.transport} by {a.worker}: "
            f"{a.outcome or 'in progress'}{code} {printable(a.error or '')}".rstrip()
        )


@outbox_group.command("retry")
@click.argument("outbox_id", type=int)
@pass_ctx
def outbox_retry(ctx: Context, outbox_id: int) -> None:
    """Queue a failed, cancelled or waiting message again, due now.

    Attempts are counted from 0 again; a mail older than [outbox] give_up_after gets
    one more try.
    """
    from crm_core.mail import operations

    crm = ctx.crm()
    with crm.transaction() as session:
        row = operations.retry(session, outbox_id)
    click.echo(f"Outbox #{row.id} queued again.")


@outbox_group.command("cancel")
@click.argument("outbox_id", type=int)
@pass_ctx
def outbox_cancel(ctx: Context, outbox_id: int) -> None:
    """Cancel a message that is not sent (queued, retry or unknown)."""
    from crm_core.mail import operations

    crm = ctx.crm()
    with crm.transaction() as session:
        row = operations.cancel(session, outbox_id)
    click.echo(f"Outbox #{row.id} cancelled.")


@outbox_group.command("resolve")
@click.argument("outbox_id", type=int, required=False)
@click.option("--sent/--not-sent", "sent", default=None, help="Your decision.")
@click.option(
    "--unknown",
    "every_unknown",
    is_flag=True,
    help="Decide every message in state unknown (with --since: those since then).",
)
@click.option(
    "--since",
    metavar="TIME",
    default=None,
    help="With --unknown: only those that became unknown at or after TIME "
    "(ISO 8601, e.g. 2026-12-05T10:00+01:00 or 2026-12-05; without a zone: UTC).",
)
@click.option("--dry-run", is_flag=True, help="Show what would be decided; change nothing.")
@pass_ctx
def outbox_resolve(
    ctx: Context,
    outbox_id: int | None,
    sent: bool | None,
    every_unknown: bool,
    since: str | None,
    dry_run: bool,
) -> None:
    """Decide ``unknown`` mail: --sent (done) or --not-sent (queued again).

    One message by ID, or with --unknown every one (since --since), after checking
    with the recipients' side: SMTP cannot look in a Sent folder. --dry-run lists them
    with the evidence (the step where the connection was lost, the server's last
    words) and changes nothing.
    """
    from crm_core.mail import operations

    if (outbox_id is None) == (not every_unknown):
        fail("give an outbox ID, or --unknown for every unknown message (see --help)")
    if sent is None and not dry_run:
        example = f"{outbox_id}" if outbox_id is not None else "--unknown"
        fail(f"say --sent or --not-sent, e.g. `crm outbox resolve {example} --sent`")
    crm = ctx.crm()
    if outbox_id is not None:
        if dry_run:
            fail("--dry-run previews --unknown; `crm outbox show ID` shows one message")
        with crm.transaction() as session:
            row = operations.resolve(session, outbox_id, bool(sent))
        click.echo(f"Outbox #{row.id}: {'marked sent' if sent else 'queued again'}.")
        return
    start = _time(since) if since else None
    with crm.transaction() as session:
        if dry_run:
            rows = operations.unknown_since(session, start)
        else:
            rows = operations.resolve_unknown(session, start, bool(sent))
        shown = [(r.id, r.message_id, r.sender_email, r.updated_at, r.last_error) for r in rows]
    verb = "would be" if dry_run else "were"
    decision = "marked sent" if sent else "queued again" if sent is False else "decided"
    for row_id, message_id, sender, at, evidence in shown:
        click.echo(f"#{row_id} {printable(message_id)} from {sender}, unknown since {when(at)}")
        click.echo(f"    {printable(evidence or '')}")
    click.echo(f"{len(shown)} unknown message(s) {verb} {decision}.")


def _time(text: str) -> datetime:
    """An ISO 8601 time or date; without a zone it is UTC."""
    try:
        found = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--since {text!r} is not a time; write it as 2026-12-05T10:00+01:00 or 2026-12-05")
    return found if found.tzinfo else found.replace(tzinfo=UTC)


@outbox_group.command("reconcile")
@click.argument("outbox_id", type=int, required=False)
@json_option
@pass_ctx
def outbox_reconcile(ctx: Context, outbox_id: int | None, as_json: bool) -> None:
    """Ask the transport whether ``unknown`` messages were sent (e.g. Sent Items)."""
    from crm_core.mail import reconciler

    crm = ctx.crm()
    reports = reconciler.reconcile(crm, outbox_id)
    if as_json:
        emit_json({"ok": True, "messages": [r.__dict__ for r in reports]})
        return
    if not reports:
        click.echo("No messages in state unknown.")
    for r in reports:
        if r.sent is None:
            verdict = (
                f"cannot tell; decide with `crm outbox resolve {r.outbox_id} --sent` or --not-sent"
            )
        elif not r.applied:
            verdict = "changed meanwhile; left as it is"
        else:
            verdict = "found: marked sent" if r.sent else "not sent: queued again"
        click.echo(f"#{r.outbox_id} {printable(r.message_id)}: {verdict} ({printable(r.detail)})")


@outbox_group.command("resume")
@click.argument("email")
@pass_ctx
def outbox_resume(ctx: Context, email: str) -> None:
    """Lift the pause on a user's account (after fixing its settings)."""
    from crm_core.mail import pauses

    crm = ctx.crm()
    with crm.transaction() as session:
        lifted = pauses.resume(session, email)
    if lifted is None:
        click.echo(f"{email} is not paused.")
    else:
        click.echo(
            f"{email} resumed; its queued mail will be sent. It was paused: "
            f"{printable(lifted.reason)}"
        )


@outbox_group.command("pauses")
@json_option
@pass_ctx
def outbox_pauses(ctx: Context, as_json: bool) -> None:
    """List paused sender accounts, and mailboxes that wait (the server's throttling or
    the daily quota, or our own pacing), each with why and until when."""
    from crm_core.mail import pacing, pauses
    from crm_core.mail.policy import db_now

    crm = ctx.crm()
    with crm.transaction(write=False) as session:
        found = pauses.pauses(session)
        mailboxes = pacing.waiting_mailboxes(session, db_now(session))
    if as_json:
        accounts = [
            {
                "email": e,
                "transport": p.transport,
                "reason": p.reason,
                "code": p.code,
                "since": p.paused_at,
            }
            for p, e in found
        ]
        waiting = [{"mailbox": m, "why": words} for m, words in mailboxes]
        emit_json(
            {
                "ok": True,
                "paused_accounts": accounts,
                "total": len(accounts),
                "waiting_mailboxes": waiting,
            }
        )
        return
    if not found:
        click.echo("No account is paused.")
    for pause, email in found:
        click.echo(
            f"{email} ({pause.transport}) paused {when(pause.paused_at)}: {printable(pause.reason)}"
        )
    for mailbox, words in mailboxes:
        click.echo(f"Mailbox {mailbox} waits: {printable(words)}")


@outbox_group.command("work")
@click.option("--once", is_flag=True, help="Send what is due now, then exit.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Accounts sent for in parallel (threads).",
)
@click.option("--name", default=None, help="Worker name (default host:pid:random).")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON at exit.")
@pass_ctx
def outbox_work(
    ctx: Context, once: bool, concurrency: int, name: str | None, as_json: bool
) -> None:
    """Run a worker: claim due mail, send it, record results. SIGTERM stops it cleanly.

    Each batch is a line on stderr (account, count, outcomes, time); in a terminal a
    live line shows sent, failed and remaining mail and the rate. `crm -v outbox work`
    adds a line per attempt.
    """
    from crm_core.mail.worker import Worker

    ctx.json = as_json
    crm = ctx.crm()
    progress = Progress(sys.stderr, lambda: _remaining(crm))
    worker = Worker(crm, name=name, concurrency=concurrency, on_batch=progress.batch)
    with _stop_on_signals() as stop, _batch_lines(progress, ctx.verbose):
        # Said only once SIGTERM is handled, so a supervisor (or a test) that waits
        # for this line knows a stop request from now on is a clean stop.
        # With --json it goes to stderr, so stdout stays one JSON document.
        click.echo(f"Worker {worker.name} started (concurrency {concurrency}).", err=as_json)
        (sys.stderr if as_json else sys.stdout).flush()
        stats = worker.run_once(stop) if once else worker.run(stop)
    _print_stats(worker.name, stats, as_json)


def _remaining(crm: Crm) -> int:
    from crm_core.mail import operations

    with crm.transaction(write=False) as session:
        return operations.count_waiting(session)


@contextmanager
def _batch_lines(progress: Progress, verbose: int) -> Iterator[None]:
    """Batch lines through the progress display; with -v the root log shows them."""
    worker_log = logging.getLogger("crm_core.mail.worker")
    handler = ProgressHandler(progress)
    if not verbose:
        worker_log.addHandler(handler)
        level = worker_log.level
        worker_log.setLevel(logging.INFO)
    else:
        progress.live = False  # -v prints many lines; a live line would tangle them
    try:
        yield
    finally:
        progress.close()
        if not verbose:
            worker_log.removeHandler(handler)
            worker_log.setLevel(level)


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM/SIGINT set the event (finish or release what is held, then exit)."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_stats(name: str, stats: WorkerStats, as_json: bool) -> None:
    if as_json:
        emit_json({"ok": True, "worker": name, **stats.as_dict()})
        return
    parts = [f"{k} {v}" for k, v in stats.as_dict().items() if v and k != "polls"]
    click.echo(f"Worker {name} stopped: {', '.join(parts) or 'nothing to do'}.")


COMMANDS = (outbox_group,)
