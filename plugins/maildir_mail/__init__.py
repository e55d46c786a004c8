"""Development transport: writes each message into a Maildir folder.

A core-only plugin, registered through the ``crm_core`` entry-point group like the real
transports, so that a plugin author has a complete worked example, and a mail can land
without any server (``make run`` sends through SMTP to its local mail catcher instead).
Enable it per product line with ``plugins = ["maildir_mail"]`` and
``default_transport = "maildir"``.
"""

from maildir_mail.plugin import (
    check_settings,
    describe_route,
    reconcile_mail,
    register_settings,
    register_transports,
    send_mail,
    test_connection,
)

__all__ = [
    "check_settings",
    "describe_route",
    "reconcile_mail",
    "register_settings",
    "register_transports",
    "send_mail",
    "test_connection",
]
