"""secret bindings and the secret key's version

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 09:00:00

Why: a stored secret is bound to the destination it was saved for (the settings that
decide where it is sent), so that changing a server name never sends it elsewhere;
``bound_to`` keeps those settings' values as they were at the save. Rows saved before
this revision have none: ``crm init`` binds them to the destination in effect when it
upgrades (see :func:`crm_core.settings.SettingsStore.bind_unbound`).

``secret_key_version`` is one row whose number goes up with every ``crm secrets
rotate``: a running worker compares it with the version its keys were loaded at and
reloads them, instead of failing to read what the rotation re-encrypted. ``key_id``
names (without revealing it) the key the last rotation encrypted with, so that a
process holding another key does not save a secret the others cannot read.

Named for what it does: another branch may add a revision 0004 in parallel, and the
number may change when they are merged.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("system_settings", "user_settings"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("bound_to", sa.JSON(none_as_null=True), nullable=True))
    version = op.create_table(
        "secret_key_version",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(length=16), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(version, [{"id": 1, "version": 1, "key_id": None}])


def downgrade() -> None:
    op.drop_table("secret_key_version")
    for table in ("system_settings", "user_settings"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("bound_to")
