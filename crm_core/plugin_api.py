"""Everything a transport plugin may import from crm_core, and nothing else.

Why one module: a plugin that reaches into the core's private modules breaks whenever
the core is reorganised. Bundled plugins import only from here (a test enforces it), and
third-party plugins should do the same; what is listed in ``__all__`` keeps its name
and meaning across releases.

The token client and the TLS adapter load on first use (PEP 562): they need requests,
and a plugin's hooks module, imported by every command, should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from crm_core.entra import (
    CERTIFICATE,
    CLIENT_ID,
    CLIENT_SECRET,
    CREDENTIAL_KEYS,
    EXCHANGE_SCOPE,
    GRAPH_SCOPE,
    SECRET_EXPIRES,
    TENANT_ID,
    AppCredentials,
    credential_problems,
    credentials_for,
    entra_fields,
    expiries,
    expiry_notices,
    forget_clients,
    is_guid,
    missing_credentials,
)
from crm_core.errors import (
    ConfigError,
    CrmError,
    DatabaseError,
    MailValidationError,
    NotFoundError,
    PluginError,
    Problem,
    SecretKeyError,
    SettingValueError,
    TokenError,
    TransportError,
    ValidationError,
)
from crm_core.fields import FieldType, Scope, SettingField, SettingNotice, set_command
from crm_core.hookspecs import hookimpl
from crm_core.mail.addresses import Address, explain_address
from crm_core.mail.message import Attachment, OutgoingMessage
from crm_core.mail.render import render as render_message
from crm_core.mail.transport import (
    ConnectionReport,
    ConnectionStep,
    MailboxLimits,
    RecipientResult,
    RecipientStatus,
    ReconcileResult,
    Resources,
    RouteInfo,
    SenderAccount,
    SendResult,
    SettingValue,
    StepStatus,
    TransportSpec,
)
from crm_core.outcome import Outcome
from crm_core.secret_box import Secret

if TYPE_CHECKING:
    from crm_core.tokens import TokenClient as TokenClient
    from crm_core.tokens import token_client as token_client
    from crm_core.trust import TrustAdapter as TrustAdapter

_ON_FIRST_USE = {
    "TokenClient": "crm_core.tokens",
    "TrustAdapter": "crm_core.trust",
    "token_client": "crm_core.tokens",
}
"""Names whose modules load when a plugin first asks for them."""


def __getattr__(name: str) -> Any:
    """Import a name that loads on first use (see the module docstring)."""
    home = _ON_FIRST_USE.get(name)
    if home is None:
        raise AttributeError(f"module 'crm_core.plugin_api' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


__all__ = [
    "CERTIFICATE",
    "CLIENT_ID",
    "CLIENT_SECRET",
    "CREDENTIAL_KEYS",
    "EXCHANGE_SCOPE",
    "GRAPH_SCOPE",
    "SECRET_EXPIRES",
    "TENANT_ID",
    "Address",
    "AppCredentials",
    "Attachment",
    "ConfigError",
    "ConnectionReport",
    "ConnectionStep",
    "CrmError",
    "DatabaseError",
    "FieldType",
    "MailValidationError",
    "MailboxLimits",
    "NotFoundError",
    "Outcome",
    "OutgoingMessage",
    "PluginError",
    "Problem",
    "RecipientResult",
    "RecipientStatus",
    "ReconcileResult",
    "Resources",
    "RouteInfo",
    "Scope",
    "Secret",
    "SecretKeyError",
    "SendResult",
    "SenderAccount",
    "SettingField",
    "SettingNotice",
    "SettingValue",
    "SettingValueError",
    "StepStatus",
    "TokenClient",
    "TokenError",
    "TransportError",
    "TransportSpec",
    "TrustAdapter",
    "ValidationError",
    "credential_problems",
    "credentials_for",
    "entra_fields",
    "expiries",
    "expiry_notices",
    "explain_address",
    "forget_clients",
    "hookimpl",
    "is_guid",
    "missing_credentials",
    "render_message",
    "set_command",
    "token_client",
]
