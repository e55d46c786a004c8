"""Hook implementations of the SMTP transport.

The session, token and Test connection modules are imported by the hooks that use
them: every ``crm`` command loads this module, and only the worker and Test connection
need smtplib, TLS and msal's HTTP client.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

from crm_core.plugin_api import (
    ConnectionReport,
    MailboxLimits,
    Outcome,
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
from smtp_mail.limits import limits_for
from smtp_mail.settings import (
    CA_BUNDLE,
    MOST_CONNECTIONS,
    TRANSPORT,
    AuthMode,
    check,
    connections,
    resolve,
    smtp_fields,
)
from smtp_mail.settings import sending_problems as settings_problems

log = logging.getLogger(__name__)


@hookimpl
def register_transports() -> list[TransportSpec]:
    """Offer the ``smtp`` transport."""
    return [
        TransportSpec(
            TRANSPORT,
            "Send via SMTP",
            # One message at a time on each connection, each reported before the next
            # is taken, in order: as many in flight as the account has connections.
            in_flight=MOST_CONNECTIONS,
            in_flight_for=connections,
            description="Any SMTP server: Microsoft 365 (OAuth), Google, a company relay, "
            "an on-premises Exchange receive connector.",
        )
    ]


@hookimpl
def register_settings() -> list[SettingField]:
    """smtp.* system and per-user fields, and the shared Entra fields for XOAUTH2."""
    return smtp_fields()


@hookimpl
def check_settings(
    scope: Scope,
    system: dict[str, SettingValue],
    user: dict[str, SettingValue] | None,
    user_email: str | None,
    transport: str | None,
) -> list[SettingNotice]:
    """Cross-field rules: plain text only to loopback, what each login mode needs."""
    return check(scope, system, user, user_email, transport)


@hookimpl
def system_settings_changed(changed: Sequence[str], resources: Resources) -> None:
    """Drop msal clients when the Entra codes or the CA bundle change."""
    if any(key.startswith("exchange.") or key == CA_BUNDLE for key in changed):
        forget_clients(resources)


@hookimpl
def sending_problems(account: SenderAccount) -> list[Problem]:
    """Server, login, password, plain text only to loopback, Entra codes for XOAUTH2."""
    return settings_problems(account)


@hookimpl
def send_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
    more: Callable[[], Sequence[OutgoingMessage]],
) -> list[SendResult]:
    """Send the batch over up to ``mail.max_connections`` connections (one AUTH each);
    one classified result per message.

    Each result is reported as the server's final reply for it arrives, so a worker
    killed mid-batch leaves only the messages in flight (one per connection) unknown.
    The connections stay open for ``more`` of the account's mail, while there is some.
    """
    from smtp_mail.batch import send_batch
    from smtp_mail.tls import shared_contexts

    settings = resolve(account)
    tokens = None
    if settings.auth is AuthMode.XOAUTH2:  # only then msal's HTTP client (requests)
        from smtp_mail.oauth import EntraTokens

        tokens = EntraTokens.for_account(account, resources)
    sent = send_batch(settings, tokens, messages, report, shared_contexts(resources), more)
    _log_batch(account, settings.server, sent.results, sent.connections)
    return sent.results


@hookimpl
def mailbox_limits(account: SenderAccount) -> MailboxLimits:
    """Microsoft 365's limits for smtp.office365.com; none for other servers."""
    return limits_for(account, resolve(account))


def _log_batch(
    account: SenderAccount, server: str, results: Sequence[SendResult], connections: int
) -> None:
    """One line per message that was not simply sent, and one for the batch."""
    for result in results:
        if result.outcome is not Outcome.SENT or result.detail:
            log.info(
                "SMTP %s %s [%s]: %s",
                result.outcome.value,
                result.message_id,
                result.code,
                result.detail,
            )
    counts = Counter(r.outcome.value for r in results)
    log.info(
        "SMTP batch for %s via %s: %s over %d connection(s)",
        account.email,
        server,
        dict(counts),
        connections,
    )


@hookimpl
def test_connection(
    account: SenderAccount, resources: Resources, problems: Sequence[Problem]
) -> ConnectionReport:
    """Settings, resolve, connect, TLS, (token,) AUTH, MAIL FROM the user's address, RSET."""
    from smtp_mail import diagnostics

    return diagnostics.test_connection(account, resources, problems)


@hookimpl
def reconcile_mail(
    account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
) -> list[ReconcileResult]:
    """SMTP cannot tell: a server keeps no Sent folder that a client could search.

    Why not "look in the Sent folder": mail sent over SMTP is not filed there, so the
    advice would mislead. The evidence is the attempt's own result (the step at which
    the connection was lost and the server's last reply); the server's log has the rest.
    """
    return [
        ReconcileResult(
            m.message_id,
            None,
            "SMTP cannot look up whether a message was delivered: an SMTP server keeps no "
            "Sent folder to search, and mail sent through it is not filed in one. The last "
            "attempt's result shows the step at which the connection was lost and the "
            "server's last reply. Ask the recipient, or ask the mail server's administrator "
            f"to look for Message-ID {m.message_id} in the server's log; then mark it sent "
            "or send it again.",
        )
        for m in messages
    ]


@hookimpl
def describe_route(account: SenderAccount) -> RouteInfo:
    """Server, login and encryption this account would use (no network)."""
    s = resolve(account)
    login = s.username if s.auth is not AuthMode.NONE else "(no login)"
    return RouteInfo(
        TRANSPORT,
        server=s.server,
        account=login,
        notes=(f"security {s.security.value}", f"auth {s.auth.value}"),
    )
