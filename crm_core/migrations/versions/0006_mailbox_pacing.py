"""mailbox pacing: per-mailbox limits shared by every worker

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 09:00:00

Why: Exchange Online limits each mailbox (30 messages a minute, 10,000 recipients a
day, 3 SMTP connections or 4 Graph requests at once), and with many workers only the
database sees them all. A row per mailbox is what a claim locks; slots hold the
connections in flight under a lease; sends feed the rolling windows. The index on
(state, user_id, next_attempt_at) lets a claim find each sender with due mail in
turn, so one big sender does not fill every batch.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import crm_core.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_WHEN = crm_core.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "mailbox_pacing",
        sa.Column("mailbox", sa.String(length=400), nullable=False),
        sa.Column("paused_until", _WHEN, nullable=True),
        sa.Column("pause_reason", sa.Text(), nullable=True),
        sa.Column("pause_code", sa.String(length=120), nullable=True),
        sa.Column("paced_until", _WHEN, nullable=True),
        sa.Column("paced_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("mailbox"),
    )
    op.create_table(
        "mailbox_slots",
        sa.Column("mailbox", sa.String(length=400), nullable=False),
        sa.Column("lease_token", sa.String(length=64), nullable=False),
        sa.Column("user_id", _ID, nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("lease_until", _WHEN, nullable=False),
        sa.PrimaryKeyConstraint("mailbox", "lease_token", "user_id"),
    )
    op.create_table(
        "mailbox_sends",
        sa.Column("id", _ID, nullable=False),
        sa.Column("mailbox", sa.String(length=400), nullable=False),
        sa.Column("at", _WHEN, nullable=False),
        sa.Column("messages", sa.Integer(), nullable=False),
        sa.Column("recipients", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_mailbox_sends_at", "mailbox_sends", ["mailbox", "at"], unique=False)
    op.create_index(
        "ix_outbox_due_by_user", "outbox", ["state", "user_id", "next_attempt_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_due_by_user", table_name="outbox")
    op.drop_index("ix_mailbox_sends_at", table_name="mailbox_sends")
    op.drop_table("mailbox_sends")
    op.drop_table("mailbox_slots")
    op.drop_table("mailbox_pacing")
