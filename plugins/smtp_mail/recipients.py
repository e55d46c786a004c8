"""Each envelope recipient's fate in one SMTP transaction, and the message's outcome.

Why: SMTP answers every RCPT on its own, and the reply after the final dot speaks only
for the recipients it accepted. The outbox tries deferred recipients again, alone and
with the same Message-ID, and records refused ones with the server's words; so a
result says who got the mail, who waits and who never will. The message is ``sent``
when the server took it for at least one recipient; when it took it for none, it is
``temporary`` if any recipient was deferred and ``permanent`` if all were refused
(``configuration`` when a refusal was about the account, not the recipient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from crm_core.plugin_api import Outcome, RecipientResult, RecipientStatus, SendResult
from smtp_mail.classify import Failure, Phase, reply_failure, said
from smtp_mail.hints import reply_code
from smtp_mail.render import Envelope

_Fate = tuple[RecipientStatus, str]
"""A status and the server's reply that decided it."""


@dataclass
class Tally:
    """What the server answered for each recipient of one transaction."""

    envelope: Envelope
    accepted: list[str] = field(default_factory=list)
    answered: dict[str, tuple[RecipientStatus, Failure]] = field(default_factory=dict)
    names: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.names = dict(zip(self.envelope.recipients, self.envelope.addresses, strict=True))

    def accept(self, rcpt: str) -> None:
        """RCPT answered 250 or 251: the reply after the final dot decides for it."""
        self.accepted.append(rcpt)

    def refuse(self, rcpt: str, code: int, reply: bytes) -> None:
        """RCPT answered 4xx or 5xx: deferred, or refused for good."""
        failure = reply_failure(Phase.RCPT, code, reply, self._name(rcpt))
        self.answered[rcpt] = (_status(failure), failure)

    def defer_rest(self, rest: Sequence[str], code: int, reply: bytes) -> None:
        """The server takes no more recipients in this transaction (452 4.5.3).

        Why not send the other RCPTs: the reply means the transaction is full, not
        that this recipient is unwelcome; each further RCPT would get the same answer.
        """
        line = said(code, reply)
        names = ", ".join(self._name(r) for r in rest)
        failure = Failure(
            Outcome.TEMPORARY,
            f"The server takes no more recipients in one message ({line}); {names} "
            "will get the same message in a later attempt.",
            "Nothing; it will be tried again later for them alone.",
            reply_code(code, line.partition(" ")[2]),
            line,
        )
        for rcpt in rest:
            self.answered[rcpt] = (RecipientStatus.DEFERRED, failure)

    # --- the result, by how the transaction ended ------------------------------------------

    def delivered(self, message_id: str, code: int, reply: bytes) -> SendResult:
        """The server took the message for every recipient it had accepted."""
        final = said(code, reply)
        missed = self._summary()
        return SendResult(
            message_id,
            Outcome.SENT,
            f"Sent, but {missed}." if missed else "",
            self._first_code(),
            provider_ref=final.partition(" ")[2],
            reply=final,
            recipients=self._results((RecipientStatus.DELIVERED, final), None),
        )

    def ended(self, message_id: str, failure: Failure | None, why: str = "") -> SendResult:
        """The transaction ended without the message.

        ``failure`` is what ended it (the reply after the dot, a 421 or 503, the
        connection lost before the dot); None when no recipient was accepted.
        Recipients it leaves unanswered share its fate, with ``why`` as their reply
        (the failure's reply line when the server gave one).
        """
        if failure is None:
            recipients = self._results(None, None)
            summary = _combined([f for _, f in self.answered.values()])
        else:
            words = why or failure.reply
            fate = (_status(failure), words)
            recipients = self._results(fate, (RecipientStatus.DEFERRED, words))
            summary = self._with_answered(failure)
        causes = [f for _, f in self.answered.values()] + ([failure] if failure else [])
        outcome = _unsent_outcome(recipients, causes)
        result = replace(summary, outcome=outcome).result(message_id)
        return replace(result, recipients=recipients)

    def lost(self, message_id: str, failure: Failure) -> SendResult:
        """The connection was lost after the final dot: nobody knows for the accepted
        recipients, so they are left out (they share the message's ``ambiguous``)."""
        result = self._with_answered(failure).result(message_id)
        return replace(result, recipients=self._results(None, None))

    # --- helpers ---------------------------------------------------------------------------

    def _results(
        self, accepted: _Fate | None, unreached: _Fate | None
    ) -> tuple[RecipientResult, ...]:
        """Every recipient whose fate is known, in envelope order."""
        found: list[RecipientResult] = []
        for rcpt, name in self.names.items():
            fate = self._fate(rcpt, accepted, unreached)
            if fate is not None:
                found.append(RecipientResult(name, *fate))
        return tuple(found)

    def _fate(self, rcpt: str, accepted: _Fate | None, unreached: _Fate | None) -> _Fate | None:
        if rcpt in self.answered:
            status, failure = self.answered[rcpt]
            return status, failure.reply
        return accepted if rcpt in self.accepted else unreached

    def _name(self, rcpt: str) -> str:
        return self.names.get(rcpt, rcpt)

    def _summary(self) -> str:
        """Who did not get the message, and why, in the server's words."""
        parts = []
        for status, words in (
            (RecipientStatus.REFUSED, "not delivered to: {}"),
            (RecipientStatus.DEFERRED, "deferred for: {} (tried again later, for them alone)"),
        ):
            named = [
                f"{self._name(rcpt)} ({failure.reply})"
                for rcpt, (s, failure) in self.answered.items()
                if s is status
            ]
            if named:
                parts.append(words.format("; ".join(named)))
        return ", and ".join(parts)

    def _with_answered(self, failure: Failure) -> Failure:
        missed = self._summary()
        if not missed:
            return failure
        return replace(failure, detail=f"{failure.detail} Before that: {missed}.")

    def _first_code(self) -> str:
        return next((f.code for _, f in self.answered.values()), "")


def _status(failure: Failure) -> RecipientStatus:
    """Refused only when the refusal is final and about the recipient.

    Why a refusal about the account (e.g. 5.7.64 relay denied) defers: the recipient
    must still get the message once the account's settings are fixed.
    """
    if failure.outcome is Outcome.PERMANENT:
        return RecipientStatus.REFUSED
    return RecipientStatus.DEFERRED


def _unsent_outcome(recipients: Sequence[RecipientResult], causes: Sequence[Failure]) -> Outcome:
    if any(f.outcome is Outcome.CONFIGURATION for f in causes):
        return Outcome.CONFIGURATION
    if any(f.outcome is Outcome.THROTTLED for f in causes):
        return Outcome.THROTTLED  # the mailbox waits; nobody was refused for good
    if any(r.status is RecipientStatus.DEFERRED for r in recipients):
        return Outcome.TEMPORARY
    return Outcome.PERMANENT


def _combined(failures: Sequence[Failure]) -> Failure:
    """Every recipient answered on its own: their reasons in one failure."""
    unique = list(dict.fromkeys(failures))
    return Failure(
        unique[0].outcome,
        " ".join(f.detail for f in unique),
        " ".join(dict.fromkeys(f.fix for f in unique if f.fix)),
        unique[0].code,
        unique[0].reply,
    )
