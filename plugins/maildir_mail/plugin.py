"""Hook implementations of the Maildir development transport."""

from __future__ import annotations

import mailbox
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from crm_core.plugin_api import (
    ConnectionReport,
    ConnectionStep,
    Outcome,
    OutgoingMessage,
    Problem,
    ReconcileResult,
    Resources,
    RouteInfo,
    Scope,
    SenderAccount,
    SendResult,
    SettingField,
    SettingNotice,
    SettingValue,
    StepStatus,
    TransportSpec,
    hookimpl,
)

TRANSPORT = "maildir"
PATH_KEY = "maildir.path"


@hookimpl
def register_transports() -> list[TransportSpec]:
    """Offer the ``maildir`` transport."""
    return [TransportSpec(TRANSPORT, "Write to a Maildir folder (development)", in_flight=1)]


@hookimpl
def register_settings() -> list[SettingField]:
    """One system setting: the Maildir folder (created when missing)."""
    return [
        SettingField(
            key=PATH_KEY,
            scope=Scope.SYSTEM,
            label="Maildir folder",
            help="Folder where the development transport writes each mail "
            "(a Maildir: new/, cur/, tmp/).",
            required_for=TRANSPORT,
            validator=_absolute,
        )
    ]


def _absolute(text: str) -> str:
    """Store an absolute path, so a worker started elsewhere writes to the same place."""
    return str(Path(text).expanduser().resolve())


@hookimpl
def check_settings(scope: Scope, system: dict[str, SettingValue]) -> list[SettingNotice]:
    """Warn when the folder exists but cannot be written."""
    raw = system.get(PATH_KEY)
    if scope is not Scope.SYSTEM or not isinstance(raw, str):
        return []
    path = Path(raw)
    if path.exists() and not os.access(path, os.W_OK):
        return [SettingNotice(PATH_KEY, "warning", f"{path} is not writable")]
    return []


def _folder(account: SenderAccount) -> Path:
    return Path(account.get_str(PATH_KEY)).expanduser()


@hookimpl
def send_mail(
    account: SenderAccount,
    messages: Sequence[OutgoingMessage],
    resources: Resources,
    report: Callable[[Sequence[SendResult]], None],
) -> list[SendResult]:
    """Write each message (with its Bcc recipients as X-Envelope-To) into the folder.

    No check that the folder is set: the core declares ``maildir.path`` required for
    this transport and never hands over a batch while a required field is missing.
    Each result is reported as soon as the file is written, in the order given, as
    the transport's ``in_flight=1`` promises.
    """
    folder = _folder(account)
    try:
        box = mailbox.Maildir(folder, create=True)
    except OSError as exc:
        return [
            SendResult(m.message_id, Outcome.CONFIGURATION, f"cannot open {folder}: {exc}")
            for m in messages
        ]
    results = []
    for message in messages:
        results.append(_write(box, message))
        report(results[-1:])
    return results


def _write(box: mailbox.Maildir, message: OutgoingMessage) -> SendResult:
    """One message into the folder; a failure to write is temporary for it alone."""
    try:
        mime = message.to_email_message()
        mime["X-Envelope-To"] = ", ".join(a.email for a in message.recipients)
        key = box.add(mime.as_bytes())
    except (OSError, ValueError) as exc:
        outcome = Outcome.TEMPORARY if isinstance(exc, OSError) else Outcome.PERMANENT
        return SendResult(message.message_id, outcome, str(exc))
    return SendResult(message.message_id, Outcome.SENT, provider_ref=key, reply=f"written {key}")


@hookimpl
def test_connection(
    account: SenderAccount, resources: Resources, problems: Sequence[Problem]
) -> ConnectionReport:
    """Check that the folder can be created and written (once it is set)."""
    if problems:
        steps = tuple(
            ConnectionStep("settings", StepStatus.FAILED, p.message, p.fix) for p in problems
        )
        return ConnectionReport(TRANSPORT, "Maildir folder is not set up", steps)
    folder = _folder(account)
    try:
        mailbox.Maildir(folder, create=True)
        writable = os.access(folder, os.W_OK)
    except OSError as exc:
        step = ConnectionStep("folder", StepStatus.FAILED, str(exc), f"fix {PATH_KEY}")
        return ConnectionReport(TRANSPORT, "Maildir folder cannot be used", (step,))
    if not writable:
        step = ConnectionStep("folder", StepStatus.FAILED, f"{folder} is not writable")
        return ConnectionReport(TRANSPORT, "Maildir folder cannot be written", (step,))
    step = ConnectionStep("folder", StepStatus.OK, f"mail is written to {folder}")
    return ConnectionReport(TRANSPORT, f"Writing to Maildir {folder}", (step,))


@hookimpl
def reconcile_mail(
    account: SenderAccount, messages: Sequence[OutgoingMessage], resources: Resources
) -> list[ReconcileResult]:
    """Look for each Message-ID in the folder: a Maildir can always tell."""
    box = mailbox.Maildir(_folder(account), create=True)
    present = {str(msg["Message-ID"]) for msg in box}
    return [
        ReconcileResult(m.message_id, m.message_id in present, "looked in the Maildir")
        for m in messages
    ]


@hookimpl
def describe_route(account: SenderAccount) -> RouteInfo:
    """Name the folder the mail would be written to."""
    return RouteInfo(TRANSPORT, server=str(_folder(account)), account=account.email)
