"""Every hook crm_core calls, with its contract.

Plugins implement hooks with ``from crm_core import hookimpl``. Hooks take keyword
arguments; an implementation may accept fewer arguments than the spec (so specs can
grow without breaking plugins). The core calls hooks only through typed methods on
:class:`crm_core.app.Crm` that own the defaults and check what plugins return.

Families:

- ``register_*``: called once when a product line's plugin manager is built; return
  lists of declarations. Duplicates across plugins stop start-up.
- ``send_mail`` / ``test_connection`` / ``reconcile_mail`` / ``describe_route``:
  answered by the plugin that owns ``account.transport`` (first non-None result wins);
  other plugins return None.
- ``check_settings``: every plugin may add warnings or errors about saved settings.
- ``user_settings_changed`` / ``system_settings_changed``: every plugin drops what it
  cached for the changed account; raising :class:`crm_core.errors.ValidationError`
  vetoes the change (the transaction is rolled back).
"""

# mypy: disable-error-code="empty-body"
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from crm_core.fields import Scope, SettingField, SettingNotice
    from crm_core.mail.message import OutgoingMessage
    from crm_core.mail.transport import (
        ConnectionReport,
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
) -> list[SettingNotice]:
    """Cross-field checks of saved settings: warnings and errors for the admin.

    Called on save (errors then refuse the save) and by ``crm settings show`` /
    ``crm users show`` (everything is shown). ``user``, ``user_email`` and
    ``transport`` (the user's effective transport: their choice, else their product
    line's default) are None for system scope. Return a list of
    :class:`SettingNotice` (may be empty). Use it for what one field's validator
    cannot see, e.g. a username whose domain differs from ``exchange.domain``, or a
    client secret that expires within 30 days.
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
    account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
) -> list[SendResult] | None:
    """Send a batch of messages for one sender account. First non-None result wins.

    Called by the outbox worker, outside any database transaction, with messages
    grouped by sender so that the transport can reuse one connection or session.
    Return None unless ``account.transport`` is one of yours. Otherwise return one
    :class:`SendResult` per message, classifying each failure (temporary, permanent,
    configuration, ambiguous) so that the outbox never loses a mail and never resends
    one that may have gone. Raise only for programming errors; the core then marks
    the batch ``unknown`` because it cannot tell what was sent.
    """


@hookspec(firstresult=True)
def test_connection(account: SenderAccount, resources: Resources) -> ConnectionReport | None:
    """Run the Test connection ladder for one account. First non-None result wins.

    Return None unless ``account.transport`` is yours. Otherwise return a
    :class:`ConnectionReport` whose steps are green or red, each with the reason and
    what to fix. Must not send a mail.
    """


@hookspec(firstresult=True)
def reconcile_mail(
    account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
) -> list[ReconcileResult] | None:
    """Find out whether messages in state ``unknown`` were sent. First result wins.

    Return None unless the transport is yours; otherwise one
    :class:`ReconcileResult` per message (``sent=None`` when you cannot tell, e.g.
    SMTP, which has no way to look).
    """


@hookspec(firstresult=True)
def describe_route(account: SenderAccount) -> RouteInfo | None:
    """Say how this account's mail would be sent (server, account), for dry runs.

    Return None unless the transport is yours. Must not touch the network.
    """
