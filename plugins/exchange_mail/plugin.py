"""Hook implementations of the Exchange transport (``mail.transport = exchange``).

The hooks stay thin: settings and what stops sending live in
:mod:`exchange_mail.settings`; sending and reconciling in :mod:`exchange_mail.ews`
and :mod:`exchange_mail.graph`, which mirror each other; the mapping of failures in
:mod:`exchange_mail.ews_errors` and :mod:`exchange_mail.graph_errors` (tables, with
what both share in :mod:`exchange_mail.errors`); the Test connection ladder in
:mod:`exchange_mail.diagnostics`. The core calls these hooks only for accounts whose
transport is ``exchange``. Everything cached (msal clients, exchangelib Accounts,
Graph sessions) lives in the Crm's :class:`Resources`, never in this module.

exchangelib (about a third of a second to import) is imported by the hooks that send,
test or reconcile, so ``crm settings``/``crm users`` commands do not pay for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime

from crm_core.plugin_api import (
    ConnectionReport,
    MailboxLimits,
    OutgoingMessage,
    Problem,
    ReconcileResult,
    Resources,
    RouteInfo,
    Scope,
    SenderAccount,
    SendResult,
    SettingField,
    SettingNotice,
    SettingValue,
    TransportSpec,
    forget_clients,
    hookimpl,
)
from exchange_mail.limits import limits_for
from exchange_mail.settings import (
    EWS_CACHE,
    TRANSPORT,
    Api,
    AuthMode,
    blocking_problems,
    check,
    fields,
    resolve,
)

IN_FLIGHT = 50
"""Messages handed over before their results are reported: one EWS CreateItem holds
up to 50 (``ews.MAX_MESSAGES_PER_REQUEST``), one Graph ``$batch`` 20; each request is
reported before the next leaves, in the order given."""


@hookimpl
def register_transports() -> list[TransportSpec]:
    """Offer the ``exchange`` transport (the guide's "Send via Exchange")."""
    return [
        TransportSpec(
            TRANSPORT,
            "Send via Exchange",
            description="Microsoft Exchange: EWS (Exchange Server, or Exchange Online with "
            "app-only OAuth) or Microsoft Graph sendMail (Exchange Online).",
            in_flight=IN_FLIGHT,
        )
    ]


@hookimpl
def register_settings() -> list[SettingField]:
    """The System settings and the E-mail tab's fields for Exchange."""
    return fields()


@hookimpl
def check_settings(
    scope: Scope,
    system: dict[str, SettingValue],
    user: dict[str, SettingValue] | None,
    transport: str | None,
    today: date,
) -> list[SettingNotice]:
    """Credential expiry, Secret-ID-shaped secrets, username vs domain, unticked sync."""
    return check(scope, system, user, today, transport)


@hookimpl
def user_settings_changed(account: SenderAccount, resources: Resources) -> None:
    """Drop the user's cached Exchange Account; the next send builds a new one."""
    resources.discard((*EWS_CACHE, account.user_id))


@hookimpl
def system_settings_changed(changed: Sequence[str], resources: Resources) -> None:
    """Drop cached Accounts and msal clients when Exchange or TLS settings changed."""
    if any(k.startswith(("exchange.", "tls.")) for k in changed):
        resources.discard(EWS_CACHE)
        forget_clients(resources)


@hookimpl
def sending_problems(account: SenderAccount) -> list[Problem]:
    """URL, sign-in codes or password, username, domain, and the ticked sync box."""
    return blocking_problems(account, resolve(account))


@hookimpl
def send_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
) -> list[SendResult]:
    """Send one sender's batch through EWS or Graph; a result per message, each request's
    results reported as soon as Exchange answers it."""
    settings = resolve(account)
    if settings.api is Api.GRAPH:
        from exchange_mail import graph

        return graph.send(account, settings, messages, resources, report)
    from exchange_mail import ews

    return ews.send(account, settings, messages, resources, report)


@hookimpl
def test_connection(
    account: SenderAccount, resources: Resources, problems: Sequence[Problem], today: date
) -> ConnectionReport:
    """The guide's Test connection, as a ladder of named steps."""
    from exchange_mail import diagnostics

    return diagnostics.run(account, resources, today, problems)


@hookimpl
def reconcile_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    now: datetime,
) -> list[ReconcileResult]:
    """Look for messages of unknown fate in the sender's Outbox and Sent Items by
    Message-ID; ``now`` (the database's clock) against each last hand-over decides
    whether "not found" can mean "not sent" yet."""
    settings = resolve(account)
    reachable = settings.mailbox and (settings.url or settings.api is Api.GRAPH)
    if blocking_problems(account, settings) and not reachable:
        return [
            ReconcileResult(m.message_id, None, "Exchange settings incomplete") for m in messages
        ]
    if settings.api is Api.GRAPH:
        from exchange_mail import graph

        return graph.reconcile(settings, messages, resources, now)
    from exchange_mail import ews

    return ews.reconcile(account, settings, messages, resources, now)


@hookimpl
def message_problems(account: SenderAccount, message: OutgoingMessage) -> list[Problem]:
    """A mail too large for the API that ``exchange.api`` picks (see exchange_mail.message_size)."""
    from exchange_mail.message_size import size_problems

    return size_problems(resolve(account), message)


@hookimpl
def mailbox_limits(account: SenderAccount) -> MailboxLimits:
    """Exchange Online's limits for Graph and Microsoft's EWS hosts; none on premises."""
    return limits_for(resolve(account))


@hookimpl
def describe_route(account: SenderAccount) -> RouteInfo:
    """Server, mailbox and sign-in, without touching the network."""
    settings = resolve(account)
    notes = [f"api {settings.api.value}: {settings.api_reason}", f"sender {account.email}"]
    if settings.mode is AuthMode.OAUTH and settings.app is not None:
        notes.append(f"app-only OAuth, client {settings.app.client_id}, impersonation")
    elif settings.mode is AuthMode.PASSWORD:
        notes.append(f"password sign-in ({settings.onprem_auth})")
    else:
        notes.append("not signed in: settings incomplete")
    if settings.api is Api.GRAPH:
        server = settings.graph_root
        notes.append(f"EWS URL {settings.url or '(not set)'} not used")
    else:
        server = settings.url or "(exchange.url not set)"
    return RouteInfo(TRANSPORT, server, settings.mailbox, tuple(notes))
