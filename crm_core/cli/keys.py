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
    """Re-encrypt every stored secret with a new key.

    With a key file: a new key is generated, written first in the file, every secret
    re-encrypted, then the old key removed. With CRM_SECRET_KEY="new,old": secrets are
    re-encrypted with "new"; remove "old" from the variable afterwards.
    """
    from crm_core.secret_box import KEY_ENV, SecretBox, load_keys, replace_key_file
    from crm_core.settings import rotate_secrets

    crm = ctx.crm(check_users=False)
    key_file = crm.config.key_file
    from_env = bool(crm.environ.get(KEY_ENV, "").strip())
    keys = load_keys(key_file, crm.environ)
    if not from_env:
        assert key_file is not None
        keys = replace_key_file(key_file, keys, add_new=True)
    with crm.transaction() as session:
        count = rotate_secrets(session, SecretBox(keys))
    if not from_env:
        assert key_file is not None
        replace_key_file(key_file, keys[:1], add_new=False)
    where = f"{KEY_ENV} (now remove the old keys from it)" if from_env else str(key_file)
    click.echo(f"Re-encrypted {count} secret(s) with the new key in {where}.")


COMMANDS = (secrets_group,)
