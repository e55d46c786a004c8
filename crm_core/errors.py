"""The one tree of errors that crm_core and its plugins raise.

Third-party errors (SQLAlchemy, smtplib, exchangelib, msal, ...) are translated at the
boundary into these, with ``raise ... from exc``, so callers catch one documented tree::

    CrmError
    ├── ConfigError                 crm.toml or environment is wrong; start-up stops
    │   └── DatabaseError           the database is missing, unreachable, foreign or too new
    ├── PluginError                 a plugin is missing, broken or returned the wrong type
    ├── NotFoundError               a user, person or outbox message does not exist
    ├── ValidationError             input refused; nothing was written
    │   ├── SettingValueError       one setting's value is refused (names key and fix)
    │   └── MailValidationError     a mail cannot be queued ("Error validating e-mail")
    ├── SecretKeyError              the secret key is missing or cannot decrypt a value
    ├── TokenError                  Entra ID refused or could not answer a token request
    └── TransportError              a transport failed; carries the outbox classification
        (outcome: an :class:`Outcome`, temporary | permanent | configuration | ambiguous)

Every message is written for the person who can fix the problem, and never contains a
secret value: secrets are held in :class:`crm_core.secret_box.Secret`, whose ``repr`` and
``str`` are masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from crm_core.outcome import Outcome


class CrmError(Exception):
    """Base of every error crm_core raises on purpose."""


class ConfigError(CrmError):
    """The configuration file or environment is invalid; names the file and key."""


class DatabaseError(ConfigError):
    """The database cannot be used as it is; says what to do (often: run ``crm init``)."""


class PluginError(CrmError):
    """A plugin could not be loaded, or broke its hook contract."""


class NotFoundError(CrmError):
    """A user, person, setting or outbox message that was asked for does not exist."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong: which setting or value (``key``), why, and what to do.

    The one type for every "what is wrong" answer: refused input, and what stops an
    account from sending (claim, dry run, Test connection, ``crm check``, saving a
    setting). ``fix`` is a command or an action that works as written, e.g.
    ``crm users set anna@contoso.se exchange.sync true``. ``also`` names other keys
    whose save can cause the same problem, so that saving any of them is refused.
    """

    key: str
    message: str
    fix: str = ""
    also: tuple[str, ...] = ()

    def concerns(self, key: str) -> bool:
        """True when saving ``key`` can cause (or cure) this problem."""
        return key == self.key or key in self.also

    def __str__(self) -> str:
        text = f"{self.key}: {self.message}" if self.key else self.message
        return f"{text} (fix: {self.fix})" if self.fix else text

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return {"key": self.key, "message": self.message, "fix": self.fix}


class ValidationError(CrmError):
    """Input refused before anything was written; lists every problem found."""

    def __init__(self, summary: str, problems: Sequence[Problem] = ()) -> None:
        self.summary = summary
        self.problems = tuple(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.problems:
            return self.summary
        lines = [self.summary] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class SettingValueError(ValidationError):
    """A setting's value is refused; the message says what to enter instead."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"Invalid value for {key}: {message}")


class InputFileError(ValidationError):
    """A file given on the command line was refused (not a regular file, too large)."""


class MailValidationError(ValidationError):
    """A mail was refused at enqueue; the guide's "Error validating e-mail" and why."""

    GUIDE_TEXT = "Error validating e-mail"

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(self.GUIDE_TEXT, problems)


class SecretKeyError(CrmError):
    """The secret key is missing, malformed, or does not decrypt a stored secret."""


class TransportError(CrmError):
    """A transport failed for a whole batch; ``outcome`` classifies it for the outbox.

    Plugins normally return one :class:`crm_core.mail.transport.SendResult` per
    message; they raise this only when nothing could be attempted at all (for example
    the settings are incomplete), so every message gets the same outcome.
    """

    def __init__(self, outcome: Outcome | str, message: str, code: str = "") -> None:
        self.outcome = _outcome(outcome)
        self.code = code
        super().__init__(message)


class TokenError(CrmError):
    """Entra ID refused or could not answer a token request.

    ``message`` says what is wrong in the guide's terms and ``fix`` what to do;
    ``codes`` are Entra's ``error_codes`` (AADSTS numbers); ``outcome`` is
    ``configuration`` for wrong or expired credentials, ``temporary`` for throttling,
    outages and network failures.
    """

    def __init__(
        self,
        message: str,
        fix: str,
        codes: tuple[int, ...] = (),
        error: str = "",
        outcome: Outcome = Outcome.CONFIGURATION,
        correlation_id: str = "",
    ) -> None:
        self.message = message
        self.fix = fix
        self.codes = codes
        self.error = error
        self.outcome = outcome
        self.correlation_id = correlation_id
        super().__init__(f"{message} {fix}".strip())

    @property
    def code(self) -> str:
        """The first AADSTS code, e.g. "AADSTS7000215", or the OAuth error name."""
        return f"AADSTS{self.codes[0]}" if self.codes else self.error


def _outcome(value: Outcome | str) -> Outcome:
    """An outcome by value; an unrecognised one counts as ambiguous (the safe reading)."""
    try:
        return Outcome(value)
    except ValueError:
        return Outcome.AMBIGUOUS
