"""crm_core: a minimal CRM core whose mail transports are pluggy plugins.

Plugins import from :mod:`crm_core.plugin_api`; applications use :class:`Crm`.

Why the names are loaded on first use (PEP 562): ``crm --help`` and ``crm --version``
import this package, and the names below pull in SQLAlchemy and the ORM; a command
that does not touch the database should not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crm_core.app import Crm as Crm
    from crm_core.config import Config as Config
    from crm_core.config import load_config as load_config
    from crm_core.errors import ConfigError as ConfigError
    from crm_core.errors import CrmError as CrmError
    from crm_core.errors import DatabaseError as DatabaseError
    from crm_core.errors import MailValidationError as MailValidationError
    from crm_core.errors import NotFoundError as NotFoundError
    from crm_core.errors import PluginError as PluginError
    from crm_core.errors import Problem as Problem
    from crm_core.errors import SecretKeyError as SecretKeyError
    from crm_core.errors import SettingValueError as SettingValueError
    from crm_core.errors import TransportError as TransportError
    from crm_core.errors import ValidationError as ValidationError
    from crm_core.fields import FieldType as FieldType
    from crm_core.fields import Scope as Scope
    from crm_core.fields import SettingField as SettingField
    from crm_core.fields import SettingNotice as SettingNotice
    from crm_core.hookspecs import hookimpl as hookimpl
    from crm_core.mail.addresses import Address as Address
    from crm_core.mail.message import Attachment as Attachment
    from crm_core.mail.message import OutgoingMessage as OutgoingMessage
    from crm_core.mail.transport import ConnectionReport as ConnectionReport
    from crm_core.mail.transport import ConnectionStep as ConnectionStep
    from crm_core.mail.transport import MailboxLimits as MailboxLimits
    from crm_core.mail.transport import Outcome as Outcome
    from crm_core.mail.transport import ReconcileResult as ReconcileResult
    from crm_core.mail.transport import Resources as Resources
    from crm_core.mail.transport import RouteInfo as RouteInfo
    from crm_core.mail.transport import SenderAccount as SenderAccount
    from crm_core.mail.transport import SendResult as SendResult
    from crm_core.mail.transport import StepStatus as StepStatus
    from crm_core.mail.transport import TransportSpec as TransportSpec
    from crm_core.secret_box import Secret as Secret

_HOMES = {
    "Address": "crm_core.mail.addresses",
    "Attachment": "crm_core.mail.message",
    "Config": "crm_core.config",
    "ConfigError": "crm_core.errors",
    "ConnectionReport": "crm_core.mail.transport",
    "ConnectionStep": "crm_core.mail.transport",
    "Crm": "crm_core.app",
    "CrmError": "crm_core.errors",
    "DatabaseError": "crm_core.errors",
    "FieldType": "crm_core.fields",
    "MailValidationError": "crm_core.errors",
    "MailboxLimits": "crm_core.mail.transport",
    "NotFoundError": "crm_core.errors",
    "Outcome": "crm_core.mail.transport",
    "OutgoingMessage": "crm_core.mail.message",
    "PluginError": "crm_core.errors",
    "Problem": "crm_core.errors",
    "ReconcileResult": "crm_core.mail.transport",
    "Resources": "crm_core.mail.transport",
    "RouteInfo": "crm_core.mail.transport",
    "Scope": "crm_core.fields",
    "Secret": "crm_core.secret_box",
    "SecretKeyError": "crm_core.errors",
    "SendResult": "crm_core.mail.transport",
    "SenderAccount": "crm_core.mail.transport",
    "SettingField": "crm_core.fields",
    "SettingNotice": "crm_core.fields",
    "SettingValueError": "crm_core.errors",
    "StepStatus": "crm_core.mail.transport",
    "TransportError": "crm_core.errors",
    "TransportSpec": "crm_core.mail.transport",
    "ValidationError": "crm_core.errors",
    "hookimpl": "crm_core.hookspecs",
    "load_config": "crm_core.config",
}
"""Where each public name lives."""

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Import a public name from its module when it is first asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'crm_core' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
