"""System and per-user settings: stored, validated and masked for any plugin's fields.

The core does not know what ``exchange.client_secret`` means; it knows the field was
declared secret, so it encrypts it, never returns it, and shows only whether it is
saved, when, and a short fingerprint. Saving an empty value for a secret keeps the
stored one: a form that shows a masked secret must never overwrite it with the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from crm_core.errors import SettingValueError
from crm_core.fields import FieldType, Scope, SettingField, parse_value, validate_text
from crm_core.mail.addresses import ALLOW_PRIVATE_DOMAINS
from crm_core.mail.policy import db_now
from crm_core.mail.transport import SettingValue
from crm_core.models import SystemSetting, User, UserSetting
from crm_core.secret_box import SecretBox

SAVED = "saved"
NOT_SET = "not set"
TRANSPORT_KEY = "mail.transport"
RATE_PER_MINUTE = "mail.rate_per_minute"
RECIPIENTS_PER_DAY = "mail.recipients_per_day"
MAX_CONNECTIONS = "mail.max_connections"
"""The user's choice of transport (else the product line's default)."""


@dataclass(frozen=True)
class SettingView:
    """What a read path may show of a setting: never a secret's value."""

    key: str
    label: str
    scope: str
    type: str
    value: str | None
    state: str  # "saved" / "not set" for secrets; "set" / "default" / "not set" otherwise
    updated_at: datetime | None
    fingerprint: str | None
    required_for: str
    help: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form (secrets carry state and fingerprint, never a value)."""
        return {
            "key": self.key,
            "label": self.label,
            "scope": self.scope,
            "type": self.type,
            "value": self.value,
            "state": self.state,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
            "fingerprint": self.fingerprint,
            "required_for": self.required_for or None,
        }


@dataclass(frozen=True)
class SaveOutcome:
    """What a save did: ``changed`` False when the value was already stored (or kept)."""

    key: str
    changed: bool
    kept_secret: bool = False


class SettingsStore:
    """Reads and writes settings rows for declared fields; takes the caller's session."""

    def __init__(self, fields: Mapping[str, SettingField], box: SecretBox) -> None:
        self.fields = fields
        self.box = box

    def field(self, key: str, scope: Scope) -> SettingField:
        """The declared field, or a clear error listing the keys of that scope."""
        spec = self.fields.get(key)
        if spec is None or (spec.scope is not scope and not _overridable(spec, scope)):
            known = sorted(
                k for k, f in self.fields.items() if f.scope is scope or _overridable(f, scope)
            )
            raise SettingValueError(
                key, f"no such {scope.value} setting; known keys: {', '.join(known)}"
            )
        return spec

    # --- writing ---------------------------------------------------------------

    def set_system(self, session: Session, key: str, raw: str) -> SaveOutcome:
        """Validate and save a system setting (empty secret keeps the stored one)."""
        spec = self.field(key, Scope.SYSTEM)
        row = session.get(SystemSetting, key)
        return self._save(session, spec, raw, row, lambda: SystemSetting(key=key))

    def set_user(self, session: Session, user: User, key: str, raw: str) -> SaveOutcome:
        """Validate and save a per-user setting (empty secret keeps the stored one)."""
        spec = self.field(key, Scope.USER)
        row = session.get(UserSetting, (user.id, key))
        return self._save(session, spec, raw, row, lambda: UserSetting(user_id=user.id, key=key))

    def unset_system(self, session: Session, key: str) -> bool:
        """Remove a system setting; True if one was stored."""
        self.field(key, Scope.SYSTEM)
        result = session.execute(delete(SystemSetting).where(SystemSetting.key == key))
        return bool(getattr(result, "rowcount", 0))

    def unset_user(self, session: Session, user: User, key: str) -> bool:
        """Remove a per-user setting; True if one was stored."""
        self.field(key, Scope.USER)
        result = session.execute(
            delete(UserSetting).where(UserSetting.user_id == user.id, UserSetting.key == key)
        )
        return bool(getattr(result, "rowcount", 0))

    def _save(
        self,
        session: Session,
        spec: SettingField,
        raw: str,
        row: SystemSetting | UserSetting | None,
        make_row: Callable[[], SystemSetting | UserSetting],
    ) -> SaveOutcome:
        if spec.secret:
            if not raw.strip():
                return SaveOutcome(spec.key, changed=False, kept_secret=row is not None)
            value = raw.strip()
            if spec.validator is not None:
                value = spec.validator(value)
            fingerprint = self.box.fingerprint(value)
            if row is not None and row.fingerprint == fingerprint:
                return SaveOutcome(spec.key, changed=False)
            stored = self.box.encrypt(value)
        else:
            stored = validate_text(spec, raw)
            fingerprint = None
            if not stored:
                raise SettingValueError(
                    spec.key, "an empty value is not allowed here; use `unset` to remove it"
                )
            if row is not None and row.value == stored:
                return SaveOutcome(spec.key, changed=False)
        now = db_now(session)  # compared with pauses' paused_at: the one clock
        if row is None:
            row = make_row()
            session.add(row)
        row.value = stored
        row.secret = spec.secret
        row.fingerprint = fingerprint
        row.updated_at = now
        session.flush()
        return SaveOutcome(spec.key, changed=True)

    # --- reading ---------------------------------------------------------------

    def system_values(self, session: Session) -> dict[str, SettingValue]:
        """Every stored system setting as typed values (secrets as masked Secret)."""
        rows = session.scalars(select(SystemSetting)).all()
        values = {
            r.key: self._typed(r.key, r.value, r.secret) for r in rows if r.key in self.fields
        }
        for key, spec in self.fields.items():
            if spec.scope is Scope.SYSTEM and key not in values and spec.default is not None:
                values[key] = parse_value(spec, spec.default)
        return values

    def user_values(self, session: Session, user_id: int) -> dict[str, SettingValue]:
        """Every stored setting of one user as typed values (secrets as masked Secret)."""
        rows = session.scalars(select(UserSetting).where(UserSetting.user_id == user_id)).all()
        values = {
            r.key: self._typed(r.key, r.value, r.secret) for r in rows if r.key in self.fields
        }
        for key, spec in self.fields.items():
            if spec.scope is Scope.USER and key not in values and spec.default is not None:
                values[key] = parse_value(spec, spec.default)
        return values

    def _typed(self, key: str, stored: str, secret: bool) -> SettingValue:
        if secret:
            return self.box.decrypt(stored)
        return parse_value(self.fields[key], stored)

    def describe_system(self, session: Session) -> list[SettingView]:
        """Masked views of every system field, stored or not."""
        rows = {r.key: r for r in session.scalars(select(SystemSetting))}
        specs = [f for f in self.fields.values() if f.scope is Scope.SYSTEM]
        return [_view(spec, rows.get(spec.key)) for spec in sorted(specs, key=lambda f: f.key)]

    def describe_user(self, session: Session, user: User) -> list[SettingView]:
        """Masked views of every per-user field (and overridable system field) set."""
        rows = {
            r.key: r
            for r in session.scalars(select(UserSetting).where(UserSetting.user_id == user.id))
        }
        specs = [
            f
            for f in self.fields.values()
            if f.scope is Scope.USER or (f.user_override and f.key in rows)
        ]
        return [_view(spec, rows.get(spec.key)) for spec in sorted(specs, key=lambda f: f.key)]


