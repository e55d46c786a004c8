"""System and per-user settings: stored, validated and masked for any plugin's fields.

The core does not know what ``exchange.client_secret`` means; it knows the field was
declared secret, so it encrypts it, never returns it, and shows only whether it is
saved, when, and a short fingerprint. Saving an empty value for a secret keeps the
stored one: a form that shows a masked secret must never overwrite it with the mask.

A secret is bound to its destination: the values, at the save, of the settings its
field names in ``bound_to`` (for an SMTP password: the server, port and encryption).
When one of them changes, the secret is withheld (a transport sees no value) until it
is entered again for the new destination, and every read path says so ("re-enter").
Rows saved before bindings existed are bound to the destination in effect the first
time this code writes settings (``crm init`` does it when it upgrades the schema).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from crm_core.errors import SettingValueError
from crm_core.fields import FieldType, Scope, SettingField, parse_value, validate_text
from crm_core.keyring import KeyRing
from crm_core.mail.addresses import ALLOW_PRIVATE_DOMAINS
from crm_core.mail.policy import db_now
from crm_core.mail.transport import SettingValue
from crm_core.models import SystemSetting, User, UserSetting

SAVED = "saved"
NOT_SET = "not set"
REENTER = "re-enter"
"""A secret's state when a setting of its destination changed since it was saved."""

Row = SystemSetting | UserSetting
Text = Callable[[str], str | None]
"""A setting's stored text as it applies (the user's override, the system's, the
default), by key: what a secret's destination is made of."""
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
    state: str  # "saved" / "re-enter" / "not set" for secrets; "set" / "default" / "not set"
    updated_at: datetime | None
    fingerprint: str | None
    required_for: str
    help: str
    reenter_because: tuple[str, ...] = ()
    """For state "re-enter": the destination settings that changed since the save."""

    @property
    def reenter_words(self) -> str:
        """What a screen says of a secret that must be entered again, and why."""
        changed = ", ".join(self.reenter_because)
        return (
            f"must be entered again: {changed} changed since it was saved, and it is only "
            "sent where it was saved for"
        )

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
            "reenter_because": list(self.reenter_because) or None,
        }


@dataclass(frozen=True)
class Resolved:
    """One account's settings as a transport may see them.

    ``system`` and ``user`` hold typed values with defaults applied; a secret that is
    withheld is absent from them, and named in ``reenter`` (with the destination
    settings that changed) or ``unreadable`` (no key of this process decrypts it).
    """

    system: dict[str, SettingValue]
    user: dict[str, SettingValue]
    reenter: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unreadable: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SaveOutcome:
    """What a save did: ``changed`` False when the value was already stored (or kept)."""

    key: str
    changed: bool
    kept_secret: bool = False
    reenter: tuple[str, ...] = ()
    """Secrets this save changed the destination of: they must be entered again."""


