"""``crm secrets``: the key that encrypts stored secrets.

Named ``keys`` (not ``secrets``) so that no module of ours shares a name with the
standard library's.
"""

from __future__ import annotations

import click

from crm_core.cli.context import Context, pass_ctx


@click.group("secrets")
def secrets_group() -> None:
    """The key that encrypts stored secrets."""


@secrets_group.command("rotate")
@pass_ctx
def secrets_rotate(ctx: Context) -> None:
    """Re-encrypt every stored secret with a new key; workers may keep running.

    With a key file: a new key is put first in the file, every secret re-encrypted,
    then the keys no secret needs any more are removed from the file. With
    CRM_SECRET_KEY="NEW,OLD" (a new key put in front of the current one first, see
    `crm secrets new-key`): secrets are re-encrypted with NEW; remove OLD afterwards.
    """
    from crm_core.rotation import rotate

    crm = ctx.crm(check_users=False)
    done = rotate(crm.transaction, crm.config.key_file, crm.environ)
    click.echo(f"Re-encrypted {done.count} secret(s) with the new key in {done.where}.")
    if done.from_env:
        click.echo(
            "Now remove the old key(s) after the first from CRM_SECRET_KEY, on every machine."
        )
    else:
        click.echo(
            "Back up the key file now; keep the old one with the database backups made "
            "before this rotation, which only it can read."
        )


@secrets_group.command("new-key")
def secrets_new_key() -> None:
    """Print a new key, to put in front of CRM_SECRET_KEY's before `crm secrets rotate`."""
    from crm_core.secret_box import new_key

    click.echo(new_key())


COMMANDS = (secrets_group,)
