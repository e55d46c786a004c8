"""Exchange transport: EWS with OAuth app-only tokens (msal) or on-premises passwords.

Registered through the ``crm_core`` entry-point group as ``exchange_mail``; product
lines enable it with ``plugins = ["exchange_mail", ...]``. exchangelib is imported
when a mail is first sent, tested or reconciled, and msal when a token is first
needed; product lines that do not enable the plugin never load either.
"""

from exchange_mail.plugin import (
    check_settings,
    describe_route,
    mailbox_limits,
    message_problems,
    reconcile_mail,
    register_settings,
    register_transports,
    send_mail,
    sending_problems,
    system_settings_changed,
    test_connection,
    user_settings_changed,
)

__all__ = [
    "check_settings",
    "describe_route",
    "mailbox_limits",
    "message_problems",
    "reconcile_mail",
    "register_settings",
    "register_transports",
    "send_mail",
    "sending_problems",
    "system_settings_changed",
    "test_connection",
    "user_settings_changed",
]