class SettingsStore:
    """Reads and writes settings rows for declared fields; takes the caller's session."""

    def __init__(self, fields: Mapping[str, SettingField], keys: KeyRing) -> None:
        self.fields = fields
        self.keys = keys

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
        self.bind_unbound(session)
        row = session.get(SystemSetting, key)
        text = self._text(session, None)
        return self._save(session, spec, raw, row, lambda: SystemSetting(key=key), text)

    def set_user(self, session: Session, user: User, key: str, raw: str) -> SaveOutcome:
        """Validate and save a per-user setting (empty secret keeps the stored one)."""
        spec = self.field(key, Scope.USER)
        self.bind_unbound(session)
        row = session.get(UserSetting, (user.id, key))
        text = self._text(session, user.id)
        make = lambda: UserSetting(user_id=user.id, key=key)  # noqa: E731
        return self._save(session, spec, raw, row, make, text)

    def unset_system(self, session: Session, key: str) -> bool:
        """Remove a system setting; True if one was stored."""
        self.field(key, Scope.SYSTEM)
        self.bind_unbound(session)
        result = session.execute(delete(SystemSetting).where(SystemSetting.key == key))
        return bool(getattr(result, "rowcount", 0))

    def unset_user(self, session: Session, user: User, key: str) -> bool:
        """Remove a per-user setting; True if one was stored."""
        self.field(key, Scope.USER)
        self.bind_unbound(session)
        result = session.execute(
            delete(UserSetting).where(UserSetting.user_id == user.id, UserSetting.key == key)
        )
        return bool(getattr(result, "rowcount", 0))

    def _save(
        self,
        session: Session,
        spec: SettingField,
        raw: str,
        row: Row | None,
        make_row: Callable[[], Row],
        text: Text,
    ) -> SaveOutcome:
        bound: dict[str, Any] | None = None
        if spec.secret:
            if not raw.strip():
                return SaveOutcome(spec.key, changed=False, kept_secret=row is not None)
            value = raw.strip()
            if spec.validator is not None:
                value = spec.validator(value)
            box = self.keys.box_for(session, writing=True)  # waits for a rotation
            fingerprint = box.fingerprint(value)
            bound = self.destination(spec, text)
            if row is not None and row.fingerprint == fingerprint and row.bound_to == bound:
                return SaveOutcome(spec.key, changed=False)
            stored = box.encrypt(value)
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
        row.bound_to = bound
        row.updated_at = now
        session.flush()
        return SaveOutcome(spec.key, changed=True)

    # --- where a secret goes -------------------------------------------------------

    def destination(self, spec: SettingField, text: Text) -> dict[str, Any]:
        """The values of the settings that decide where ``spec``'s secret is sent."""
        return {key: text(key) for key in spec.bound_to}

    def moved(self, spec: SettingField, row: Row, text: Text) -> tuple[str, ...]:
        """The destination settings whose value differs from the one the secret was
        saved for (empty: it may be sent). A key the binding does not hold yet (a row
        saved before it was declared) is not counted: :meth:`bind_unbound` adds it."""
        saved = row.bound_to or {}
        now = self.destination(spec, text)
        return tuple(key for key in spec.bound_to if key in saved and saved[key] != now[key])

    def bind_unbound(self, session: Session) -> int:
        """Bind secrets saved without (part of) a binding to the destination in effect.

        Rows saved before bindings existed, or before their field named one of its
        destination settings, keep working where they were; this pins that place, so
        that a change from now on is noticed. Runs before every save and at ``crm
        init``; returns how many rows it bound.
        """
        rows: list[Row] = [
            *session.scalars(select(SystemSetting).where(SystemSetting.secret.is_(True))),
            *session.scalars(select(UserSetting).where(UserSetting.secret.is_(True))),
        ]
        bound = 0
        for row in rows:
            spec = self.fields.get(row.key)
            saved = row.bound_to or {}
            if spec is None or all(key in saved for key in spec.bound_to):
                continue
            user_id = row.user_id if isinstance(row, UserSetting) else None
            now = self.destination(spec, self._text(session, user_id))
            row.bound_to = {**now, **saved}
            bound += 1
        if bound:
            session.flush()
        return bound

    def _text(self, session: Session, user_id: int | None) -> Text:
        """Stored text by key as it applies to ``user_id`` (None: the installation)."""
        system = {r.key: r.value for r in session.scalars(select(SystemSetting))}
        user: dict[str, str] = {}
        if user_id is not None:
            query = select(UserSetting).where(UserSetting.user_id == user_id)
            user = {r.key: r.value for r in session.scalars(query)}
        return self._lookup(system, user)

    def _lookup(self, system: Mapping[str, str], user: Mapping[str, str]) -> Text:
        def text(key: str) -> str | None:
            if key in user:
                return user[key]
            if key in system:
                return system[key]
            spec = self.fields.get(key)
            return spec.default if spec is not None else None

        return text

    # --- reading ---------------------------------------------------------------

    def resolve(self, session: Session, user_id: int | None = None) -> Resolved:
        """Typed values of the installation and (given ``user_id``) of one user, with
        defaults; secrets masked, and withheld when their destination changed or no key
        here decrypts them."""
        system_rows = _rows(session.scalars(select(SystemSetting)))
        user_rows: dict[str, Row] = {}
        if user_id is not None:
            query = select(UserSetting).where(UserSetting.user_id == user_id)
            user_rows = _rows(session.scalars(query))
        text = self._lookup(
            {k: r.value for k, r in system_rows.items()},
            {k: r.value for k, r in user_rows.items()},
        )
        reading = _Reading(self, session, text)
        system = reading.values(system_rows, Scope.SYSTEM)
        user = reading.values(user_rows, Scope.USER) if user_id is not None else {}
        if reading.unreadable:
            who = "the installation" if user_id is None else f"user #{user_id}"
            self.keys.report_unreadable(f"{key} of {who}" for key in reading.unreadable)
        return Resolved(system, user, reading.reenter, frozenset(reading.unreadable))

    def system_values(self, session: Session) -> dict[str, SettingValue]:
        """Every stored system setting as typed values (secrets as masked Secret)."""
        return self.resolve(session).system

    def user_values(self, session: Session, user_id: int) -> dict[str, SettingValue]:
        """Every stored setting of one user as typed values (secrets as masked Secret)."""
        return self.resolve(session, user_id).user

    def unreadable_secrets(self, session: Session) -> list[str]:
        """Every stored secret no key of this process decrypts ("key of who"), for
        ``crm check``: an installation-wide error, not any one account's."""
        found = [
            f"{row.key} (system setting)"
            for row in session.scalars(select(SystemSetting).where(SystemSetting.secret.is_(True)))
            if self.keys.decrypt(session, row.value) is None
        ]
        users = select(UserSetting, User.email).join(User, User.id == UserSetting.user_id)
        for row, email in session.execute(users.where(UserSetting.secret.is_(True))):
            if self.keys.decrypt(session, row.value) is None:
                found.append(f"{row.key} of {email}")
        return found

    def describe_system(self, session: Session) -> list[SettingView]:
        """Masked views of every system field, stored or not."""
        rows = _rows(session.scalars(select(SystemSetting)))
        text = self._lookup({k: r.value for k, r in rows.items()}, {})
        specs = [f for f in self.fields.values() if f.scope is Scope.SYSTEM]
        return [self._view(spec, rows.get(spec.key), text) for spec in _sorted(specs)]

    def describe_user(self, session: Session, user: User) -> list[SettingView]:
        """Masked views of every per-user field (and overridable system field) set."""
        query = select(UserSetting).where(UserSetting.user_id == user.id)
        rows = _rows(session.scalars(query))
        system = {r.key: r.value for r in session.scalars(select(SystemSetting))}
        text = self._lookup(system, {k: r.value for k, r in rows.items()})
        specs = [
            f
            for f in self.fields.values()
            if f.scope is Scope.USER or (f.user_override and f.key in rows)
        ]
        return [self._view(spec, rows.get(spec.key), text) for spec in _sorted(specs)]

    def _view(self, spec: SettingField, row: Row | None, text: Text) -> SettingView:
        moved = self.moved(spec, row, text) if spec.secret and row is not None else ()
        return _view(spec, row, moved)