def _overridable(spec: SettingField, scope: Scope) -> bool:
    return scope is Scope.USER and spec.scope is Scope.SYSTEM and spec.user_override


def _view(spec: SettingField, row: SystemSetting | UserSetting | None) -> SettingView:
    if spec.secret:
        return SettingView(
            key=spec.key,
            label=spec.label,
            scope=spec.scope.value,
            type=spec.type.value,
            value=None,
            state=SAVED if row else NOT_SET,
            updated_at=row.updated_at if row else None,
            fingerprint=row.fingerprint if row else None,
            required_for=spec.required_for,
            help=spec.help,
        )
    if row is not None:
        value, state = row.value, "set"
    elif spec.default is not None:
        value, state = spec.default, "default"
    else:
        value, state = None, NOT_SET
    return SettingView(
        key=spec.key,
        label=spec.label,
        scope=spec.scope.value,
        type=spec.type.value,
        value=value,
        state=state,
        updated_at=row.updated_at if row else None,
        fingerprint=None,
        required_for=spec.required_for,
        help=spec.help,
    )


def core_fields() -> list[SettingField]:
    """Fields the core itself owns (transport choice, private CA, private domains)."""
    return [
        SettingField(
            key=TRANSPORT_KEY,
            scope=Scope.USER,
            label="Send via",
            type=FieldType.TEXT,
            help="The transport this user's mail goes through (e.g. exchange or smtp); "
            "must be enabled for the user's product line. Defaults to the product "
            "line's default_transport.",
            plugin="crm_core",
        ),
        SettingField(
            key="tls.ca_bundle",
            scope=Scope.SYSTEM,
            label="CA bundle for TLS",
            help="PEM file of extra certificate authorities to trust (a private CA for "
            "an on-premises server). Empty: the system trust store.",
            validator=_existing_pem,
            plugin="crm_core",
        ),
        _private_domains_field(),
        *_pacing_fields(),
    ]


