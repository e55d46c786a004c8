"""the due-by-user index ends with the id: a claim reads only the rows it takes

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 03:00:00

Why: a claim takes each sender's oldest due rows, ``ORDER BY next_attempt_at, id``.
Mail queued together (``enqueue_many``, one transaction) shares one
``next_attempt_at``, so without the id in the index PostgreSQL sorted every queued row
of the sender to find the first 50: with 100,000 queued, 120 ms and 50 MB of sort on
disk per claim, and the rate of a long mass mailing fell with the size of its queue
(docs/performance.md, case 5). With the id, the index gives the order itself.

The index is built again inside the migration's transaction, which holds writes to
the outbox until it is built: seconds for a million rows, best with the workers
stopped (the new code's commands refuse to start until ``crm init`` has run: every
command checks the schema first).
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

OLD = ["state", "user_id", "next_attempt_at"]
NEW = [*OLD, "id"]


def upgrade() -> None:
    op.drop_index("ix_outbox_due_by_user", table_name="outbox")
    op.create_index("ix_outbox_due_by_user", "outbox", NEW, unique=False)


def downgrade() -> None:
    op.drop_index("ix_outbox_due_by_user", table_name="outbox")
    op.create_index("ix_outbox_due_by_user", "outbox", OLD, unique=False)
