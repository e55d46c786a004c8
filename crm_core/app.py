"""Crm: the one object that wires configuration, database, plugins and signals.

Everything that would otherwise be module-level state (plugin managers, the engine,
cached transport clients) lives on a Crm instance, so two Crm objects in one process
(tests, a multi-tenant host) never share anything by accident.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import pluggy
from sqlalchemy import event, inspect, select
from sqlalchemy.orm import Session

from crm_core import db, signals
from crm_core.config import Config, load_config
from crm_core.errors import ConfigError, PluginError, Problem, SettingValueError
from crm_core.fields import Scope, SettingField, SettingNotice
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import (
    ConnectionReport,
    ConnectionStep,
    ReconcileResult,
    Resources,
    RouteInfo,
    SenderAccount,
    SendResult,
    SettingValue,
    StepStatus,
    TransportSpec,
    check_results,
)
from crm_core.models import User
from crm_core.plugins import installed_plugins, make_plugin_manager
from crm_core.secret_box import SecretBox, load_keys
from crm_core.settings import SaveOutcome, SettingsStore, core_fields

log = logging.getLogger(__name__)


class Crm:
    """The application: configuration, database, per-product-line plugins, signals."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        extra_plugins: Iterable[tuple[str, object]] = (),
    ) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.engine = db.make_engine(config.database_url)
        self.sessions = db.make_sessionmaker(self.engine)
        self.resources = Resources()
        self._extra_plugins = tuple(extra_plugins)
        self._managers: dict[str, pluggy.PluginManager] = {}
        self._box: SecretBox | None = None
        self._fields: dict[str, SettingField] | None = None
        self._transports: dict[str, dict[str, TransportSpec]] = {}
        event.listen(self.sessions, "after_commit", self._send_pending_signals)
        event.listen(self.sessions, "after_rollback", self._drop_pending_signals)

    @classmethod
    def open(cls, config_path: str | None = None, **kwargs: Any) -> Crm:
        """Load the configuration and check it against the installed plugins."""
        extra = tuple(kwargs.get("extra_plugins", ()))
        available = (*installed_plugins(), *(name for name, _ in extra))
        config = load_config(config_path, available_plugins=available)
        crm = cls(config, **kwargs)
        crm.check_plugins()
        return crm

    def close(self) -> None:
        """Close cached transport clients and the database pool."""
        self.resources.close()
        self.engine.dispose()

    # --- database ---------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on error."""
        with self.sessions.begin() as session:
            yield session

    def init_database(self) -> tuple[str | None, str]:
        """Create or upgrade the schema (idempotent); (revision before, after)."""
        return db.upgrade(self.engine)

    def database_ready(self) -> bool:
        """True when the schema is at the newest revision."""
        if not inspect(self.engine).has_table("alembic_version"):
            return False
        return db.current_revision(self.engine) == db.head_revision(self.engine)

    def _send_pending_signals(self, session: Session) -> None:
        pending = session.info.pop(signals.PENDING_KEY, [])
        for name, payload in pending:
            signals.signal_named(name).send(self, **payload)

    def _drop_pending_signals(self, session: Session) -> None:
        session.info.pop(signals.PENDING_KEY, None)

    # --- plugins ----------------------------------------------------------------

    def plugin_manager(self, product_line: str) -> pluggy.PluginManager:
        """The product line's plugin manager, built on first use."""
        manager = self._managers.get(product_line)
        if manager is None:
            line = self.config.product_line(product_line)
            manager = make_plugin_manager(line, self._extra_plugins)
            self._managers[product_line] = manager
        return manager

    def transports(self, product_line: str) -> dict[str, TransportSpec]:
        """Transports the product line's plugins offer, by name.

        Collected once per product line (its plugins are fixed once its manager is
        built): every enqueue, claim and start-up check of each user asks.
        """
        found = self._transports.get(product_line)
        if found is None:
            found = self._collect_transports(product_line)
            self._transports[product_line] = found
        return dict(found)

    def _collect_transports(self, product_line: str) -> dict[str, TransportSpec]:
        manager = self.plugin_manager(product_line)
        found: dict[str, TransportSpec] = {}
        for plugin, specs in _per_plugin(manager, manager.hook.register_transports):
            for spec in _typed_list(plugin, "register_transports", specs, TransportSpec):
                if spec.name in found:
                    raise PluginError(
                        f"transport {spec.name!r} is offered by both "
                        f"{found[spec.name].plugin!r} and {plugin!r}"
                    )
                found[spec.name] = TransportSpec(spec.name, spec.label, plugin, spec.description)
        return found

    def settings_fields(self) -> dict[str, SettingField]:
        """Every field the core and the enabled plugins declare, by key.

        Collected once per Crm (the plugins are fixed when it is made): every enqueue
        and every claim asks, and collecting called each plugin's hook again.
        """
        if self._fields is None:
            self._fields = self._collect_fields()
        return dict(self._fields)

    def _collect_fields(self) -> dict[str, SettingField]:
        fields = {f.key: f for f in core_fields()}
        seen_plugins: set[str] = set()
        for line in self.config.product_lines:
            manager = self.plugin_manager(line)
            for plugin, specs in _per_plugin(manager, manager.hook.register_settings):
                if plugin in seen_plugins:
                    continue
                for spec in _typed_list(plugin, "register_settings", specs, SettingField):
                    spec = _with_plugin(spec, plugin)
                    if fields.get(spec.key) == spec:
                        continue  # a shared field (e.g. crm_core.entra) declared again
                    if spec.key in fields:
                        raise PluginError(
                            f"setting {spec.key!r} is declared by both "
                            f"{fields[spec.key].plugin or 'crm_core'!r} and {plugin!r}"
                        )
                    fields[spec.key] = spec
            seen_plugins.update(name for name, _ in manager.list_name_plugin())
        return fields

    def check_plugins(self) -> None:
        """Start-up check: every product line's default transport is offered."""
        for name, line in self.config.product_lines.items():
            offered = self.transports(name)
            if line.default_transport not in offered:
                raise ConfigError(
                    f"{self.config.source}: product_lines.{name}.default_transport = "
                    f"{line.default_transport!r}, but its plugins ({', '.join(line.plugins)}) "
                    f"offer: {', '.join(sorted(offered)) or 'no transport'}"
                )
        self.settings_fields()

    def check_users(self, session: Session) -> list[str]:
        """Start-up check: every user's transport is offered by their product line."""
        problems: list[str] = []
        store = self.settings_store()
        for user in session.scalars(select(User)):
            if user.product_line not in self.config.product_lines:
                problems.append(
                    f"user {user.email}: product line {user.product_line!r} is not in "
                    f"{self.config.source}"
                )
                continue
            transport = self.user_transport(store.user_values(session, user.id), user)
            if transport not in self.transports(user.product_line):
                problems.append(
                    f"user {user.email}: mail.transport {transport!r} is not enabled for "
                    f"product line {user.product_line!r} in {self.config.source}"
                )
        return problems

    # --- settings ---------------------------------------------------------------

    def secret_box(self) -> SecretBox:
        """The installation's encryption for secrets (key loaded on first use)."""
        if self._box is None:
            self._box = SecretBox(load_keys(self.config.key_file, self.environ))
        return self._box

    def settings_store(self) -> SettingsStore:
        """A settings store over every declared field."""
        return SettingsStore(self.settings_fields(), self.secret_box())

    def user_transport(self, user_values: Mapping[str, SettingValue], user: User) -> str:
        """The user's chosen transport, else the product line's default."""
        chosen = user_values.get("mail.transport")
        if isinstance(chosen, str) and chosen:
            return chosen
        return self.config.product_line(user.product_line).default_transport

    def set_system_setting(self, session: Session, key: str, raw: str) -> SaveOutcome:
        """Save a system setting, run plugins' checks (errors veto), notify plugins."""
        store = self.settings_store()
        outcome = store.set_system(session, key, raw)
        if outcome.changed:
            self._refuse_on_errors(self.check_settings(session, Scope.SYSTEM, None), key)
            for line in self.config.product_lines:
                self.plugin_manager(line).hook.system_settings_changed(
                    changed=[key], resources=self.resources
                )
            signals.emit_after_commit(session, "system-settings-changed", keys=[key])
        return outcome

    def set_user_setting(self, session: Session, user: User, key: str, raw: str) -> SaveOutcome:
        """Save a user's setting, with the same checks and notifications."""
        if key == "mail.transport":
            self._check_transport_choice(user, raw.strip())
        store = self.settings_store()
        outcome = store.set_user(session, user, key, raw)
        if outcome.changed:
            self._refuse_on_errors(self.check_settings(session, Scope.USER, user), key)
            account = self.sender_account(session, user)
            self.plugin_manager(user.product_line).hook.user_settings_changed(
                account=account, changed=[key], resources=self.resources
            )
            signals.emit_after_commit(
                session, "user-settings-changed", user_id=user.id, email=user.email, keys=[key]
            )
        return outcome

    def _check_transport_choice(self, user: User, transport: str) -> None:
        offered = self.transports(user.product_line)
        if transport not in offered:
            raise SettingValueError(
                "mail.transport",
                f"{transport!r} is not enabled for product line {user.product_line!r}; "
                f"enabled: {', '.join(sorted(offered)) or 'none'}",
            )

    def _refuse_on_errors(self, notices: Sequence[SettingNotice], key: str) -> None:
        errors = [n for n in notices if n.level == "error" and n.key == key]
        if errors:
            raise SettingValueError(key, "; ".join(n.message for n in errors))

    def check_settings(
        self, session: Session, scope: Scope, user: User | None
    ) -> list[SettingNotice]:
        """Warnings and errors from every plugin about the saved settings."""
        store = self.settings_store()
        system = store.system_values(session)
        user_values = store.user_values(session, user.id) if user else None
        return self._check_values(scope, user, system, user_values)

    def _check_values(
        self,
        scope: Scope,
        user: User | None,
        system: dict[str, SettingValue],
        user_values: dict[str, SettingValue] | None,
    ) -> list[SettingNotice]:
        lines = [user.product_line] if user else list(self.config.product_lines)
        notices: list[SettingNotice] = []
        seen: set[str] = set()
        for line in lines:
            manager = self.plugin_manager(line)
            for plugin, found in _per_plugin(
                manager,
                manager.hook.check_settings,
                scope=scope,
                system=system,
                user=user_values,
                user_email=user.email if user else None,
                transport=self.user_transport(user_values, user)
                if user and user_values is not None
                else None,
            ):
                if plugin in seen:
                    continue
                seen.add(plugin)
                for notice in _typed_list(plugin, "check_settings", found, SettingNotice):
                    if notice not in notices:
                        notices.append(notice)
        return notices

    def sender_account(self, session: Session, user: User) -> SenderAccount:
        """The account a transport sends as for ``user`` (secrets masked)."""
        store = self.settings_store()
        user_values = store.user_values(session, user.id)
        return SenderAccount(
            user_id=user.id,
            email=user.email,
            name=user.name,
            product_line=user.product_line,
            transport=self.user_transport(user_values, user),
            system=store.system_values(session),
            user=user_values,
        )

    def sender_problems(self, session: Session, account: SenderAccount) -> list[Problem]:
        """What stops this account from sending: transport not enabled, settings missing."""
        offered = self.transports(account.product_line)
        if account.transport not in offered:
            return [
                Problem(
                    "mail.transport",
                    f"transport {account.transport!r} is not enabled for product line "
                    f"{account.product_line!r} (enabled: {', '.join(sorted(offered))})",
                )
            ]
        problems = []
        for spec in self.settings_fields().values():
            if spec.required_for == account.transport and account.get(spec.key) in (None, ""):
                where = "crm settings set" if spec.scope is Scope.SYSTEM else "crm users set"
                problems.append(
                    Problem(spec.key, f"{spec.label} is not set (use `{where} {spec.key} ...`)")
                )
        user = session.get(User, account.user_id)
        if user is not None:
            # The account's values were read in this transaction a moment ago; reading
            # them again was a third of the cost of an enqueue (benchmark profile).
            notices = self._check_values(Scope.USER, user, dict(account.system), dict(account.user))
            for notice in notices:
                if notice.level == "error":
                    problems.append(Problem(notice.key, notice.message))
        return problems

    # --- typed hook callers --------------------------------------------------------

    def send_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage]
    ) -> list[SendResult]:
        """Hand a batch to the transport that owns ``account.transport``."""
        manager = self.plugin_manager(account.product_line)
        results = manager.hook.send_mail(
            account=account, messages=list(messages), resources=self.resources
        )
        if results is None:
            raise PluginError(
                f"no plugin of product line {account.product_line!r} sends via "
                f"{account.transport!r}"
            )
        return check_results(account.transport, [m.message_id for m in messages], results)

    def test_connection(self, account: SenderAccount) -> ConnectionReport:
        """Run the transport's Test connection ladder; never sends a mail."""
        manager = self.plugin_manager(account.product_line)
        report = manager.hook.test_connection(account=account, resources=self.resources)
        if report is None:
            return ConnectionReport(
                transport=account.transport,
                summary=f"No plugin answers Test connection for {account.transport!r}",
                steps=(
                    ConnectionStep(
                        "transport",
                        StepStatus.FAILED,
                        f"transport {account.transport!r} is not enabled for product line "
                        f"{account.product_line!r}",
                        "choose an enabled transport with `crm users set EMAIL mail.transport`",
                    ),
                ),
            )
        if not isinstance(report, ConnectionReport):
            raise PluginError(f"test_connection for {account.transport!r} returned {report!r}")
        # No database change is involved, so there is no commit to wait for.
        signals.connection_tested.send(
            self, user_id=account.user_id, transport=account.transport, ok=report.ok
        )
        return report

    def reconcile_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage]
    ) -> list[ReconcileResult]:
        """Ask the transport whether ``unknown`` messages were sent."""
        manager = self.plugin_manager(account.product_line)
        found = manager.hook.reconcile_mail(
            account=account, messages=list(messages), resources=self.resources
        )
        if found is None:
            return [
                ReconcileResult(m.message_id, None, f"{account.transport} cannot look up sent mail")
                for m in messages
            ]
        return _typed_list(account.transport, "reconcile_mail", found, ReconcileResult)

    def describe_route(self, account: SenderAccount) -> RouteInfo | None:
        """How the transport would send for ``account`` (no network)."""
        manager = self.plugin_manager(account.product_line)
        route = manager.hook.describe_route(account=account)
        return route if isinstance(route, RouteInfo) else None


def _per_plugin(manager: pluggy.PluginManager, caller: Any, **kwargs: Any) -> list[tuple[str, Any]]:
    """Call a collect-all hook and pair each result with the plugin that gave it."""
    results: list[tuple[str, Any]] = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.wrapper or impl.hookwrapper:
            continue  # collect-all registration hooks take no wrappers
        name = manager.get_name(impl.plugin) or "?"
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        value = impl.function(**args)
        if value is not None:
            results.append((name, value))
    return results


def _typed_list(plugin: str, hook: str, value: Any, cls: type[Any]) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, cls) for v in value):
        raise PluginError(f"plugin {plugin!r}: {hook} must return a list of {cls.__name__}")
    return value


def _with_plugin(spec: SettingField, plugin: str) -> SettingField:
    return spec if spec.plugin else replace(spec, plugin=plugin)
