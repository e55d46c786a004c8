"""``crm send``: queue a mail from a CRM user, as the envelope button does."""

from __future__ import annotations

import mimetypes
from pathlib import Path
from typing import TYPE_CHECKING

import click

from crm_core.cli.context import (
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    Context,
    fail,
    json_option,
    pass_ctx,
)
from crm_core.cli.output import emit_json, printable
from crm_core.files import read_regular, regular_file_problem

if TYPE_CHECKING:
    from crm_core.app import Crm
    from crm_core.mail.enqueue import MailRequest, Plan, Queued
    from crm_core.mail.message import Attachment


class RegularFile(click.ParamType):  # type: ignore[type-arg]  # generic only from click 8.2
    """A path that names a regular file: a FIFO, a device or a folder is refused at once.

    Why here: ``stat`` does not open, so ``/dev/zero`` or a FIFO is refused (exit 2)
    before anything is read or waited for; :func:`crm_core.files.read_regular` checks
    again on what it opens.
    """

    name = "file"

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> Path:
        path = Path(str(value))
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            self.fail(f"{path}: {exc.strerror or exc}", param, ctx)
        problem = regular_file_problem(path, mode)
        if problem is not None:
            self.fail(problem, param, ctx)
        return path


_FILE = RegularFile()
_ADDRESS = "name@example.se or 'Per Persson <per@example.se>'"


