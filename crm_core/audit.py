"""The audit log: who changed which setting (never its value), who sent what, and who
retried, cancelled or resolved which mail.

Every function takes a Session and never commits: an entry is written in the same
transaction as the change it records, so there is no entry for a change that was
rolled back and no change without its entry.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crm_core.mail.policy import db_now
from crm_core.models import AuditEntry


def record(session: Session, actor: str, action: str, target: str, detail: str = "") -> None:
    """Add one entry, stamped by the database's clock."""
    session.add(
        AuditEntry(at=db_now(session), actor=actor, action=action, target=target, detail=detail)
    )


def recent(session: Session, limit: int = 200, offset: int = 0) -> Sequence[AuditEntry]:
    """The newest entries first."""
    return session.scalars(
        select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
    ).all()


def count(session: Session) -> int:
    """How many entries there are."""
    return int(session.scalar(select(func.count()).select_from(AuditEntry)) or 0)
