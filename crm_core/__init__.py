"""crm_core: a minimal CRM core whose mail transports are pluggy plugins.

Plugins write ``from crm_core import hookimpl``; applications use :class:`Crm`.
"""

from crm_core.app import Crm
from crm_core.config import Config, load_config
from crm_core.errors import (
    ConfigError,
    CrmError,
    MailValidationError,
    NotFoundError,
    PluginError,
    Problem,
    SecretKeyError,
    SettingValueError,
    TransportError,
    ValidationError,
)
from crm_core.fields import FieldType, Scope, SettingField, SettingNotice
from crm_core.hookspecs import hookimpl
from crm_core.mail.addresses import Address
from crm_core.mail.message import Attachment, OutgoingMessage
from crm_core.mail.transport import (
    ConnectionReport,
    ConnectionStep,
    Outcome,
    ReconcileResult,
    Resources,
    RouteInfo,
    SenderAccount,
    SendResult,
    StepStatus,
    TransportSpec,
)
from crm_core.secret_box import Secret

__all__ = [
    "Address",
    "Attachment",
    "Config",
    "ConfigError",
    "ConnectionReport",
    "ConnectionStep",
    "Crm",
    "CrmError",
    "FieldType",
    "MailValidationError",
    "NotFoundError",
    "Outcome",
    "OutgoingMessage",
    "PluginError",
    "Problem",
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
    "SettingValueError",
    "StepStatus",
    "TransportError",
    "TransportSpec",
    "ValidationError",
    "hookimpl",
    "load_config",
]