def _pacing_fields() -> list[SettingField]:
    """The mailbox pacing limits: a system value, overridable per user (unset: the
    transport's default for the server, e.g. Exchange Online's; 0: no limit)."""
    about = (
        " Unset: the transport's default for the server (Microsoft 365: {default}; "
        "other servers: no limit). 0: no limit. Shared by every worker."
    )
    return [
        SettingField(
            key=key,
            scope=Scope.SYSTEM,
            label=label,
            type=FieldType.INT,
            help=help_text + about.format(default=default),
            validator=_not_negative(key),
            plugin="crm_core",
            user_override=True,
        )
        for key, label, help_text, default in (
            (
                RATE_PER_MINUTE,
                "Messages per minute",
                "How many messages one mailbox sends in a rolling minute.",
                "30",
            ),
            (
                RECIPIENTS_PER_DAY,
                "Recipients per day",
                "How many recipients (To, Cc and Bcc) one mailbox sends to in a rolling 24 hours.",
                "10000",
            ),
            (
                MAX_CONNECTIONS,
                "Connections at once",
                "How many connections (SMTP) or requests (Exchange) one mailbox has open at once.",
                "3 for SMTP, 4 for Graph, 27 for EWS",
            ),
        )
    ]


def _not_negative(key: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        if not text.isdigit():
            raise SettingValueError(key, f"{text!r} is not a whole number of 0 or more")
        return str(int(text))

    return check


def _private_domains_field() -> SettingField:
    return SettingField(
        key=ALLOW_PRIVATE_DOMAINS,
        scope=Scope.SYSTEM,
        label="Allow private mail domains",
        type=FieldType.BOOL,
        default="false",
        help="Accept addresses on private and special-use domains (such as corp.local, "
        ".lan, .internal, .test, or a name without a dot) for users, persons and mail. "
        "For on-premises networks whose own mail server delivers an internal domain "
        "such as corp.local. Off, such an address is refused: from the internet it "
        "cannot be reached, so it is usually a typing mistake.",
        plugin="crm_core",
    )


def private_domains_allowed(session: Session) -> bool:
    """Whether mail.allow_private_domains is on.

    Read from its own row: the register (which has no Crm) needs it too, and every
    mail asks, where reading all system settings would decrypt every secret.
    """
    row = session.get(SystemSetting, ALLOW_PRIVATE_DOMAINS)
    return row is not None and parse_value(_private_domains_field(), row.value) is True


def _existing_pem(text: str) -> str:
    path = Path(text).expanduser()
    if not path.is_file():
        raise SettingValueError("tls.ca_bundle", f"file {text} does not exist")
    head = path.read_bytes()[:4096]
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise SettingValueError("tls.ca_bundle", f"{text} is not a PEM certificate file")
    return str(path.resolve())


def count_secrets(session: Session) -> int:
    """How many encrypted secrets the database holds (system and per-user)."""
    system = session.scalar(
        select(func.count()).select_from(SystemSetting).where(SystemSetting.secret.is_(True))
    )
    users = session.scalar(
        select(func.count()).select_from(UserSetting).where(UserSetting.secret.is_(True))
    )
    return int(system or 0) + int(users or 0)


def rotate_secrets(session: Session, box: SecretBox) -> int:
    """Re-encrypt every stored secret with ``box``'s primary key; returns how many.

    Run with the new key first and the old key(s) after it (``CRM_SECRET_KEY="new,old"``
    or both lines in the key file); afterwards the old key can be removed.
    """
    rows: list[SystemSetting | UserSetting] = [
        *session.scalars(select(SystemSetting).where(SystemSetting.secret.is_(True))),
        *session.scalars(select(UserSetting).where(UserSetting.secret.is_(True))),
    ]
    for row in rows:
        clear = box.decrypt(row.value).reveal()
        row.value = box.rotate(row.value)
        row.fingerprint = box.fingerprint(clear)
    session.flush()
    return len(rows)
