"""Expiry warnings of the Entra app credentials, sent once per threshold as a signal.

Why a job of its own: a client secret lives at most 24 months and a certificate a
year or two; when one expires, every mail stops. ``crm check`` and Test connection
warn whoever looks, but nobody may look, so the outbox worker checks at start and
daily and sends ``credential-expiring`` (an installation can mail its administrator)
at 60, 30 and 7 days before, and once expired, each threshold once. What was sent is
remembered in the database, so that many workers and restarts send each one once.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy.exc import IntegrityError

from crm_core import signals
from crm_core.entra import EXPIRY_WARNING_DAYS, Expiry, expiries
from crm_core.mail.policy import db_now
from crm_core.models import CredentialWarning

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from crm_core.app import Crm

Clock = Callable[["Session"], datetime]
"""The clock the check reads: the database's (tests give their own)."""


def check(crm: Crm, now: Clock = db_now) -> list[Expiry]:
    """Send ``credential-expiring`` for each threshold newly crossed; return those sent.

    One signal per credential per check, for the sharpest threshold crossed; the
    milder ones it passed are marked sent with it (a worker started at 5 days left
    sends "7 days", not three mails).
    """
    sent: list[Expiry] = []
    with crm.transaction() as session:
        stamp = now(session)
        values = crm.settings_store().system_values(session)
        for expiry in expiries(values, stamp.date()):
            if _record(session, expiry, stamp):
                signals.emit_after_commit(
                    session,
                    "credential-expiring",
                    key=expiry.key,
                    credential=expiry.what,
                    expires=expiry.expires,
                    days_left=expiry.days_left,
                    threshold=expiry.threshold,
                )
                sent.append(expiry)
    return sent


def _record(session: Session, expiry: Expiry, stamp: datetime) -> bool:
    """Mark the thresholds crossed as sent; True when the sharpest was not yet."""
    threshold = expiry.threshold
    if threshold is None:
        return False
    if session.get(CredentialWarning, (expiry.key, expiry.expires, threshold)) is not None:
        return False
    crossed = [t for t in (*EXPIRY_WARNING_DAYS, 0) if t >= threshold]
    try:
        with session.begin_nested():  # another worker may record it at the same moment
            for value in crossed:
                if session.get(CredentialWarning, (expiry.key, expiry.expires, value)) is None:
                    session.add(
                        CredentialWarning(
                            key=expiry.key, expires=expiry.expires, threshold=value, sent_at=stamp
                        )
                    )
            session.flush()
    except IntegrityError:
        return False
    return True
