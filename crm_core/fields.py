"""Declarations of settings fields, made by plugins and by the core.

A plugin declares the fields it needs (key, scope, type, required, secret, validator)
through the ``register_settings`` hook; the core stores, validates and masks them
without knowing the plugin.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum

from crm_core.errors import SettingValueError

Validator = Callable[[str], str]
"""Takes the trimmed text, returns the normalised text or raises SettingValueError."""


class Scope(StrEnum):
    """Where a field lives: the installation (system) or each user."""

    SYSTEM = "system"
    USER = "user"


class FieldType(StrEnum):
    """How a field's text is parsed and shown."""

    TEXT = "text"
    INT = "int"
    BOOL = "bool"
    CHOICE = "choice"
    DATE = "date"
    SECRET = "secret"


@dataclass(frozen=True)
class SettingField:
    """One setting a plugin (or the core) needs.

    ``required_for`` names the transport for which the field must be set before a
    user can send (empty: never required). ``secret`` fields are encrypted at rest
    and never shown again. ``validator`` normalises or refuses the text on save.
    ``user_override`` marks a system field that a user may override per user.

    ``bound_to`` (secrets only) names the settings that decide where the secret is
    sent (a server, an authority, the trusted CA). The secret is bound to the values
    they had when it was saved: when any of them changes, the secret is no longer
    handed to a transport until it is entered again, so that whoever may change a
    server name cannot have a stored password or client secret sent to their own.

    ``multiline`` marks a value that is a file's content (a PEM, a PFX): read whole
    from standard input, a binary file base64-encoded.
    """

    key: str
    scope: Scope
    label: str
    type: FieldType = FieldType.TEXT
    help: str = ""
    required_for: str = ""
    choices: tuple[str, ...] = ()
    default: str | None = None
    validator: Validator | None = None
    plugin: str = ""
    user_override: bool = False
    bound_to: tuple[str, ...] = ()
    multiline: bool = False

    @property
    def secret(self) -> bool:
        """True when the value is encrypted at rest and never shown."""
        return self.type is FieldType.SECRET


@dataclass(frozen=True)
class SettingNotice:
    """A note, warning or error about saved settings, e.g. a secret that expires soon.

    A note says what the settings amount to (e.g. which API an ``auto`` choice
    picked); it asks for nothing.
    """

    key: str
    level: str  # "note" | "warning" | "error"
    message: str


_TRUE = {"1", "true", "yes", "on", "y", "ja"}
_FALSE = {"0", "false", "no", "off", "n", "nej"}


def parse_value(spec: SettingField, text: str) -> str | int | bool | date:
    """Parse ``text`` per the field type (after the field's own validator)."""
    if spec.type is FieldType.INT:
        try:
            return int(text)
        except ValueError:
            raise SettingValueError(spec.key, f"{text!r} is not a whole number") from None
    if spec.type is FieldType.BOOL:
        lowered = text.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise SettingValueError(spec.key, f"{text!r} is not yes/no (use true or false)")
    if spec.type is FieldType.DATE:
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise SettingValueError(
                spec.key, f"{text!r} is not a date; write it as YYYY-MM-DD"
            ) from None
    if spec.type is FieldType.CHOICE and text not in spec.choices:
        raise SettingValueError(spec.key, f"{text!r} is not one of: {', '.join(spec.choices)}")
    return text


def validate_text(spec: SettingField, raw: str) -> str:
    """Trim, run the field's validator, and check the type; return the stored text."""
    text = raw.strip()
    if spec.validator is not None and text:
        text = spec.validator(text)
    if text:
        parse_value(spec, text)
    return text


def set_command(email: str, key: str, scope: Scope, value: str = "") -> str:
    """The ``crm`` command that saves ``key`` (for the user ``email``), ready to type.

    Why a helper: every fix hint must be a command that works when typed, with the
    user's own address in it. Without a value, ``crm … set`` asks for it (hidden for
    a secret); an installation-wide check has no user and says ``EMAIL``.
    """
    tail = f"{key} {shlex.quote(value)}" if value else key
    if scope is Scope.SYSTEM:
        return f"crm settings set {tail}"
    return f"crm users set {shlex.quote(email) if email else 'EMAIL'} {tail}"


def by_key(fields: Sequence[SettingField]) -> dict[str, SettingField]:
    """Index fields by key (duplicates were refused at registration)."""
    return {f.key: f for f in fields}
