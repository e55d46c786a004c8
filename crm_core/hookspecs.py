"""Every hook crm_core calls, with its contract.

Plugins implement hooks with ``from crm_core import hookimpl``. Hooks take keyword
arguments; an implementation may accept fewer arguments than the spec (so specs can
grow without breaking plugins). The core calls hooks only through typed methods on
:class:`crm_core.app.Crm` that own the defaults and check what plugins return.

Families:

- ``register_*``: called once when a product line's plugin manager is built; return
  lists of declarations. Duplicates across plugins stop start-up.
- ``sending_problems`` / ``message_problems`` / ``send_mail`` / ``test_connection`` /
  ``reconcile_mail`` / ``describe_route``: called on the plugin that owns
  ``account.transport`` alone (the core knows the owner from ``register_transports``
  and calls a pluggy subset hook caller without the plugins of other transports), so
  an implementation never checks whether the account is its own. Plugins that offer
  no transport (observers, tracing) may wrap these hooks with
  ``hookimpl(wrapper=True)``; they may not answer them.
- ``check_settings``: every plugin may add advice (warnings) about saved settings;
  what stops an account from sending is ``sending_problems``.
- ``user_settings_changed`` / ``system_settings_changed``: every plugin drops what it
  cached for the changed account; raising :class:`crm_core.errors.ValidationError`
  vetoes the change (the transaction is rolled back).
"""

# mypy: disable-error-code="empty-body"
from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from crm_core.errors import Problem
    from crm_core.fields import Scope, SettingField, SettingNotice
    from crm_core.mail.message import OutgoingMessage
    from crm_core.mail.transport import (
        ConnectionReport,
        MailboxLimits,
        ReconcileResult,
        Resources,
        RouteInfo,
        SenderAccount,
        SendResult,
        SettingValue,
        TransportSpec,
    )

PROJECT = "crm_core"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- registration ---------------------------------------------------------------


@hookspec
def register_transports() -> list[TransportSpec]:
    """Declare the transports this plugin offers.

    Called when a product line's plugin manager is built. Return a list of
    :class:`TransportSpec` (``name`` is what users choose as ``mail.transport``,
    e.g. ``"smtp"``; ``label`` is shown in lists, e.g. ``"Send via SMTP"``).
    A transport name offered by two plugins stops start-up.
    """


@hookspec
def register_settings() -> list[SettingField]:
    """Declare the system and per-user settings fields this plugin needs.

    Return a list of :class:`SettingField`. Keys are namespaced by the plugin
    (``smtp.host``, ``exchange.client_secret``); ``type=FieldType.SECRET`` fields are
    encrypted at rest and never shown again; ``validator`` normalises or refuses a
    value on save with :class:`SettingValueError`. A key declared twice stops start-up.
    """


# --- settings -------------------------------------------------------------------


@hookspec
def check_settings(
    scope: Scope,
    system: dict[str, SettingValue],
    user: dict[str, SettingValue] | None,
    user_email: str | None,
    transport: str | None,
    today: date,
) -> list[SettingNotice]:
    """Advice about saved settings that does not stop sending: warnings for the admin.

    ``today`` is the Crm's date (its injectable clock), for warnings about expiry.

    Called after a save and by ``crm settings show`` / ``crm users show``. ``user``,
    ``user_email`` and ``transport`` (the user's effective transport: their choice,
    else their product line's default) are None for system scope. Return a list of
    :class:`SettingNotice` (may be empty). Use it for what one field's validator
    cannot see and that is worth a warning, e.g. a username whose domain differs from
    ``exchange.domain``, or a client secret that expires within 30 days. What stops
    an account from sending belongs in :func:`sending_problems` instead.
    """


@hookspec(firstresult=True)
def sending_problems(account: SenderAccount) -> list[Problem]:
    """What stops this account from sending, in the transport's own terms.

    Called on the owner of ``account.transport`` only, by the one core method that
    answers the question for claim, ``crm send --dry-run``, Test connection,
    ``crm check``, ``crm users show`` and every save (a save is refused when a
    problem concerns the saved key: its ``key`` or ``also``). The core has already
    checked that the transport is enabled and that fields declared ``required_for``
    it are set. Return a list of :class:`Problem` (empty when ready), each with a
    ``fix`` that works when typed, e.g. ``crm users set anna@contoso.se
    exchange.sync true``. Must not touch the network. For the installation's own
    settings the core asks with an account whose ``user_id`` is 0 and ``email`` is
    empty.
    """


