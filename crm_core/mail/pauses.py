"""Account pauses: a sender whose settings cannot work waits instead of burning tries.

Every function here takes a Session and never commits. A pause is made at claim (the
account's settings stop it) or after a configuration result from the transport, and
lifts when the user's or the system's settings change, or by an operator.
"""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import (
    Select,
    delete,
    exists,
    select,
)
from sqlalchemy.orm import Session

from crm_core import signals
from crm_core.db import rowcount, upsert
from crm_core.errors import NotFoundError
from crm_core.mail.transport import SenderAccount
from crm_core.models import (
    AccountPause,
    SystemSetting,
    User,
    UserSetting,
)


def pause_account(
    session: Session, account: SenderAccount, reason: str, code: str, now: datetime
) -> int:
    """Pause an account after a configuration error; 1 if newly paused, else 0.

    ``INSERT … ON CONFLICT DO NOTHING``: two workers may hit the same bad account at
    once, and the first reason is kept.
    """
    stmt = (
        upsert(session, AccountPause)
        .values(
            user_id=account.user_id,
            transport=account.transport,
            reason=reason or "the transport reported a configuration error",
            code=code or None,
            paused_at=now,
        )
        .on_conflict_do_nothing(index_elements=[AccountPause.user_id])
        .returning(AccountPause.user_id)
    )
    created = session.execute(stmt).scalar() is not None
    if created:
        signals.emit_after_commit(
            session,
            "account-paused",
            user_id=account.user_id,
            email=account.email,
            transport=account.transport,
            reason=reason,
        )
    return int(created)


def lift_changed_pauses(session: Session) -> int:
    """Lift pauses whose user's or the system's settings changed since the pause.

    Why here and not in a signal receiver: settings are often saved by another process
    (``crm users set`` while workers run elsewhere); comparing ``updated_at`` with
    ``paused_at`` works across processes and machines. Removing a setting
    (``unset``) leaves no timestamp; ``crm outbox resume`` covers that.
    """
    lifted = list(session.execute(_changed_statement()))
    for user_id, email in lifted:
        _lift(session, user_id, email, "settings changed")
    return len(lifted)


@functools.lru_cache(maxsize=1)
def _changed_statement() -> Select[int, str]:
    """The paused accounts whose settings changed since: built once, as every claim
    asks (building it cost more than running it on an empty table)."""
    changed_system = exists().where(SystemSetting.updated_at > AccountPause.paused_at)
    changed_user = exists().where(
        UserSetting.user_id == AccountPause.user_id,
        UserSetting.updated_at > AccountPause.paused_at,
    )
    return (
        select(AccountPause.user_id, User.email)
        .join(User, User.id == AccountPause.user_id)
        .where(changed_system | changed_user)
    )


def resume(session: Session, email: str) -> AccountPause | None:
    """Lift a user's pause (the operator says it is fixed); the pause lifted, or None."""
    user = _user(session, email)
    pause = session.get(AccountPause, user.id)
    if pause is not None:
        _lift(session, user.id, user.email, "resumed by an operator")
    return pause


def _lift(session: Session, user_id: int, email: str, why: str) -> None:
    result = session.execute(delete(AccountPause).where(AccountPause.user_id == user_id))
    if rowcount(result):
        signals.emit_after_commit(session, "account-resumed", user_id=user_id, email=email, why=why)


def pauses(session: Session) -> list[tuple[AccountPause, str]]:
    """Every paused account with the user's e-mail, oldest first."""
    rows = session.execute(
        select(AccountPause, User.email)
        .join(User, User.id == AccountPause.user_id)
        .order_by(AccountPause.paused_at)
    )
    return [(pause, email) for pause, email in rows]


def _user(session: Session, email: str) -> User:
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    if user is None:
        raise NotFoundError(f"no user with e-mail {email!r}; see `crm users list`")
    return user
