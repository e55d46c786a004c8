"""The sending limits of the SMTP server an account uses, for the outbox's pacing.

Why only Microsoft 365: its client submission limits are documented (30 messages a
minute and 10,000 recipients a rolling day per mailbox, 3 connections at once, past
which it answers ``432 4.3.2 … sender thread limit exceeded``); other servers publish
none, so they get no pacing unless the administrator sets ``mail.*`` limits.
"""

from __future__ import annotations

from crm_core.plugin_api import MailboxLimits, SenderAccount
from smtp_mail.settings import SmtpSettings

MICROSOFT_365_HOSTS = frozenset({"smtp.office365.com", "smtp-legacy.office365.com"})


def limits_for(account: SenderAccount, settings: SmtpSettings) -> MailboxLimits:
    """The mailbox the account submits as (its login, else its address) and its limits.

    A Microsoft 365 mailbox has one key whatever API reaches it, so SMTP and Exchange
    share its budget. ``parallel`` is how many connections one batch opens
    (:func:`smtp_mail.settings.connections`), so a batch holds that many slots.
    """
    mailbox = (settings.username or account.email).strip().lower()
    host = settings.host.strip().lower()
    if host in MICROSOFT_365_HOSTS:
        return MailboxLimits(
            f"m365:{mailbox}",
            per_minute=30,
            recipients_per_day=10_000,
            connections=3,
            parallel=settings.connections,
        )
    return MailboxLimits(f"smtp:{host}:{mailbox}", parallel=settings.connections)