@click.command()
@click.option(
    "--from",
    "sender",
    required=True,
    metavar="EMAIL",
    help="The sending CRM user's own e-mail; the mail leaves from their mailbox.",
)
@click.option(
    "--to",
    "to",
    multiple=True,
    metavar="ADDRESS",
    help=f"A recipient: {_ADDRESS}. Repeat --to for each one.",
)
@click.option(
    "--to-file",
    "to_file",
    type=_FILE,
    default=None,
    help="A mass mailing: one mail per recipient in this UTF-8 file, one address a line "
    "(# starts a comment), or a .csv file with an 'email' column and maybe a 'name' "
    "column. All are queued, or none.",
)
@click.option("--cc", multiple=True, metavar="ADDRESS", help="A copy recipient (repeatable).")
@click.option(
    "--bcc", multiple=True, metavar="ADDRESS", help="A hidden copy recipient (repeatable)."
)
@click.option(
    "--reply-to",
    "reply_to",
    multiple=True,
    metavar="ADDRESS",
    help="Where replies should go, if not to the sender (repeatable).",
)
@click.option("--subject", required=True, help="The subject line (one line).")
@click.option("--body", default=None, help="The text of the mail (or use --body-file).")
@click.option(
    "--body-file", type=_FILE, default=None, help="Read the text from a UTF-8 file instead."
)
@click.option(
    "--html-file",
    type=_FILE,
    default=None,
    help="An HTML version, sent beside the text (UTF-8 file).",
)
@click.option("--attach", "attach", type=_FILE, multiple=True, help="Attach a file (repeatable).")
@click.option(
    "--person",
    default=None,
    metavar="EMAIL",
    help="Record the mail on this person's history; their register name is used.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Queue nothing; say which account, transport and server would send, and why.",
)
@json_option
@pass_ctx
def send(
    ctx: Context,
    sender: str,
    to: tuple[str, ...],
    to_file: Path | None,
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
    """Queue a mail from a CRM user; every problem is listed and nothing is queued on error.

    The worker (`crm outbox work`) sends it; `crm outbox show ID` follows it.
    """
    from crm_core.mail import enqueue

    if (body is None) == (body_file is None):
        fail("give exactly one of --body or --body-file")
    if bool(to) == (to_file is not None):
        fail("give --to (one mail to its recipients) or --to-file (one mail per recipient)")
    if to_file is not None and (cc or bcc or person):
        fail("--to-file sends each recipient their own mail; --cc, --bcc and --person do not apply")
    crm = ctx.crm()
    limit = crm.config.mail.max_message_bytes
    request = enqueue.MailRequest(
        sender_email=sender,
        to=list(to),
        cc=list(cc),
        bcc=list(bcc),
        reply_to=list(reply_to),
        subject=subject,
        text=body if body is not None else _read_text(body_file, limit, "--body-file"),
        html=_read_text(html_file, limit, "--html-file") if html_file else None,
        attachments=[_attachment(p, limit) for p in attach],
        person_email=person,
    )
    if to_file is not None:
        _send_each(crm, request, to_file, dry_run, as_json)
        return
    if dry_run:
        with crm.transaction(write=False) as session:
            found = enqueue.plan(crm, session, request)
        _print_plan(found, as_json)
        if not found.ok:
            raise SystemExit(EXIT_REFUSED)
        return
    queued = _queue(crm, request)
    if as_json:
        emit_json({"ok": True, **queued.__dict__})
        return
    click.echo(f"Queued as outbox #{queued.outbox_id}, Message-ID {queued.message_id}")
    if queued.paused:
        click.echo(
            f"Warning: the sender's account is paused, so it waits: {printable(queued.paused)}"
        )


def _queue(crm: Crm, request: MailRequest) -> Queued:
    """Queue the mail; after Ctrl-C, go by whether the database holds it.

    Why: a wrapper that retries a failed ``crm send`` must not queue the mail twice.
    An interrupt before ``enqueue`` returned cannot have committed (the commit comes
    after it), so nothing was queued: exit 130. One during or after the commit (a
    ``mail-queued`` receiver runs after it) may have committed, so the database is
    asked for the Message-ID: there, the mail stays queued and the command goes on
    to print its outbox id and exit 0.
    """
    from crm_core.mail import enqueue

    queued: Queued | None = None
    try:
        with crm.transaction() as session:
            queued = enqueue.enqueue(crm, session, request)
    except KeyboardInterrupt:
        if queued is None or not _in_outbox(crm, queued.message_id):
            fail("interrupted before the mail was queued; nothing was queued", EXIT_INTERRUPTED)
        click.echo(
            f"Interrupted after the mail was queued: it stays queued once, as outbox "
            f"#{queued.outbox_id}; do not send it again.",
            err=True,
        )
    return queued


def _send_each(crm: Crm, request: MailRequest, path: Path, dry_run: bool, as_json: bool) -> None:
    """Queue one copy of ``request`` per recipient in ``path``, in one transaction."""
    from dataclasses import replace

    from crm_core.cli.recipients_file import read_recipients
    from crm_core.mail import enqueue

    found = read_recipients(path)
    requests = [replace(request, to=[address]) for _, address in found]
    labels = [f"{path.name} line {line}" for line, _ in found]
    if dry_run:
        with crm.transaction() as session:
            plan = enqueue.plan(crm, session, requests[0])
            problems = enqueue.check_many(crm, session, requests, labels)
        _print_plan(replace(plan, problems=tuple(problems), recipients=len(requests)), as_json)
        if problems:
            raise SystemExit(EXIT_REFUSED)
        return
    queued = _queue_many(crm, requests, labels)
    if as_json:
        emit_json({"ok": True, "count": len(queued), "queued": [q.__dict__ for q in queued]})
        return
    click.echo(
        f"Queued {len(queued)} mail(s), one per recipient, as outbox "
        f"#{queued[0].outbox_id} to #{queued[-1].outbox_id}"
    )
    if queued[0].paused:
        click.echo(
            f"Warning: the sender's account is paused, so they wait: {printable(queued[0].paused)}"
        )


def _queue_many(crm: Crm, requests: list[MailRequest], labels: list[str]) -> list[Queued]:
    """Queue every mail or none; after Ctrl-C, go by whether the database holds them."""
    from crm_core.mail import enqueue

    queued: list[Queued] = []
    try:
        with crm.transaction() as session:
            queued = enqueue.enqueue_many(crm, session, requests, labels)
    except KeyboardInterrupt:
        if not queued or not _in_outbox(crm, queued[0].message_id):
            fail("interrupted before the mails were queued; nothing was queued", EXIT_INTERRUPTED)
        click.echo(
            f"Interrupted after the mails were queued: they stay queued once, as outbox "
            f"#{queued[0].outbox_id} to #{queued[-1].outbox_id}; do not send them again.",
            err=True,
        )
    return queued


def _in_outbox(crm: Crm, message_id: str) -> bool:
    from crm_core.mail import enqueue

    with crm.transaction(write=False) as session:
        return enqueue.is_queued(session, message_id)


def _read_text(path: Path | None, limit: int, what: str) -> str:
    assert path is not None
    try:
        return read_regular(path, limit, what).decode("utf-8")
    except UnicodeDecodeError:
        fail(f"{path} is not UTF-8 text")


def _attachment(path: Path, limit: int) -> Attachment:
    from crm_core.mail.message import Attachment

    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return Attachment(path.name, content_type, read_regular(path, limit, "--attach"))


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
            click.echo(f"  note:         {printable(note)}")
        click.echo(f"  recipients:   {found.recipients}, about {found.size_bytes} bytes")
    if found.paused:
        click.echo(f"  paused:       the account is paused, so it would wait: {found.paused}")
    if found.ok:
        click.echo("It would be queued.")
        return
    click.echo("It would NOT be queued — Error validating e-mail:")
    for problem in found.problems:
        click.echo(f"  - {printable(str(problem))}")


COMMANDS = (send,)
