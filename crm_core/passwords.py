"""Web sign-in passwords: Argon2 hashes, and what a password must be.

Why Argon2 (argon2-cffi's defaults, RFC 9106): a stolen database must not give the
passwords back; Argon2id is memory-hard, so guessing is slow on any hardware. A hash
made with older parameters is upgraded at the next successful sign-in.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.orm import Session

from crm_core.errors import Problem, ValidationError
from crm_core.models import User

MIN_LENGTH = 10


def password_problems(password: str) -> list[Problem]:
    """Why ``password`` cannot be used, in words (empty when it can)."""
    problems = []
    if len(password) < MIN_LENGTH:
        problems.append(Problem("password", f"use at least {MIN_LENGTH} characters"))
    if password != password.strip():
        problems.append(Problem("password", "it starts or ends with a blank; remove it"))
    return problems


def set_password(session: Session, user: User, password: str) -> None:
    """Hash and store ``password`` for ``user``, or refuse it (nothing is written)."""
    problems = password_problems(password)
    if problems:
        raise ValidationError("Password refused", problems)
    user.password_hash = PasswordHasher().hash(password)
    session.flush()


def password_matches(session: Session, user: User, password: str) -> bool:
    """True when ``password`` is ``user``'s; an outdated hash is renewed on the way."""
    if not user.password_hash:
        return False
    hasher = PasswordHasher()
    try:
        hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hasher.hash(password)
        session.flush()
    return True


def equal_time_check(password: str) -> None:
    """Spend the time of a real check when there is no user, so that a sign-in's
    timing does not tell which e-mail addresses exist."""
    hasher = PasswordHasher()
    try:
        hasher.verify(hasher.hash("a password nobody has"), password)
    except VerificationError:
        return
