"""How one send attempt ended: the classification every transport and the outbox share.

Its own module because both the error tree (:class:`crm_core.errors.TransportError`)
and the transport contract (:mod:`crm_core.mail.transport`) need it, and neither may
import the other.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """How one send attempt ended, as the outbox needs to know it.

    - ``sent``: the server took responsibility for the message.
    - ``temporary``: try again later (4xx, throttling, a connection that failed
      before the message was handed over).
    - ``permanent``: the message can never be sent as it is (5xx on a recipient, a
      message too large); it is not retried.
    - ``configuration``: the sender's account or the installation is misconfigured
      (wrong password, expired secret, unknown mailbox); the account is paused
      until someone fixes the settings, instead of burning retries.
    - ``ambiguous``: the message may or may not have been sent (connection lost
      after the final dot, timeout after the request was sent); it becomes
      ``unknown`` and is reconciled, never silently resent.
    - ``throttled``: the server asks the sender's mailbox to wait (Graph 429, EWS
      ErrorServerBusy or 503 with Retry-After, SMTP ``432 4.3.2``, a 4.7.x rate
      reply, the daily quota); nothing was sent. The mailbox is paused until the
      time the server gave, for every worker, and the try is not counted.
    """

    SENT = "sent"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"
    CONFIGURATION = "configuration"
    AMBIGUOUS = "ambiguous"
    THROTTLED = "throttled"
