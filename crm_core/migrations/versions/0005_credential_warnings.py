"""credential expiry warnings already sent

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-12 09:00:00

Why: the expiry signal of an app credential (client secret or certificate) fires once
per threshold (60, 30, 7 days, expired), whichever worker sees it first; the table
remembers which were sent.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import crm_core.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credential_warnings",
        sa.Column("key", sa.String(length=120), nullable=False),
        sa.Column("expires", sa.Date(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=False),
        sa.Column("sent_at", crm_core.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", "expires", "threshold"),
    )


def downgrade() -> None:
    op.drop_table("credential_warnings")
