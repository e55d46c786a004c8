"""How large a mail each Exchange API takes, checked before a mail is queued.

Why before: a mail the chosen API cannot carry would otherwise sit in the outbox and
fail at the worker. ``crm send --dry-run`` and every enqueue (the CLI, the web's
compose) ask :func:`size_problems` through the ``message_problems`` hook, with the
API that ``exchange.api`` (``auto``: Graph for Exchange Online) picks.

The figures (Microsoft's, see shared/research/microsoft-365-2026.md §2.2 and
microsoft-exchange-notes.md §4):

* Graph ``sendMail`` carries a request of at most 4 MB, so attachments go inline only
  under 3 MB; from 3 MB to 150 MB per file they go through a draft and an upload
  session (chunks of at most 4 MB), which needs Mail.ReadWrite.
* Exchange Online's highest maximum message size is 150 MB (the tenant's default is
  35 MB; Exchange itself refuses a mail over the tenant's own limit with
  ErrorMessageSizeExceeded, which the outbox reports as permanent).
* EWS sends the whole mail, base64-encoded, in one CreateItem request; the same
  150 MB ceiling applies to that request.
"""

from __future__ import annotations

from crm_core.plugin_api import OutgoingMessage, Problem
from exchange_mail.settings import API, Api, ExchangeSettings

MB = 1024 * 1024
UPLOAD_SESSION_MIN_BYTES = 3_000_000
"""From this size an attachment goes through an upload session (Graph's "3 MB")."""
UPLOAD_CHUNK_BYTES = 4 * MB
"""The largest byte range one PUT to an upload session may carry ("up to 4 MB")."""
GRAPH_MAX_ATTACHMENT_BYTES = 150 * MB
"""The largest file an upload session takes."""
MAX_MESSAGE_BYTES = 150 * MB
"""Exchange Online's highest maximum message size (MIME, attachments base64-encoded),
and the largest EWS request we send."""


def size_problems(settings: ExchangeSettings, message: OutgoingMessage) -> list[Problem]:
    """Why this mail is too large for the API it would go through; empty when it fits."""
    graph = settings.api is Api.GRAPH
    path = "Microsoft Graph" if graph else "EWS"
    problems: list[Problem] = []
    if graph:
        for attachment in message.attachments:
            if len(attachment.data) > GRAPH_MAX_ATTACHMENT_BYTES:
                problems.append(
                    Problem(
                        f"attachment {attachment.filename!r}",
                        f"is {_mb(len(attachment.data))}; Microsoft Graph takes files of at "
                        f"most {_mb(GRAPH_MAX_ATTACHMENT_BYTES)} (upload session)",
                        "send a link to the file instead",
                    )
                )
    size = message.size_estimate()
    if size > MAX_MESSAGE_BYTES and not problems:  # a file too large says it already
        problems.append(
            Problem(
                "size",
                f"the mail would be about {_mb(size)} as sent (attachments base64-encoded); "
                f"{path} ({API} {settings.api_choice.value}) takes at most "
                f"{_mb(MAX_MESSAGE_BYTES)}",
                "send smaller attachments, or links to them",
            )
        )
    return problems


def needs_upload(message: OutgoingMessage) -> bool:
    """Whether an attachment is too large for sendMail itself (3 MB or more); the graph
    module also drafts a mail whose sendMail body would exceed the 4 MB request cap."""
    return any(len(a.data) >= UPLOAD_SESSION_MIN_BYTES for a in message.attachments)


def _mb(size: int) -> str:
    return f"{size / MB:.1f} MB"
