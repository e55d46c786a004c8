"""SMTP transport: sends each user's mail through an SMTP server with smtplib.

Works with the servers customers have: Microsoft 365 (smtp.office365.com:587 with
STARTTLS and OAuth XOAUTH2, since basic authentication is being switched off), Google,
a company relay, an on-premises Exchange receive connector. Enable it per product line
with ``plugins = ["smtp_mail"]``; users choose it with ``mail.transport = "smtp"``.

Modules: :mod:`~smtp_mail.settings` (fields and rules), :mod:`~smtp_mail.client` (the
session), :mod:`~smtp_mail.render` (bytes for this server), :mod:`~smtp_mail.classify`
and :mod:`~smtp_mail.hints` (what a failure means), :mod:`~smtp_mail.diagnostics`
(Test connection), :mod:`~smtp_mail.oauth` (tokens), :mod:`~smtp_mail.plugin` (hooks).
"""

from smtp_mail.plugin import (
    check_settings,
    describe_route,
    mailbox_limits,
    reconcile_mail,
    register_settings,
    register_transports,
    send_mail,
    sending_problems,
    system_settings_changed,
    test_connection,
)

__all__ = [
    "check_settings",
    "describe_route",
    "mailbox_limits",
    "reconcile_mail",
    "register_settings",
    "register_transports",
    "send_mail",
    "sending_problems",
    "system_settings_changed",
    "test_connection",
]
