"""Exchange Online's sending limits for an account, for the outbox's pacing.

Why these numbers (Microsoft's service description and Graph throttling limits): per
mailbox 30 messages a minute and 10,000 recipients in a rolling 24 hours; Graph runs at
most 4 requests at once per app and mailbox (a ``$batch`` runs up to 4 of its items
together, so one batch may hold all 4); EWS's concurrency budget is 27. An Exchange
Server on premises sets its own throttling policies, which a client cannot read, so it
gets no pacing unless the administrator sets ``mail.*`` limits.
"""

from __future__ import annotations

from crm_core.plugin_api import MailboxLimits
from exchange_mail.settings import Api, ExchangeSettings, exchange_online_cloud

PER_MINUTE = 30
RECIPIENTS_PER_DAY = 10_000
GRAPH_REQUESTS = 4
EWS_REQUESTS = 27


def limits_for(settings: ExchangeSettings) -> MailboxLimits:
    """The mailbox sent from and its limits: Exchange Online's for Graph and for EWS
    to Microsoft's hosts; none for an Exchange Server."""
    mailbox = settings.mailbox.strip().lower()
    if settings.api is Api.GRAPH:
        return MailboxLimits(
            f"m365:{mailbox}",
            PER_MINUTE,
            RECIPIENTS_PER_DAY,
            connections=GRAPH_REQUESTS,
            parallel=GRAPH_REQUESTS,
        )
    if exchange_online_cloud(settings.url) is not None:  # every cloud, national too
        return MailboxLimits(
            f"m365:{mailbox}", PER_MINUTE, RECIPIENTS_PER_DAY, connections=EWS_REQUESTS
        )
    return MailboxLimits(f"exchange:{settings.host}:{mailbox}")
