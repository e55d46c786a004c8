"""Forms of plugin-declared settings: what a submitted form changes, and saving it whole.

Why a module of its own: the System settings screen and a user's E-mail tab are both
forms of fields the plugins declare, and both must save all changed fields or none.
The rules for each value stay in the core (``Crm.set_system_setting`` and friends);
this module only decides which fields the form changed and frames the transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage, MultiDict

from crm_core.cli.values import read_file_content
from crm_core.errors import SettingValueError
from crm_core.fields import FieldType, SettingField, SettingNotice, parse_value
from crm_core.settings import NOT_SET, SaveOutcome, SettingView
from crm_core.web.i18n import _


@dataclass(frozen=True)
class Change:
    """One field the form changes: its new text, or None to remove the stored value."""

    key: str
    raw: str | None
    secret: bool = False


@dataclass(frozen=True)
class Row:
    """One field as a template renders it (see the ``field`` macro in _fields.html)."""

    spec: SettingField
    view: SettingView
    typed: str | None = None
    error: str | None = None
    notices: tuple[SettingNotice, ...] = ()


@dataclass(frozen=True)
class Group:
    """Fields shown together under one heading (one plugin's, or one transport's)."""

    title: str
    rows: tuple[Row, ...]
    anchor: str = ""
    extra: tuple[Row, ...] = field(default=())


class Refused(Exception):
    """Some change was refused; nothing was saved. ``errors``: field key -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__(", ".join(sorted(self.errors)))


def submitted(form: MultiDict[str, str], key: str) -> str | None:
    """What the form sent for ``key`` (a ticked checkbox's value comes after its
    hidden "false"), or None when the form had no such field."""
    values = form.getlist(key)
    return values[-1] if values else None


def file_field(key: str) -> str:
    """The name of the file chooser beside a multiline field (a certificate's PEM or PFX)."""
    return f"{key}:file"


def submitted_value(
    form: MultiDict[str, str], files: MultiDict[str, FileStorage], spec: SettingField
) -> str | None:
    """What the form sent for ``spec``: for a multiline field a chosen file first (read
    as the command line reads standard input: text, or base64 when binary, as a PFX),
    else the text typed (with the browser's CRLF line ends made LF)."""
    if not spec.multiline:
        return submitted(form, spec.key)
    upload = files.get(file_field(spec.key))
    if upload is not None and upload.filename:
        return read_file_content(upload.read())
    text = submitted(form, spec.key)
    return text.replace("\r\n", "\n") if text is not None else None


def change_for(spec: SettingField, view: SettingView, text: str | None) -> Change | None:
    """The change ``text`` makes to the stored value, or None when it makes none.

    An empty secret keeps the saved one; an emptied field removes a stored value; a
    value equal to what is in force (stored, or the default) is no change, so a field
    the user did not touch is never saved, nor judged.
    """
    if text is None:
        return None
    if spec.secret:
        return Change(spec.key, text, secret=True) if text.strip() else None
    text = text.strip()
    if not text:
        return Change(spec.key, None) if view.state == "set" else None
    return None if _same(spec, view, text) else Change(spec.key, text)


def _same(spec: SettingField, view: SettingView, text: str) -> bool:
    current = view.value
    if current is None and spec.type is FieldType.BOOL:
        current = "false"  # an unset yes/no setting reads as no
    if current is None:
        return False
    if current == text:
        return True
    try:
        return parse_value(spec, current) == parse_value(spec, text)
    except SettingValueError:
        return False


def save_all(
    session: Session,
    changes: Sequence[Change],
    apply: Callable[[Change], SaveOutcome | None],
) -> list[SaveOutcome]:
    """Apply every change in the caller's transaction, or raise :class:`Refused`;
    what each save did.

    Why rounds: the core judges each save against what is stored at that moment (a
    save that stops sending is refused), so two changes that only make sense
    together (switch to SMTP and untick "Sync with Exchange") must not depend on
    the order of the fields. Each change runs in a savepoint; a refused one is tried
    again after the others, until a round saves nothing more. The caller rolls the
    whole transaction back when this raises.

    Secrets go last: a secret is bound to its destination (the server, the tenant) as
    it stands when the secret is saved, so a form that changes both binds it to the
    new one whatever the order of the fields.
    """
    pending = sorted(changes, key=lambda change: change.secret)
    errors: dict[str, str] = {}
    outcomes: list[SaveOutcome] = []
    while pending:
        still: list[Change] = []
        for change in pending:
            try:
                with session.begin_nested():
                    outcome = apply(change)
            except SettingValueError as exc:
                errors[change.key] = _message(exc, change)
                still.append(change)
            else:
                errors.pop(change.key, None)
                if outcome is not None:
                    outcomes.append(outcome)
        if len(still) == len(pending):
            break
        pending = still
    if errors:
        raise Refused(errors)
    return outcomes


def reentry_notes(
    outcomes: Iterable[SaveOutcome],
    changes: Iterable[Change],
    fields: Mapping[str, SettingField],
) -> list[str]:
    """What the save response says of each saved secret it withheld: a setting of the
    secret's destination changed, so it must be entered again (unless this very form
    entered it, after the change)."""
    entered = {change.key for change in changes if change.secret}
    moved: dict[str, list[str]] = {}
    for outcome in outcomes:
        for key in outcome.reenter:
            if key not in entered:
                moved.setdefault(key, []).append(outcome.key)
    return [
        _(
            "{secret} must be entered again: {changed} changed since it was saved.",
            secret=_label(key, fields),
            changed=", ".join(_label(k, fields) for k in because),
        )
        for key, because in moved.items()
    ]


def _label(key: str, fields: Mapping[str, SettingField]) -> str:
    """A setting as a person reads it: its label and its key."""
    spec = fields.get(key)
    return f"{_(spec.label)} ({key})" if spec is not None else key


def _message(exc: SettingValueError, change: Change) -> str:
    """The refusal's own words without the "Invalid value for KEY: " prefix; never the
    secret that was typed, should a plugin's validator quote it."""
    prefix = f"Invalid value for {exc.key}: "
    text = exc.summary[len(prefix) :] if exc.summary.startswith(prefix) else exc.summary
    if change.secret and change.raw and change.raw.strip():
        text = text.replace(change.raw.strip(), "…")
    return text


def unset_view(spec: SettingField) -> SettingView:
    """The view of a field nothing is stored for (a user's override not made)."""
    return SettingView(
        key=spec.key,
        label=spec.label,
        scope=spec.scope.value,
        type=spec.type.value,
        value=None,
        state=NOT_SET,
        updated_at=None,
        fingerprint=None,
        required_for=spec.required_for,
        help=spec.help,
    )


def rows(
    specs: Iterable[SettingField],
    views: Mapping[str, SettingView],
    typed: Mapping[str, str],
    errors: Mapping[str, str],
    notices: Sequence[SettingNotice],
) -> tuple[Row, ...]:
    """A row per field: its stored view, what was typed (never a secret), its message."""
    return tuple(
        Row(
            spec,
            views.get(spec.key) or unset_view(spec),
            None if spec.secret else typed.get(spec.key),
            errors.get(spec.key),
            tuple(n for n in notices if n.key == spec.key),
        )
        for spec in specs
    )


def typed_values(form: MultiDict[str, str], specs: Iterable[SettingField]) -> dict[str, str]:
    """What the user typed into each non-secret field, to show again after a refusal."""
    found: dict[str, str] = {}
    for spec in specs:
        text = submitted(form, spec.key)
        if text is not None and not spec.secret:
            found[spec.key] = text
    return found
