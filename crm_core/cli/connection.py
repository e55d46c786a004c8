"""``crm test-connection``: the Test connection button, step by step."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from crm_core.cli.context import EXIT_FAILED, Context, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable

if TYPE_CHECKING:
    from crm_core.mail.transport import ConnectionReport

_MARKS = {
    "ok": "[ok]  ",
    "warning": "[warn]",
    "failed": "[FAIL]",
    "skipped": "[skip]",
}


def print_report(report: ConnectionReport, echo: Callable[[str], None] = click.echo) -> None:
    """Print a Test connection ladder, one line per step, fix under a red step."""
    echo(printable(report.summary))
    for step in report.steps:
        echo(f"  {_MARKS[step.status.value]} {step.name}: {printable(step.detail)}")
        if step.fix and step.status.value in ("failed", "warning"):
            echo(f"         fix: {printable(step.fix)}")


@click.command("test-connection")
@click.argument("email")
@json_option
@pass_ctx
def test_connection_cmd(ctx: Context, email: str, as_json: bool) -> None:
    """Test connection for a user (green or red, step by step); sends no mail.

    Exit 0 when green, 1 when a step is red.
    """
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        user = directory.find_user(session, email)
        account = crm.sender_account(session, user)
    report = crm.test_connection(account)
    if as_json:
        failed = [s for s in report.steps if s.status.value == "failed"]
        emit_json(
            {
                "ok": report.ok,
                "transport": report.transport,
                "summary": report.summary,
                "steps": [
                    {"name": s.name, "status": s.status.value, "detail": s.detail, "fix": s.fix}
                    for s in report.steps
                ],
                "problems": [{"key": s.name, "message": s.detail, "fix": s.fix} for s in failed],
            }
        )
    else:
        print_report(report)
    if not report.ok:
        sys.exit(EXIT_FAILED)


COMMANDS = (test_connection_cmd,)