class _Reading:
    """One read of settings rows: what was withheld, and why."""

    def __init__(self, store: SettingsStore, session: Session, text: Text) -> None:
        self.store = store
        self.session = session
        self.text = text
        self.reenter: dict[str, tuple[str, ...]] = {}
        self.unreadable: list[str] = []

    def values(self, rows: Mapping[str, Row], scope: Scope) -> dict[str, SettingValue]:
        """Typed values of ``rows`` plus the defaults of ``scope``'s fields."""
        values: dict[str, SettingValue] = {}
        for key, row in rows.items():
            spec = self.store.fields.get(key)
            if spec is None:
                continue
            value = self._value(spec, row)
            if value is not None:
                values[key] = value
        for key, spec in self.store.fields.items():
            if spec.scope is scope and key not in values and spec.default is not None:
                values[key] = parse_value(spec, spec.default)
        return values

    def _value(self, spec: SettingField, row: Row) -> SettingValue | None:
        if not row.secret:
            return parse_value(spec, row.value)
        moved = self.store.moved(spec, row, self.text)
        if moved:
            self.reenter[spec.key] = moved
            return None
        secret = self.store.keys.decrypt(self.session, row.value)
        if secret is None:
            self.unreadable.append(spec.key)
        return secret


def _rows(rows: Iterable[Row]) -> dict[str, Row]:
    return {r.key: r for r in rows}


def _sorted(specs: list[SettingField]) -> list[SettingField]:
    return sorted(specs, key=lambda f: f.key)


def _overridable(spec: SettingField, scope: Scope) -> bool:
    return scope is Scope.USER and spec.scope is Scope.SYSTEM and spec.user_override


def _view(spec: SettingField, row: Row | None, moved: tuple[str, ...] = ()) -> SettingView:
    if spec.secret:
        return SettingView(
            key=spec.key,
            label=spec.label,
            scope=spec.scope.value,
            type=spec.type.value,
            value=None,
            state=(REENTER if moved else SAVED) if row else NOT_SET,
            updated_at=row.updated_at if row else None,
            fingerprint=row.fingerprint if row else None,
            required_for=spec.required_for,
            help=spec.help,
            reenter_because=moved,
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
                "How many connections (SMTP) or requests (Exchange) one mailbox has open at "
                "once, across all workers; one SMTP batch opens up to this many (at most 10).",
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
