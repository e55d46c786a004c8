"""recipient states and the server's reply

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 08:30:00

Why: each recipient of a message has its own fate (delivered, deferred, refused,
with the server's words), and the server's answer to a sent message ("250 2.0.0 Ok:
queued as …") is what a mail administrator asks for.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipient_states", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("server_reply", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("server_reply")
        batch_op.drop_column("recipient_states")
