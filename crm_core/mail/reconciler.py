"""Reconciling ``unknown`` mail: ask the transport whether it went, then apply the answer.

The one outbox job that talks to the network, so it sits beside the worker and frames
its own transactions: a snapshot, the transports asked outside any transaction, then
the answers applied only to rows nobody touched meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from crm_core.mail.message import OutgoingMessage
from crm_core.mail.operations import apply_resolution, get_message, refusal
from crm_core.mail.policy import S, db_now
from crm_core.mail.queue import outgoing
from crm_core.mail.transport import SenderAccount
from crm_core.models import OutboxAttempt, OutboxMessage, User

if TYPE_CHECKING:
    from crm_core.app import Crm


@dataclass(frozen=True)
class ReconcileReport:
    """What reconciling one ``unknown`` message found and did."""

    outbox_id: int
    message_id: str
    sent: bool | None
    detail: str
    applied: bool


def reconcile(crm: Crm, outbox_id: int | None = None) -> list[ReconcileReport]:
    """Ask each transport whether its ``unknown`` messages went out, and apply the answer.

    Found → sent; certainly not sent → queued again; cannot tell → stays unknown for
    ``crm outbox resolve``. The transport is asked between two short transactions; the
    answer is applied only if nobody touched the row meanwhile.
    """
    with crm.transaction(write=False) as session:
        snapshot = _unknown_for_reconcile(crm, session, outbox_id)
        now = db_now(session)
    answers: list[tuple[int, str | None, str, bool | None, str]] = []
    groups: dict[str, list[tuple[int, str | None, OutgoingMessage, SenderAccount]]] = {}
    for item in snapshot:
        groups.setdefault(item[3].key, []).append(item)
    for group in groups.values():
        account = group[0][3]
        found = _ask_transport(crm, account, [m for _, _, m, _ in group], now)
        for row_id, token, message, _ in group:
            sent, detail = found.get(message.message_id, (None, "the transport gave no answer"))
            answers.append((row_id, token, message.message_id, sent, detail))
    reports: list[ReconcileReport] = []
    with crm.transaction() as session:
        for row_id, token, message_id, sent, detail in answers:
            applied = False
            row = session.get(OutboxMessage, row_id, with_for_update=True)
            untouched = (
                row is not None and row.state == S.UNKNOWN.value and row.lease_token == token
            )
            if row is not None and untouched and sent is not None:
                apply_resolution(session, row, sent, f"reconciled: {detail}", db_now(session))
                applied = True
            reports.append(ReconcileReport(row_id, message_id, sent, detail, applied))
    return reports


def _unknown_for_reconcile(
    crm: Crm, session: Session, outbox_id: int | None
) -> list[tuple[int, str | None, OutgoingMessage, SenderAccount]]:
    query = select(OutboxMessage).where(OutboxMessage.state == S.UNKNOWN.value)
    if outbox_id is not None:
        row = get_message(session, outbox_id)
        if row.state != S.UNKNOWN.value:
            raise refusal(row, "reconcile", "only messages in state unknown are reconciled")
        query = query.where(OutboxMessage.id == outbox_id)
    items = []
    accounts: dict[int, SenderAccount] = {}
    rows = list(session.scalars(query.options(selectinload(OutboxMessage.attachments))))
    handed_over = _last_attempt_starts(session, [row.id for row in rows])
    for row in rows:
        if row.user_id not in accounts:
            user = session.get(User, row.user_id)
            assert user is not None
            accounts[row.user_id] = crm.sender_account(session, user)
        # Ask the transport that tried to send it, even if the user switched since.
        account = replace(accounts[row.user_id], transport=row.transport)
        message = outgoing(row, handed_over.get(row.id))
        items.append((row.id, row.lease_token, message, account))
    return items


def _last_attempt_starts(session: Session, ids: Sequence[int]) -> dict[int, datetime]:
    """When each message was last handed to a transport (its latest attempt's start)."""
    if not ids:
        return {}
    found = session.execute(
        select(OutboxAttempt.outbox_id, func.max(OutboxAttempt.started_at))
        .where(OutboxAttempt.outbox_id.in_(ids))
        .group_by(OutboxAttempt.outbox_id)
    )
    return {int(outbox_id): started for outbox_id, started in found if started is not None}


def _ask_transport(
    crm: Crm, account: SenderAccount, messages: Sequence[OutgoingMessage], now: datetime
) -> dict[str, tuple[bool | None, str]]:
    try:
        results = crm.reconcile_mail(account, messages, now)
    except Exception as exc:  # a transport that cannot look must not stop the others
        return {
            m.message_id: (None, f"could not look: {type(exc).__name__}: {exc}") for m in messages
        }
    return {r.message_id: (r.sent, r.detail) for r in results}
