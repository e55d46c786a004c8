"""Address validation shared by every transport.

Why here and not in each transport: the guide's "Error validating e-mail" must be the
same whichever way the mail leaves, and it must say *which* address is wrong and *why*
(an extra space, an invalid character, a missing domain), before anything is queued.

Addresses are normalised: surrounding whitespace trimmed, Unicode normalised (NFC),
the domain converted to its IDNA form for transports that need ASCII.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

import email_validator
import idna

from crm_core.errors import MailValidationError, Problem

_FORBIDDEN_HEADER_CHARS = ("\r", "\n", "\x00")


@dataclass(frozen=True)
class Address:
    """A validated mailbox: display name plus normalised address."""

    email: str
    name: str = ""

    @property
    def domain(self) -> str:
        """The domain part, as written (Unicode)."""
        return self.email.rpartition("@")[2]

    @property
    def ascii_email(self) -> str | None:
        """The address with an IDNA domain, or None if the local part is not ASCII."""
        local, _, domain = self.email.rpartition("@")
        if not local.isascii():
            return None
        return f"{local}@{ascii_domain(domain)}"

    @property
    def needs_smtputf8(self) -> bool:
        """True when the local part is not ASCII (the server must offer SMTPUTF8)."""
        return self.ascii_email is None

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>" if self.name else self.email


@functools.lru_cache(maxsize=4096)
def ascii_domain(domain: str) -> str:
    """The IDNA 2008 (UTS #46) ASCII form of ``domain``, as mail servers expect.

    Cached: a pure function of the text, asked several times for every message sent
    (envelope, headers, Message-ID), and idna's encoder showed in the profile.
    Errors are not cached, so a bad domain raises every time.
    """
    return idna.encode(domain, uts46=True).decode("ascii")


def explain_address(raw: str) -> str | None:
    """Why ``raw`` is not a usable address, in plain words, or None if it is fine."""
    text = raw.strip()
    if not text:
        return "the address is empty"
    if any(ch.isspace() for ch in text):
        return "it contains a space or other blank inside the address; remove it"
    if "@" not in text:
        return "it has no @ and domain (write it as name@example.com)"
    local, _, domain = text.rpartition("@")
    if not local:
        return "the part before the @ is missing"
    if not domain:
        return "the domain after the @ is missing"
    if "." not in domain:
        return f"the domain {domain!r} has no dot (e.g. example.com)"
    try:
        email_validator.validate_email(text, check_deliverability=False, allow_smtputf8=True)
    except email_validator.EmailNotValidError as exc:
        return _plain_reason(str(exc))
    return None


def _plain_reason(library_message: str) -> str:
    """Keep email-validator's precise message but make it read as advice."""
    message = library_message.rstrip(".")
    if "invalid character" in message.lower() or "not allowed" in message.lower():
        return f"{message}; remove or replace the character"
    return message


def parse_address(raw: str, name: str = "") -> Address:
    """Validate and normalise one address, or raise MailValidationError for it."""
    reason = explain_address(raw)
    if reason is not None:
        raise MailValidationError([Problem(repr(raw), reason)])
    check_header_text(name, "display name")
    normalised = email_validator.validate_email(
        raw.strip(), check_deliverability=False, allow_smtputf8=True
    ).normalized
    return Address(unicodedata.normalize("NFC", normalised), unicodedata.normalize("NFC", name))


def validate_addresses(raws: Iterable[str], field: str) -> tuple[list[Address], list[Problem]]:
    """Validate many addresses; return the good ones and one Problem per bad one."""
    good: list[Address] = []
    problems: list[Problem] = []
    for raw in raws:
        reason = explain_address(raw)
        if reason is not None:
            problems.append(Problem(f"{field} {raw!r}", reason))
            continue
        good.append(parse_address(raw))
    return good, problems


def header_problem(text: str, what: str) -> Problem | None:
    """A Problem if ``text`` could inject a header (CR, LF or NUL), else None."""
    if any(ch in text for ch in _FORBIDDEN_HEADER_CHARS):
        return Problem(what, "contains a line break; it must be on one line")
    return None


def check_header_text(text: str, what: str) -> None:
    """Raise MailValidationError if ``text`` could inject a header."""
    problem = header_problem(text, what)
    if problem is not None:
        raise MailValidationError([problem])
