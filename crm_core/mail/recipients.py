"""Each recipient's fate: the ledger an outbox message keeps per address.

Why per recipient: a server may take a message for some recipients and not others
(Postfix answers ``452 4.5.3 too many recipients`` after its limit, or ``550`` for an
unknown mailbox). A message is ``sent`` only when every recipient has it; deferred
recipients get a later attempt for them alone, with the same Message-ID; refused ones
are named with the server's words. These are pure functions of the ledger, so the
rules can be read and tested without a database.

A ledger maps an address to ``{"state": ..., "reply": ..., "at": ...}`` where state
is ``delivered``, ``deferred`` or ``refused`` (a :class:`RecipientStatus`), or
``unknown`` (an attempt whose answer was lost). An address absent from the ledger has
had no answer yet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crm_core.mail.transport import Outcome, RecipientStatus, SendResult

Ledger = dict[str, dict[str, Any]]

DELIVERED = RecipientStatus.DELIVERED.value
DEFERRED = RecipientStatus.DEFERRED.value
REFUSED = RecipientStatus.REFUSED.value
UNKNOWN = "unknown"

_BY_OUTCOME = {
    Outcome.SENT: DELIVERED,
    Outcome.TEMPORARY: DEFERRED,
    Outcome.PERMANENT: REFUSED,
    Outcome.AMBIGUOUS: UNKNOWN,
}
"""A recipient's state when the transport answered for the whole message only."""


def merge(
    ledger: Mapping[str, Mapping[str, Any]] | None,
    envelope: Sequence[str],
    result: SendResult,
    now: datetime,
) -> Ledger:
    """The ledger after one attempt for ``envelope`` ended with ``result``.

    A configuration or throttled result changes nothing: the account or its mailbox
    is paused, nobody was tried.
    """
    merged: Ledger = {address: dict(entry) for address, entry in (ledger or {}).items()}
    if result.outcome in (Outcome.CONFIGURATION, Outcome.THROTTLED):
        return merged
    at = now.isoformat()
    answered = {r.address.lower(): r for r in result.recipients}
    whole = _BY_OUTCOME.get(result.outcome, UNKNOWN)
    words = result.reply or " ".join(p for p in (result.code, result.detail) if p)
    for address in envelope:
        one = answered.get(address.lower())
        state, reply = (one.status.value, one.reply) if one else (whole, words)
        if one and result.outcome is Outcome.AMBIGUOUS and state == DELIVERED:
            state = UNKNOWN  # RCPT was accepted, but the answer to the data was lost
        merged[address] = {"state": state, "reply": reply, "at": at}
    return merged


def all_delivered(result: SendResult) -> bool:
    """Whether ``result`` says nothing per recipient beyond the message's own outcome:
    no recipient reported, or the message sent and every recipient reported delivered."""
    if not result.recipients:
        return True
    return result.outcome is Outcome.SENT and all(
        r.status is RecipientStatus.DELIVERED for r in result.recipients
    )


def pending(ledger: Mapping[str, Mapping[str, Any]] | None, everyone: Sequence[str]) -> list[str]:
    """The recipients still owed the mail: neither delivered nor refused."""
    done = {DELIVERED, REFUSED}
    return [a for a in everyone if (ledger or {}).get(a, {}).get("state") not in done]


@dataclass(frozen=True)
class Tally:
    """How many recipients have which fate."""

    total: int
    delivered: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]
    waiting: tuple[str, ...]

    @property
    def partly(self) -> bool:
        """Some recipients have the mail and some do not (yet)."""
        return 0 < len(self.delivered) < self.total

    def summary(self) -> str:
        """``sent to 3 of 5; refused: a@x.se (550 5.1.1 …); waiting: b@y.se``."""
        parts = [f"sent to {len(self.delivered)} of {self.total}"]
        if self.refused:
            parts.append(
                "refused: " + ", ".join(f"{a} ({why})" if why else a for a, why in self.refused)
            )
        if self.waiting:
            parts.append("waiting: " + ", ".join(self.waiting))
        return "; ".join(parts)


def tally(ledger: Mapping[str, Mapping[str, Any]] | None, everyone: Sequence[str]) -> Tally:
    """Count the ledger over every recipient of the message."""
    entries = ledger or {}
    delivered = tuple(a for a in everyone if entries.get(a, {}).get("state") == DELIVERED)
    refused = tuple(
        (a, str(entries[a].get("reply") or ""))
        for a in everyone
        if entries.get(a, {}).get("state") == REFUSED
    )
    done = set(delivered) | {a for a, _ in refused}
    waiting = tuple(a for a in everyone if a not in done)
    return Tally(len(everyone), delivered, refused, waiting)
