"""``crm persons``: the register of persons mail is written to."""

from __future__ import annotations

import click

from crm_core.cli.context import Context, json_option, pass_ctx
from crm_core.cli.output import emit_json, printable, shortened, table, when


@click.group()
def persons() -> None:
    """Persons in the CRM register (contacts, stakeholders)."""


@persons.command("add")
@click.argument("email")
@click.option("--name", required=True, help="Full name.")
@click.option("--mobile", default=None, help="Mobile number.")
@pass_ctx
def persons_add(ctx: Context, email: str, name: str, mobile: str | None) -> None:
    """Add a person to the register."""
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    with crm.transaction() as session:
        person = directory.add_person(session, email, name, mobile)
    click.echo(f"Person {printable(person.name)} <{person.email}> added (id {person.id}).")


@persons.command("list")
@json_option
@pass_ctx
def persons_list(ctx: Context, as_json: bool) -> None:
    """List persons by name."""
    from crm_core import directory

    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        rows = list(directory.list_persons(session))
    if as_json:
        found = [{"id": p.id, "email": p.email, "name": p.name, "mobile": p.mobile} for p in rows]
        emit_json({"ok": True, "persons": found, "total": len(found)})
        return
    if not rows:
        click.echo("No persons yet: `crm persons add EMAIL --name NAME`.")
        return
    for line in table(
        ("E-MAIL", "NAME", "MOBILE"), [(p.email, p.name, p.mobile or "") for p in rows]
    ):
        click.echo(line)


@persons.command("show")
@click.argument("email")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Entries.")
@json_option
@pass_ctx
def persons_show(ctx: Context, email: str, limit: int, as_json: bool) -> None:
    """Show a person and their history, newest first (each mail with its outbox state)."""
    from crm_core import directory
    from crm_core.mail.operations import person_history

    crm = ctx.crm(check_users=False)
    with crm.transaction(write=False) as session:
        person = directory.find_person(session, email)
        history, total = person_history(session, person, limit)
    if as_json:
        emit_json(
            {
                "ok": True,
                "email": person.email,
                "name": person.name,
                "mobile": person.mobile,
                "history": [e.as_dict() for e in history],
                "total": total,
            }
        )
        return
    click.echo(
        f"{printable(person.name)} <{person.email}> {printable(person.mobile or '')}".rstrip()
    )
    for entry in history:
        state = f" — {entry.state}" if entry.state else ""
        if entry.recipients:
            state += f" ({entry.recipients})"
        click.echo(f"  {when(entry.at)} {entry.kind}: {printable(entry.summary)}{state}")
    cut = shortened(total, len(history), "use --limit to see more")
    if cut:
        click.echo(cut)


COMMANDS = (persons,)
