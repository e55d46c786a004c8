"""Signing in to the web app: the password check with rate limiting.

Failed sign-ins are counted per account and per client address, in the database so
that every web process counts together. After ``MAX_FAILURES`` within ``WINDOW`` the
key is locked for ``LOCK``: further tries are refused without checking the password,
and the answer does not say whether the password was right. Every function takes a
Session and never commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from crm_core.mail.policy import db_now
from crm_core.models import SignInFailures, User
from crm_core.passwords import equal_time_check, password_matches

MAX_FAILURES = 5
WINDOW = timedelta(minutes=15)
LOCK = timedelta(minutes=15)


@dataclass(frozen=True)
class SignIn:
    """The answer to a sign-in: the user, or why not (never which part was wrong)."""

    user: User | None
    locked_until: datetime | None = None


def sign_in(session: Session, email: str, password: str, address: str) -> SignIn:
    """Check ``email`` and ``password`` from client ``address``, counting failures."""
    now = db_now(session)
    keys = (f"account:{email.strip().lower()}", f"address:{address}")
    locked = [until for key in keys if (until := _locked_until(session, key, now))]
    if locked:
        return SignIn(None, max(locked))
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        equal_time_check(password)
    elif password_matches(session, user, password):
        _forget(session, keys[0])
        return SignIn(user)
    for key in keys:
        _count_failure(session, key, now)
    return SignIn(None)


def _locked_until(session: Session, key: str, now: datetime) -> datetime | None:
    row = session.get(SignInFailures, key)
    if row is None or row.locked_until is None or row.locked_until <= now:
        return None
    return row.locked_until


def _count_failure(session: Session, key: str, now: datetime) -> None:
    row = session.get(SignInFailures, key, with_for_update=True)
    if row is None:
        session.add(SignInFailures(key=key, failures=1, window_start=now))
        session.flush()
        return
    if now - row.window_start > WINDOW:
        row.failures, row.window_start, row.locked_until = 0, now, None
    row.failures += 1
    if row.failures >= MAX_FAILURES:
        row.locked_until = now + LOCK
    session.flush()


def _forget(session: Session, key: str) -> None:
    row = session.get(SignInFailures, key)
    if row is not None:
        session.delete(row)
        session.flush()
