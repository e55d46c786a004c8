"""the message's bytes, rendered once at enqueue

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 10:40:00

Why: every attempt sends the bytes rendered when the mail was queued (the same
Message-ID, Date and parts by construction), and the worker no longer renders MIME,
which was the largest cost of sending (docs/performance.md). Rows queued before
this revision have none; the transport renders those as before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("mime", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("mime")
