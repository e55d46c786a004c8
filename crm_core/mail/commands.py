"""``crm send`` and ``crm outbox``: the outbox's commands.

Exit status follows :mod:`crm_core.cli`: 2 when input is refused (nothing queued or
changed), 1 when an operation ran and failed. Like the core's commands they run the
start-up check (every user's transport enabled for their product line), so a worker
never starts on a configuration that would send some user's mail the wrong way.
"""

from __future__ import annotations

import mimetypes
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType

import click

from crm_core.cli import EXIT_REFUSED, Context, emit_json, fail, handled, pass_ctx
from crm_core.mail import enqueue, operations, pauses, reconciler
from crm_core.mail.enqueue import MailRequest, Plan
from crm_core.mail.message import Attachment
from crm_core.mail.operations import MessageDetail, MessageView
from crm_core.mail.worker import Worker, WorkerStats
from crm_core.models import OutboxState

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def register(main: click.Group) -> None:
    """Add the mail commands to the ``crm`` group."""
    main.add_command(send)
    main.add_command(outbox_group)


# --- crm send -----------------------------------------------------------------------


@click.command()
@click.option("--from", "sender", required=True, help="The sending user's own e-mail.")
@click.option("--to", "to", multiple=True, required=True, help="A recipient (repeatable).")
@click.option("--cc", multiple=True, help="A Cc recipient (repeatable).")
@click.option("--bcc", multiple=True, help="A Bcc recipient (repeatable).")
@click.option("--reply-to", "reply_to", multiple=True, help="A Reply-To address.")
@click.option("--subject", required=True)
@click.option("--body", default=None, help="The text of the mail.")
@click.option("--body-file", type=_FILE, default=None, help="Read the text from a file.")
@click.option("--html-file", type=_FILE, default=None, help="An HTML alternative.")
@click.option("--attach", "attach", type=_FILE, multiple=True, help="Attach a file.")
@click.option("--person", default=None, help="Record the mail on this person's history.")
@click.option("--dry-run", is_flag=True, help="Queue nothing; say how it would be sent.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def send(
    ctx: Context,
    sender: str,
    to: tuple[str, ...],
    cc: tuple[str, ...],
    bcc: tuple[str, ...],
    reply_to: tuple[str, ...],
    subject: str,
    body: str | None,
    body_file: Path | None,
    html_file: Path | None,
    attach: tuple[Path, ...],
    person: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Queue a mail from a CRM user (validated first; nothing is queued on error)."""
    if (body is None) == (body_file is None):
        fail("give exactly one of --body or --body-file")
    request = MailRequest(
        sender_email=sender,
        to=list(to),
        cc=list(cc),
        bcc=list(bcc),
        reply_to=list(reply_to),
        subject=subject,
        text=body if body is not None else _read_text(body_file),
        html=_read_text(html_file) if html_file else None,
        attachments=[_attachment(p) for p in attach],
        person_email=person,
    )
    with handled():
        crm = ctx.crm()
        if dry_run:
            with crm.transaction() as session:
                found = enqueue.plan(crm, session, request)
            _print_plan(found, as_json)
            if not found.ok:
                raise SystemExit(EXIT_REFUSED)
            return
        with crm.transaction() as session:
            queued = enqueue.enqueue(crm, session, request)
    if as_json:
        emit_json(queued.__dict__)
        return
    click.echo(f"Queued as outbox #{queued.outbox_id}, Message-ID {queued.message_id}")
    if queued.paused:
        click.echo(f"Warning: the sender's account is paused, so it waits: {queued.paused}")


def _read_text(path: Path | None) -> str:
    assert path is not None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def _attachment(path: Path) -> Attachment:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    try:
        return Attachment(path.name, content_type, path.read_bytes())
    except OSError as exc:
        fail(f"cannot read attachment {path}: {exc.strerror or exc}")


def _print_plan(found: Plan, as_json: bool) -> None:
    if as_json:
        emit_json(found.as_dict())
        return
    click.echo("Dry run: nothing was queued.")
    if found.product_line:
        click.echo(f"  product line: {found.product_line} ({found.product_line_label})")
        click.echo(f"  transport:    {found.transport} (because {found.transport_reason})")
        click.echo(f"  account:      {found.account}")
        click.echo(f"  server:       {found.server}")
        for note in found.notes:
            click.echo(f"  note:         {note}")
        click.echo(f"  recipients:   {found.recipients}, about {found.size_bytes} bytes")
    if found.paused:
        click.echo(f"  paused:       the account is paused, so it would wait: {found.paused}")
    if found.ok:
        click.echo("It would be queued.")
        return
    click.echo("It would NOT be queued — Error validating e-mail:")
    for problem in found.problems:
        click.echo(f"  - {problem}")


# --- crm outbox -------------------------------------------------------------------------


@click.group("outbox")
def outbox_group() -> None:
    """The durable outbox: list, inspect, retry, cancel, resolve; run the worker."""


_STATES = click.Choice([s.value for s in OutboxState])


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value else "-"


@outbox_group.command("list")
@click.option("--status", type=_STATES, default=None, help="Only messages in this state.")
@click.option("--limit", type=click.IntRange(1), default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def outbox_list(ctx: Context, status: str | None, limit: int, as_json: bool) -> None:
    """List outbox messages, newest first; paused accounts are named."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            views = operations.list_messages(session, status, limit)
            paused = pauses.pauses(session)
    if as_json:
        emit_json(
            {
                "messages": [v.as_dict() for v in views],
                "paused_accounts": [
                    {"email": e, "transport": p.transport, "reason": p.reason, "since": p.paused_at}
                    for p, e in paused
                ],
            }
        )
        return
    for pause, email in paused:
        click.echo(f"Paused account {email} ({pause.transport}) since {_when(pause.paused_at)}:")
        click.echo(f"  {pause.reason}")
        click.echo(f"  (fix the settings, or `crm outbox resume {email}`)")
    for view in views:
        _print_line(view)
    if not views:
        click.echo("No messages." if status is None else f"No messages in state {status}.")


def _print_line(view: MessageView) -> None:
    to = ", ".join(view.to[:2]) + (" …" if len(view.to) > 2 else "")
    click.echo(
        f"#{view.id:<6} {view.state:<9} {_when(view.created_at)}  {view.sender} → {to}  "
        f"“{view.subject}” (attempts {view.attempts})"
    )
    if view.paused:
        click.echo(f"         waiting: the account is paused: {view.paused}")
    elif view.state == OutboxState.RETRY.value:
        click.echo(f"         next attempt {_when(view.next_attempt_at)}: {view.last_error}")
    elif view.state in (OutboxState.FAILED.value, OutboxState.UNKNOWN.value):
        click.echo(f"         {view.last_error}")


@outbox_group.command("show")
@click.argument("outbox_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def outbox_show(ctx: Context, outbox_id: int, as_json: bool) -> None:
    """Show one message: state, reason, recipients and every attempt."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            detail = operations.show_message(session, outbox_id)
    if as_json:
        emit_json(detail.as_dict())
        return
    _print_detail(detail)


def _print_detail(detail: MessageDetail) -> None:
    view = detail.view
    click.echo(f"Outbox #{view.id}: {view.state}")
    click.echo(f"  Message-ID: {view.message_id}")
    click.echo(f"  From:       {view.sender} (via {view.transport})")
    for kind, addresses in detail.recipients.items():
        if addresses:
            click.echo(f"  {kind + ':':<11} {', '.join(addresses)}")
    click.echo(f"  Subject:    {view.subject}")
    for name, content_type, size in detail.attachments:
        click.echo(f"  Attachment: {name} ({content_type}, {size} bytes)")
    if detail.person:
        click.echo(f"  Person:     {detail.person}")
    click.echo(f"  Queued:     {_when(view.created_at)}; attempts counted: {view.attempts}")
    if view.sent_at:
        click.echo(f"  Sent:       {_when(view.sent_at)}")
    if view.state == OutboxState.RETRY.value:
        click.echo(f"  Next try:   {_when(view.next_attempt_at)}")
    if view.state == OutboxState.SENDING.value:
        click.echo(f"  Held by:    {detail.lease_owner} until {_when(detail.lease_until)}")
    if view.paused:
        click.echo(f"  Paused:     the sender's account is paused: {view.paused}")
    if view.last_error:
        code = f" [{view.last_code}]" if view.last_code else ""
        click.echo(f"  Reason:     {view.last_error}{code}")
    for a in detail.attempts:
        code = f" [{a.code}]" if a.code else ""
        click.echo(
            f"  attempt {a.number}: {_when(a.started_at)} {a.transport} by {a.worker}: "
            f"{a.outcome or 'in progress'}{code} {a.error or ''}".rstrip()
        )


@outbox_group.command("retry")
@click.argument("outbox_id", type=int)
@pass_ctx
def outbox_retry(ctx: Context, outbox_id: int) -> None:
    """Queue a failed, cancelled or waiting message again, due now, with a fresh budget."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            row = operations.retry(session, outbox_id)
    click.echo(f"Outbox #{row.id} queued again.")


@outbox_group.command("cancel")
@click.argument("outbox_id", type=int)
@pass_ctx
def outbox_cancel(ctx: Context, outbox_id: int) -> None:
    """Cancel a message that is not sent (queued, retry or unknown)."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            row = operations.cancel(session, outbox_id)
    click.echo(f"Outbox #{row.id} cancelled.")


@outbox_group.command("resolve")
@click.argument("outbox_id", type=int)
@click.option("--sent/--not-sent", "sent", default=None, help="Your decision.")
@pass_ctx
def outbox_resolve(ctx: Context, outbox_id: int, sent: bool | None) -> None:
    """Decide an ``unknown`` message: --sent (done) or --not-sent (queued again)."""
    if sent is None:
        fail("say --sent or --not-sent")
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            row = operations.resolve(session, outbox_id, sent)
    click.echo(f"Outbox #{row.id}: {'marked sent' if sent else 'queued again'}.")


@outbox_group.command("reconcile")
@click.argument("outbox_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def outbox_reconcile(ctx: Context, outbox_id: int | None, as_json: bool) -> None:
    """Ask the transport whether ``unknown`` messages were sent (e.g. Sent Items)."""
    with handled():
        crm = ctx.crm()
        reports = reconciler.reconcile(crm, outbox_id)
    if as_json:
        emit_json([r.__dict__ for r in reports])
        return
    if not reports:
        click.echo("No messages in state unknown.")
    for r in reports:
        if r.sent is None:
            verdict = "cannot tell; decide with `crm outbox resolve`"
        elif not r.applied:
            verdict = "changed meanwhile; left as it is"
        else:
            verdict = "found: marked sent" if r.sent else "not sent: queued again"
        click.echo(f"#{r.outbox_id} {r.message_id}: {verdict} ({r.detail})")


@outbox_group.command("resume")
@click.argument("email")
@pass_ctx
def outbox_resume(ctx: Context, email: str) -> None:
    """Lift the pause on a user's account (after fixing its settings)."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            lifted = pauses.resume(session, email)
    if lifted is None:
        click.echo(f"{email} is not paused.")
    else:
        click.echo(f"{email} resumed; its queued mail will be sent. It was paused: {lifted.reason}")


@outbox_group.command("pauses")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def outbox_pauses(ctx: Context, as_json: bool) -> None:
    """List paused sender accounts and why they are paused."""
    with handled():
        crm = ctx.crm()
        with crm.transaction() as session:
            found = pauses.pauses(session)
    if as_json:
        emit_json(
            [
                {
                    "email": e,
                    "transport": p.transport,
                    "reason": p.reason,
                    "code": p.code,
                    "since": p.paused_at,
                }
                for p, e in found
            ]
        )
        return
    if not found:
        click.echo("No account is paused.")
    for pause, email in found:
        click.echo(f"{email} ({pause.transport}) paused {_when(pause.paused_at)}: {pause.reason}")


@outbox_group.command("work")
@click.option("--once", is_flag=True, help="Send what is due now, then exit.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--name", default=None, help="Worker name (default host:pid:random).")
@click.option("--json", "as_json", is_flag=True, help="Print the totals as JSON at exit.")
@pass_ctx
def outbox_work(
    ctx: Context, once: bool, concurrency: int, name: str | None, as_json: bool
) -> None:
    """Run a worker: claim due mail, send it, record results. SIGTERM stops it cleanly."""
    with handled():
        crm = ctx.crm()
        if not crm.database_ready():
            fail("the database is not initialised or not up to date; run `crm init`")
        worker = Worker(crm, name=name, concurrency=concurrency)
        with _stop_on_signals() as stop:
            # Said only once SIGTERM is handled, so a supervisor (or a test) that waits
            # for this line knows a stop request from now on is a clean stop.
            # With --json it goes to stderr, so stdout stays one JSON document.
            click.echo(f"Worker {worker.name} started (concurrency {concurrency}).", err=as_json)
            (sys.stderr if as_json else sys.stdout).flush()
            stats = worker.run_once(stop) if once else worker.run(stop)
    _print_stats(worker.name, stats, as_json)


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
        emit_json({"worker": name, **stats.as_dict()})
        return
    parts = [f"{k} {v}" for k, v in stats.as_dict().items() if v and k != "polls"]
    click.echo(f"Worker {name} stopped: {', '.join(parts) or 'nothing to do'}.")