@hookspec(firstresult=True)
def message_problems(account: SenderAccount, message: OutgoingMessage) -> list[Problem]:
    """What stops this one mail from going by this account's route, before it is queued.

    Called on the owner of ``account.transport`` only, by enqueue (``crm send``, the
    web's compose) and ``crm send --dry-run``, after the core's own limits
    (``[mail] max_message_bytes``, ``max_recipients``). Use it for what only the
    transport knows, e.g. the largest attachment its API can carry. Return a list of
    :class:`Problem` (empty when the mail can go). Must not touch the network.
    """


@hookspec
def user_settings_changed(
    account: SenderAccount, changed: Sequence[str], resources: Resources
) -> None:
    """A user's settings were saved; drop cached sessions or tokens for that user.

    Called inside the saving transaction, after the new values are written and before
    commit. ``changed`` lists the keys that changed. Raise ``ValidationError`` to veto
    the change; the caller rolls back. Return None.
    """


@hookspec
def system_settings_changed(changed: Sequence[str], resources: Resources) -> None:
    """System settings were saved; drop cached clients that used the old values.

    Same contract as :func:`user_settings_changed`, for the installation's settings.
    """


# --- sending --------------------------------------------------------------------


@hookspec(firstresult=True)
def send_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
    more: Callable[[], Sequence[OutgoingMessage]],
) -> list[SendResult]:
    """Send a batch of messages for one sender account.

    Called by the outbox worker, outside any database transaction, on the owner of
    ``account.transport``, with messages grouped by sender so that the transport can
    reuse one connection or session, and only when :func:`sending_problems` found
    nothing (otherwise the account is paused before any attempt). Return one
    :class:`SendResult` per message, classifying each failure (temporary, permanent,
    configuration, ambiguous) so that the outbox never loses a mail and never resends
    one that may have gone. Raise only for programming errors; the core then marks
    what was not reported ``unknown`` because it cannot tell what was sent.

    Call ``report`` with results as soon as the server has answered them (each SMTP
    message, each Exchange request): the core records them there and then, so a
    worker killed mid-batch leaves only what was in flight ``unknown``. The returned
    list still holds every result; a result already reported is not recorded twice.
    One message that cannot be rendered or encoded is ``PERMANENT`` on its own; the
    rest of the batch goes on.

    A transport that keeps a connection or session open may call ``more`` once it has
    handed out every message: the account's next messages, claimed for this batch
    (none: the batch is over; do not call it again). They are the batch's like the
    others: reported, and returned after them. Why: a mass mailing then pays for one
    login, not one per batch. A transport that does not take ``more`` simply leaves
    it out of its parameters.
    """


@hookspec(firstresult=True)
def test_connection(
    account: SenderAccount, resources: Resources, problems: Sequence[Problem], today: date
) -> ConnectionReport:
    """Run the Test connection ladder for one account (``today``: the Crm's date, for
    warnings about expiring credentials).

    ``problems`` is the core's answer to "what stops this account from sending"
    (the same list a claim would pause on): show it in your settings rung instead of
    working it out again, and skip the rungs it makes pointless. Return a
    :class:`ConnectionReport` whose steps are green or red, each with the reason and
    what to fix. Must not send a mail.
    """


@hookspec(firstresult=True)
def reconcile_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    now: datetime,
) -> list[ReconcileResult]:
    """Find out whether messages in state ``unknown`` were sent.

    Return one :class:`ReconcileResult` per message (``sent=None`` when you cannot
    tell, e.g. SMTP, which has no way to look). ``now`` is the database's clock; a
    message's ``handed_over_at`` is the start of the attempt whose answer was lost, so
    "too soon to tell" (a copy not yet filed in Sent Items) is measured between the
    two, never from the enqueue. A plugin that does not implement it leaves every
    message for an operator to decide.
    """


@hookspec(firstresult=True)
def mailbox_limits(account: SenderAccount) -> MailboxLimits:
    """Name the mailbox this account sends through and the server's limits for it.

    The outbox paces every worker's sends to these (messages a minute, recipients a
    day, connections at once), unless the system or the user sets ``mail.*`` limits
    of their own; a server's throttling pauses the named mailbox. Return the
    defaults of the server the account uses (Exchange Online's for Microsoft 365, 0
    for no limit elsewhere). Must not touch the network. A plugin that does not
    implement it gets no limits, and its mailbox is the user's address.
    """


@hookspec(firstresult=True)
def describe_route(account: SenderAccount) -> RouteInfo:
    """Say how this account's mail would be sent (server, account), for dry runs.

    Must not touch the network.
    """
