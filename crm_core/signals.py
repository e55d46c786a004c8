"""Domain events (blinker), sent after the transaction that caused them commits.

Signals are notifications whose answers the core ignores (audit, metrics, web
push). Work the core needs an answer from is a pluggy hook instead. The sender is the
:class:`crm_core.app.Crm` instance; the payload is keyword arguments; receivers must
take ``**extra`` so that new arguments do not break them.

Services never send these directly: they call :func:`emit_after_commit`, which
queues the event on the session; the ``Crm`` sends the queue after commit and drops it
on rollback, so no receiver ever hears of a change that did not happen.

A receiver that raises is logged (``crm_core.signals``, with its traceback) and the
other receivers still run: the change is committed by then, so an error in one
receiver must neither hide the event from the others nor stop the worker that
committed it.

Every signal's payload is declared in :data:`PAYLOADS` and checked on every send, so
the table in docs/plugins.md (which a test compares with it) is the contract a
receiver can rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from blinker import Namespace
from sqlalchemy.orm import Session

_signals = Namespace()
log = logging.getLogger("crm_core.signals")

person_created = _signals.signal("person-created")
user_created = _signals.signal("user-created")
system_settings_changed = _signals.signal("system-settings-changed")
user_settings_changed = _signals.signal("user-settings-changed")
mail_queued = _signals.signal("mail-queued")
mail_sent = _signals.signal("mail-sent")
mail_partly_sent = _signals.signal("mail-partly-sent")
mail_retry_scheduled = _signals.signal("mail-retry-scheduled")
mail_failed = _signals.signal("mail-failed")
mail_unknown = _signals.signal("mail-unknown")
mail_cancelled = _signals.signal("mail-cancelled")
account_paused = _signals.signal("account-paused")
account_resumed = _signals.signal("account-resumed")
mailbox_paused = _signals.signal("mailbox-paused")
connection_tested = _signals.signal("connection-tested")
credential_expiring = _signals.signal("credential-expiring")

PENDING_KEY = "crm_pending_signals"

_RESULT = ("outbox_id", "message_id", "user_id", "attempt", "outcome", "reason", "code")
"""A mail's fate: ``attempt`` and ``outcome`` are None when no transport decided it
(an expired lease, an operator's or reconciler's decision); ``code`` may be empty."""

PAYLOADS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "person-created": ("person_id", "email"),
        "user-created": ("user_id", "email"),
        "system-settings-changed": ("keys",),
        "user-settings-changed": ("user_id", "email", "keys"),
        "mail-queued": ("outbox_id", "message_id", "user_id", "person_id"),
        "mail-sent": _RESULT,
        "mail-partly-sent": _RESULT,
        "mail-retry-scheduled": (*_RESULT, "next_attempt_at"),
        "mail-failed": _RESULT,
        "mail-unknown": _RESULT,
        "mail-cancelled": ("outbox_id", "message_id", "user_id"),
        "account-paused": ("user_id", "email", "transport", "reason"),
        "account-resumed": ("user_id", "email", "why"),
        "mailbox-paused": ("mailbox", "user_id", "email", "until", "reason", "code"),
        "connection-tested": ("user_id", "transport", "ok"),
        "credential-expiring": ("key", "credential", "expires", "days_left", "threshold"),
    }
)
"""Each signal's keyword arguments, exactly."""


def checked(signal_name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` if it is exactly what ``signal_name`` declares; a bug otherwise."""
    expected = PAYLOADS.get(signal_name)
    if expected is None or signal_name not in _signals:
        raise KeyError(f"unknown signal {signal_name!r}")
    if set(payload) != set(expected):
        raise TypeError(
            f"signal {signal_name!r} takes {', '.join(expected)}; got {', '.join(sorted(payload))}"
        )
    return dict(payload)


def emit_after_commit(session: Session, signal_name: str, **payload: Any) -> None:
    """Queue ``signal_name`` with ``payload`` to be sent after ``session`` commits."""
    pending: list[tuple[str, dict[str, Any]]] = session.info.setdefault(PENDING_KEY, [])
    pending.append((signal_name, checked(signal_name, payload)))


def send_now(sender: object, signal_name: str, **payload: Any) -> None:
    """Send a signal that no transaction waits for (Test connection changes nothing)."""
    deliver(sender, signal_name, checked(signal_name, payload))


def deliver(sender: object, signal_name: str, payload: Mapping[str, Any]) -> None:
    """Call each receiver of ``signal_name``; one that raises is logged, not passed on.

    Why not ``Signal.send``: blinker lets the first exception end the loop, so the
    receivers after it never heard of a committed change, and the exception reached
    the code that committed (it ended ``Worker.run``). An interrupt (Ctrl-C) is not
    an Exception and still goes through.
    """
    signal = _signals[signal_name]
    if signal.is_muted:
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **payload)
        except Exception:
            log.exception(
                "a receiver of signal %r raised (%s); the other receivers still run",
                signal_name,
                _name_of(receiver),
            )


def _name_of(receiver: Any) -> str:
    module = getattr(receiver, "__module__", None) or ""
    name = getattr(receiver, "__qualname__", None) or type(receiver).__name__
    return f"{module}.{name}" if module else name


def signal_named(name: str) -> Any:
    """The blinker signal called ``name``."""
    return _signals[name]


def all_signal_names() -> list[str]:
    """Every signal name, sorted (for docs and tests)."""
    return sorted(_signals)
