"""Crm: the one object that wires configuration, database, plugins and signals.

Everything that would otherwise be module-level state (plugin managers, the engine,
cached transport clients) lives on a Crm instance, so two Crm objects in one process
(tests, a multi-tenant host) never share anything by accident.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pluggy
from sqlalchemy import Connection, event, select
from sqlalchemy.orm import Session

from crm_core import audit, db, signals
from crm_core.config import Config, load_config
from crm_core.errors import ConfigError, PluginError, Problem, SecretKeyError, SettingValueError
from crm_core.fields import Scope, SettingField, SettingNotice, set_command
from crm_core.files import private_folder
from crm_core.keyring import KeyRing
from crm_core.mail import senders
from crm_core.mail.message import OutgoingMessage
from crm_core.mail.transport import (
    ConnectionReport,
    ConnectionStep,
    MailboxLimits,
    Outcome,
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
from crm_core.models import User, utcnow
from crm_core.plugins import installed_plugins, make_plugin_manager
from crm_core.secret_box import KEY_ENV, SecretBox, create_key_file, load_keys
from crm_core.settings import (
    TRANSPORT_KEY,
    SaveOutcome,
    SettingsStore,
    core_fields,
    count_secrets,
)

log = logging.getLogger(__name__)


class Crm:
    """The application: configuration, database, per-product-line plugins, signals."""

    def __init__(
        self,
        config: Config,
        *,
        environ: Mapping[str, str] | None = None,
        extra_plugins: Iterable[tuple[str, object]] = (),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.config = config
        self.clock = clock
        """This host's clock (aware UTC), for what the application stamps for itself and
        nobody compares: the readable date in a Message-ID. Every time that is stored
        and compared (settings, pauses, leases, due times) is the database's
        (:func:`crm_core.mail.policy.db_now`), so a host whose clock is off changes
        nothing that matters."""
        self.environ = os.environ if environ is None else environ
        self.engine = db.make_engine(config.database_url)
        self.sessions = db.make_sessionmaker(self.engine)
        self.read_sessions = db.make_sessionmaker(db.read_only(self.engine))
        self.resources = Resources()
        self._extra_plugins = tuple(extra_plugins)
        self._managers: dict[str, pluggy.PluginManager] = {}
        self.keys = KeyRing(lambda: load_keys(self.config.key_file, self.environ))
        """This process's secret keys; reloaded when a rotation raises the database's
        key version (:mod:`crm_core.keyring`)."""
        self._fields: dict[str, SettingField] | None = None
        self._transports: dict[str, dict[str, TransportSpec]] = {}
        self._owner_callers: dict[tuple[str, str, str], pluggy.HookCaller] = {}
        for sessions in (self.sessions, self.read_sessions):
            event.listen(sessions, "after_commit", self._send_pending_signals)
            event.listen(sessions, "after_rollback", self._drop_pending_signals)
        senders.watch(self.sessions)  # reads change nothing a sender's cache holds

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
    def transaction(self, *, write: bool = True) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on error.

        ``write=False`` for one that only reads (a list, a show, a dry run): on SQLite
        it takes no write lock, so it never makes a worker wait, and a write in it
        fails at once (see :mod:`crm_core.db`). Writing is the default because a
        read-then-write transaction begun as a reader could fail on upgrade.
        """
        sessions = self.sessions if write else self.read_sessions
        with sessions.begin() as session:
            yield session

    @contextmanager
    def transaction_on(self, connection: Connection) -> Iterator[Session]:
        """One unit of work, as :meth:`transaction`, on a connection the caller holds.

        Why: a worker records a batch's results in many short transactions, one every
        mail or two; checking a connection out of the pool and a session's set-up for
        each cost more than the statements themselves (about 130 against 55 µs on
        SQLite, 440 against 280 µs of CPU on PostgreSQL). The signals wait for the
        commit as in :meth:`transaction`.
        """
        with self.sessions(bind=connection) as session, session.begin():
            yield session

    def init_database(self) -> tuple[str | None, str]:
        """Create or upgrade the schema (idempotent); (revision before, after).

        Secrets saved before they were bound to a destination are bound to the one in
        effect now (see :meth:`SettingsStore.bind_unbound`), so that they keep working
        there and a later change of it is noticed.
        """
        revisions = db.upgrade(self.engine)
        with self.transaction() as session:
            SettingsStore(self.settings_fields(), self.keys).bind_unbound(session)
        return revisions

    def database_location(self) -> str:
        """Where the database is, as shown to people (never its password)."""
        return db.where(self.engine.url)

    def check_database(self) -> None:
        """Refuse a database that is missing, unreachable, foreign or of another schema."""
        db.check_ready(self.engine)

    def _send_pending_signals(self, session: Session) -> None:
        pending = session.info.pop(signals.PENDING_KEY, [])
        for name, payload in pending:
            signals.deliver(self, name, payload)

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
        for plugin, specs in _each_plugin(manager, "register_transports"):
            for spec in _typed_list(plugin, "register_transports", specs, TransportSpec):
                if spec.name in found:
                    raise PluginError(
                        f"transport {spec.name!r} is offered by both "
                        f"{found[spec.name].plugin!r} and {plugin!r}"
                    )
                found[spec.name] = replace(spec, plugin=plugin)
        _check_owner_hooks(manager, {spec.plugin for spec in found.values()})
        return found

    def in_flight_windows(self) -> dict[str, int]:
        """Each transport's in-flight window (see :class:`TransportSpec`), by name."""
        return {
            name: spec.in_flight
            for line in self.config.product_lines
            for name, spec in self.transports(line).items()
        }

    def in_flight_window(self, session: Session, transport: str, user_id: int) -> int:
        """One account's in-flight window: the transport's ``in_flight_for`` of the
        account when it has one (and the account can be read), else its ``in_flight``.
        """
        user = session.get(User, user_id)
        spec = None
        if user is not None and user.product_line in self.config.product_lines:
            spec = self.transports(user.product_line).get(transport)
        if spec is None or user is None:
            return self.in_flight_windows().get(transport, 0)
        if spec.in_flight_for is None:
            return spec.in_flight
        return spec.in_flight_for(self.sender_account(session, user))

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
            for plugin, specs in _each_plugin(manager, "register_settings"):
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
        _check_bindings(fields)
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
            offered = self.transports(user.product_line)
            if transport not in offered:
                line = self.config.product_line(user.product_line)
                problems.append(
                    f"user {user.email}: mail.transport {transport!r} is not enabled for "
                    f"product line {user.product_line!r} in {self.config.source} (fix: "
                    f"{set_command(user.email, TRANSPORT_KEY, Scope.USER, line.default_transport)}"
                    f", or enable it in {self.config.source})"
                )
        return problems

    # --- settings ---------------------------------------------------------------

    def secret_box(self) -> SecretBox:
        """The installation's encryption for secrets (key loaded on first use).

        Never creates a key: only ``crm init`` does (:meth:`create_key`), so a lost
        key file is noticed instead of silently replaced by a new, useless key.
        """
        return self.keys.box()

    def create_key(self) -> Path | None:
        """Make the key file of a new installation (``crm init``); the file made, or None.

        None when ``CRM_SECRET_KEY`` holds the key or the file exists. A database that
        already holds secrets never gets a new key: they could not be read with it.
        """
        key_file = self.config.key_file
        if self.environ.get(KEY_ENV, "").strip() or key_file is None or key_file.exists():
            return None
        with self.transaction() as session:
            if count_secrets(session):
                raise SecretKeyError(
                    f"the key file {key_file} is missing, but the database holds encrypted "
                    "secrets: restore the key file from your backup (or set "
                    f"{KEY_ENV}); a new key could not read them"
                )
        private_folder(key_file.parent)
        create_key_file(key_file)
        return key_file

    def settings_store(self) -> SettingsStore:
        """A settings store over every declared field (the keys loaded first, so that a
        missing or malformed key stops a command at once, with what to fix)."""
        self.keys.box()
        return SettingsStore(self.settings_fields(), self.keys)

    def user_transport(self, user_values: Mapping[str, SettingValue], user: User) -> str:
        """The user's chosen transport, else the product line's default."""
        chosen = user_values.get(TRANSPORT_KEY)
        if isinstance(chosen, str) and chosen:
            return chosen
        return self.config.product_line(user.product_line).default_transport

    def set_system_setting(
        self, session: Session, key: str, raw: str, actor: str | None = None
    ) -> SaveOutcome:
        """Save a system setting; refused when it stops sending; plugins are told.

        ``actor`` (a user's e-mail, or ``cli:<os user>``) is written to the audit log
        with the key, never the value.
        """
        outcome = self.settings_store().set_system(session, key, raw)
        if outcome.changed:
            reenter = self._system_changed(session, key, actor, "setting changed")
            outcome = _with_reenter(outcome, reenter)
        return outcome

    def unset_system_setting(self, session: Session, key: str, actor: str | None = None) -> bool:
        """Remove a system setting (True if one was stored), judged as a save is.

        A removal that stops sending (the Exchange URL while EWS is used) is refused.
        """
        removed = self.settings_store().unset_system(session, key)
        if removed:
            self._system_changed(session, key, actor, "setting removed")
        return removed

    def _system_changed(
        self, session: Session, key: str, actor: str | None, action: str
    ) -> Mapping[str, tuple[str, ...]]:
        """Judge, announce and audit a system change; returns the secrets to re-enter."""
        if actor is not None:
            audit.record(session, actor, action, key)
        found = self.settings_store().resolve(session)
        self._refuse(key, self.installation_problems(found.system, found.reenter))
        for line in self.config.product_lines:
            self.plugin_manager(line).hook.system_settings_changed(
                changed=[key], resources=self.resources
            )
        signals.emit_after_commit(session, "system-settings-changed", keys=[key])
        return found.reenter

    def set_user_setting(
        self, session: Session, user: User, key: str, raw: str, actor: str | None = None
    ) -> SaveOutcome:
        """Save a user's setting, with the same checks, notifications and audit entry."""
        outcome = self.settings_store().set_user(session, user, key, raw)
        if outcome.changed:
            reenter = self._user_changed(session, user, key, actor, "setting changed")
            outcome = _with_reenter(outcome, reenter)
        return outcome

    def unset_user_setting(
        self, session: Session, user: User, key: str, actor: str | None = None
    ) -> bool:
        """Remove a user's setting (True if one was stored), judged as a save is."""
        removed = self.settings_store().unset_user(session, user, key)
        if removed:
            self._user_changed(session, user, key, actor, "setting removed")
        return removed

    def _user_changed(
        self, session: Session, user: User, key: str, actor: str | None, action: str
    ) -> Mapping[str, tuple[str, ...]]:
        """Judge, announce and audit a user's change; returns the secrets to re-enter."""
        if actor is not None:
            audit.record(session, actor, action, f"{user.email}: {key}")
        account = self.sender_account(session, user)
        self._refuse(key, self.sender_problems(account))
        self.plugin_manager(user.product_line).hook.user_settings_changed(
            account=account, changed=[key], resources=self.resources
        )
        signals.emit_after_commit(
            session, "user-settings-changed", user_id=user.id, email=user.email, keys=[key]
        )
        return account.reenter

    def _refuse(self, key: str, problems: Sequence[Problem]) -> None:
        """Refuse a save that causes a problem concerning the saved key."""
        mine = [p for p in problems if p.concerns(key)]
        if mine:
            fixes = "; ".join(dict.fromkeys(p.fix for p in mine if p.fix))
            text = "; ".join(p.message for p in mine)
            raise SettingValueError(key, f"{text} ({fixes})" if fixes else text)

    def check_settings(
        self, session: Session, scope: Scope, user: User | None
    ) -> list[SettingNotice]:
        """Advice from every plugin about the saved settings (never stops sending)."""
        store = self.settings_store()
        system = store.system_values(session)
        user_values = store.user_values(session, user.id) if user else None
        lines = [user.product_line] if user else list(self.config.product_lines)
        transport = self.user_transport(user_values, user) if user and user_values else None
        notices: list[SettingNotice] = []
        for line in lines:
            answers = self.plugin_manager(line).hook.check_settings(
                scope=scope,
                system=system,
                user=user_values,
                user_email=user.email if user else None,
                transport=transport if user else None,
                today=self.clock().date(),
            )
            for found in answers:
                for notice in _typed_list(f"of {line}", "check_settings", found, SettingNotice):
                    if notice not in notices:
                        notices.append(notice)
        return notices

    def sender_account(self, session: Session, user: User) -> SenderAccount:
        """The account a transport sends as for ``user`` (secrets masked; a secret whose
        destination changed since it was saved, or that cannot be decrypted, withheld)."""
        found = self.settings_store().resolve(session, user.id)
        return SenderAccount(
            user_id=user.id,
            email=user.email,
            name=user.name,
            product_line=user.product_line,
            transport=self.user_transport(found.user, user),
            system=found.system,
            user=found.user,
            reenter=found.reenter,
            unreadable=found.unreadable,
        )

    def sender_state(
        self, session: Session, user: User
    ) -> tuple[SenderAccount | None, list[Problem]]:
        """The user's sender account (None when it cannot be made) and what stops it.

        A product line removed from the configuration is one more problem of this
        user, not a crash of every worker: claim, dry run and ``crm check`` ask here.
        """
        if user.product_line not in self.config.product_lines:
            problem = Problem(
                "product_line",
                f"product line {user.product_line!r} is not in {self.config.source}",
                f"add [product_lines.{user.product_line}] to {self.config.source}",
            )
            return None, [problem]
        account = self.sender_account(session, user)
        return account, self.sender_problems(account)

    def sender_problems(self, account: SenderAccount) -> list[Problem]:
        """What stops this account from sending: the one answer everything asks.

        Claim (pauses the account), ``crm send --dry-run``, Test connection,
        ``crm check``, ``crm users show`` and every save use this and nothing else.
        The core checks what it knows (the transport is enabled, required fields are
        set); the transport's owner adds its own rules through ``sending_problems``.
        """
        offered = self.transports(account.product_line)
        if account.transport not in offered:
            default = self.config.product_line(account.product_line).default_transport
            return [
                Problem(
                    TRANSPORT_KEY,
                    f"transport {account.transport!r} is not enabled for product line "
                    f"{account.product_line!r} (enabled: {', '.join(sorted(offered))})",
                    set_command(account.email, TRANSPORT_KEY, Scope.USER, default),
                )
            ]
        found = self._owner(account, "sending_problems")(account=account)
        problems = _typed_list(account.transport, "sending_problems", found or [], Problem)
        named = {p.key for p in problems}
        missing = [
            Problem(
                spec.key,
                f"{spec.label} is not set",
                set_command(account.email, spec.key, spec.scope),
            )
            for spec in self.settings_fields().values()
            if spec.required_for == account.transport
            and spec.key not in named
            and account.get(spec.key) in (None, "")
        ]
        return self._explain_withheld(account, missing + problems)

    def _explain_withheld(self, account: SenderAccount, problems: list[Problem]) -> list[Problem]:
        """Say why a secret the transport misses is missing: withheld, not unsaved.

        The transport judges whether it needs the secret (it reports it missing); the
        core knows why it has no value: its destination changed since it was saved
        (enter it again), or no key here decrypts it (an installation-wide error).
        """
        why = {
            key: self._reenter_problem(account, key, moved)
            for key, moved in account.reenter.items()
        }
        why.update((key, self._unreadable_problem(account, key)) for key in account.unreadable)
        if not why:
            return problems
        explained: list[Problem] = []
        for problem in problems:
            for found in [p for key, p in why.items() if problem.concerns(key)] or [problem]:
                if found not in explained:
                    explained.append(found)
        return explained

    def _reenter_problem(self, account: SenderAccount, key: str, moved: Sequence[str]) -> Problem:
        spec = self.settings_fields()[key]
        return Problem(
            key,
            f"{spec.label} must be entered again: {', '.join(moved)} changed since it was "
            "saved, and a saved secret is only sent where it was saved for",
            set_command(account.email, key, spec.scope),
        )

    def _unreadable_problem(self, account: SenderAccount, key: str) -> Problem:
        spec = self.settings_fields()[key]
        return Problem(
            key,
            f"the saved {spec.label} cannot be decrypted with this installation's secret "
            "key; the mail waits (it is not paused). Restore the key file or "
            f"{KEY_ENV} it was encrypted with (`crm check` lists every such secret), or "
            "enter it again",
            set_command(account.email, key, spec.scope),
        )

    def installation_problems(
        self,
        system: Mapping[str, SettingValue],
        reenter: Mapping[str, tuple[str, ...]] | None = None,
    ) -> list[Problem]:
        """What in the system settings alone stops any transport from sending.

        Asked with an account of no user (``user_id`` 0, no e-mail) for every
        transport offered, so that a system save is judged by the same rules as a
        user's; problems about per-user keys are for each user to fix. ``reenter``:
        system secrets withheld since their destination changed (see ``resolve``).
        """
        fields = self.settings_fields()
        problems: list[Problem] = []
        moved = dict(reenter or {})
        for line in self.config.product_lines:
            for transport in self.transports(line):
                probe = SenderAccount(0, "", "", line, transport, system=system, reenter=moved)
                for problem in self.sender_problems(probe):
                    spec = fields.get(problem.key)
                    if spec is not None and spec.scope is Scope.SYSTEM and problem not in problems:
                        problems.append(problem)
        return problems

    # --- calls to the transport's owner ------------------------------------------------

    def _owner(self, account: SenderAccount, hook: str) -> pluggy.HookCaller:
        """``hook`` as called on the plugin that owns ``account.transport`` alone.

        Why a subset hook caller: pluggy's own calling (wrappers, tracing, firstresult)
        stays, and a plugin never sees another transport's accounts, so it needs no
        ``if account.transport != ...`` guard. Plugins that offer no transport stay in,
        for their wrappers (a plain implementation of these hooks is refused at load).
        """
        key = (account.product_line, account.transport, hook)
        caller = self._owner_callers.get(key)
        if caller is None:
            spec = self.transports(account.product_line).get(account.transport)
            if spec is None:
                raise PluginError(
                    f"no plugin of product line {account.product_line!r} offers transport "
                    f"{account.transport!r}"
                )
            manager = self.plugin_manager(account.product_line)
            owners = {t.plugin for t in self.transports(account.product_line).values()}
            others = [manager.get_plugin(name) for name in owners - {spec.plugin}]
            caller = manager.subset_hook_caller(hook, remove_plugins=others)
            self._owner_callers[key] = caller
        return caller

    def send_mail(
        self,
        account: SenderAccount,
        messages: Sequence[OutgoingMessage],
        report: Callable[[Sequence[SendResult]], None] | None = None,
        more: Callable[[], Sequence[OutgoingMessage]] | None = None,
    ) -> list[SendResult]:
        """Hand a batch to the transport that owns ``account.transport``.

        An account that cannot send gets a configuration result for every message
        without its plugin being asked, so no transport has to check its settings.
        ``report`` hears results as the transport learns them, and ``more`` gives the
        transport more of the account's messages for the same batch (see the hook).
        """
        problems = self.sender_problems(account)
        if problems:
            detail = "; ".join(str(p) for p in problems)
            return [
                SendResult(m.message_id, Outcome.CONFIGURATION, detail, code=problems[0].key)
                for m in messages
            ]
        handed = [m.message_id for m in messages]

        def more_messages() -> list[OutgoingMessage]:
            found = list(more()) if more is not None else []
            handed.extend(m.message_id for m in found)
            return found

        results = self._owner(account, "send_mail")(
            account=account,
            messages=list(messages),
            resources=self.resources,
            report=report or _ignore,
            more=more_messages,
        )
        if results is None:
            raise PluginError(f"the plugin of {account.transport!r} does not send mail")
        return check_results(account.transport, handed, results)

    def test_connection(self, account: SenderAccount) -> ConnectionReport:
        """Run the transport's Test connection ladder; never sends a mail."""
        problems = self.sender_problems(account)
        report = None
        if account.transport in self.transports(account.product_line):
            report = self._owner(account, "test_connection")(
                account=account,
                resources=self.resources,
                problems=problems,
                today=self.clock().date(),
            )
        if report is None:  # not enabled, or the plugin has no ladder
            report = _settings_report(account.transport, problems)
        if not isinstance(report, ConnectionReport):
            raise PluginError(f"test_connection for {account.transport!r} returned {report!r}")
        # No database change is involved, so there is no commit to wait for.
        signals.send_now(
            self,
            "connection-tested",
            user_id=account.user_id,
            transport=account.transport,
            ok=report.ok,
        )
        return report

    def reconcile_mail(
        self, account: SenderAccount, messages: Sequence[OutgoingMessage], now: datetime
    ) -> list[ReconcileResult]:
        """Ask the transport whether ``unknown`` messages were sent (``now``: the
        database's clock, against which "too soon to tell" is measured)."""
        found = self._owner(account, "reconcile_mail")(
            account=account, messages=list(messages), resources=self.resources, now=now
        )
        if found is None:
            return [
                ReconcileResult(m.message_id, None, f"{account.transport} cannot look up sent mail")
                for m in messages
            ]
        return _typed_list(account.transport, "reconcile_mail", found, ReconcileResult)

    def message_problems(self, account: SenderAccount, message: OutgoingMessage) -> list[Problem]:
        """What the transport says stops this mail (e.g. too large for its API); no network."""
        if account.transport not in self.transports(account.product_line):
            return []
        found = self._owner(account, "message_problems")(account=account, message=message)
        return _typed_list(account.transport, "message_problems", found or [], Problem)

    def mailbox_limits(self, account: SenderAccount) -> MailboxLimits:
        """The mailbox the account sends through and its server's limits (the
        transport's defaults; :mod:`crm_core.mail.pacing` applies the settings)."""
        spec = self.transports(account.product_line).get(account.transport)
        found = None
        if spec is not None:
            found = self._owner(account, "mailbox_limits")(account=account)
        if found is None:
            return MailboxLimits(f"{account.transport}:{account.email}")
        if not isinstance(found, MailboxLimits):
            raise PluginError(f"mailbox_limits for {account.transport!r} returned {found!r}")
        return found

    def describe_route(self, account: SenderAccount) -> RouteInfo | None:
        """How the transport would send for ``account`` (no network)."""
        if account.transport not in self.transports(account.product_line):
            return None
        route = self._owner(account, "describe_route")(account=account)
        return route if isinstance(route, RouteInfo) else None


OWNER_HOOKS = (
    "sending_problems",
    "message_problems",
    "send_mail",
    "test_connection",
    "reconcile_mail",
    "mailbox_limits",
    "describe_route",
)
"""Hooks the core calls on the owner of an account's transport alone."""


def _ignore(results: Sequence[SendResult]) -> None:
    """The ``report`` for callers that only want the returned list."""


def _settings_report(transport: str, problems: Sequence[Problem]) -> ConnectionReport:
    """Test connection's answer when no plugin can run a ladder for the account."""
    steps = tuple(
        ConnectionStep("settings", StepStatus.FAILED, p.message, p.fix) for p in problems
    ) or (ConnectionStep("settings", StepStatus.FAILED, f"{transport} cannot be tested"),)
    return ConnectionReport(transport, f"Test connection failed for {transport!r}", steps)


def _each_plugin(manager: pluggy.PluginManager, hook: str) -> list[tuple[str, Any]]:
    """Call a collect-all hook on each plugin alone and pair its answers with its name.

    Why pluggy's subset caller and not our own loop over the implementations: the
    answers must be attributed (a transport's owner, a field's plugin), and pluggy's
    calling keeps its argument handling and tracing.
    """
    plugins = [(name, plugin) for name, plugin in manager.list_name_plugin() if plugin]
    answers: list[tuple[str, Any]] = []
    for name, plugin in plugins:
        others = [other for _, other in plugins if other is not plugin]
        for value in manager.subset_hook_caller(hook, remove_plugins=others)():
            answers.append((name, value))
    return answers


def _check_owner_hooks(manager: pluggy.PluginManager, owners: set[str]) -> None:
    """Refuse a plugin that answers an owner's hook without offering a transport."""
    for hook in OWNER_HOOKS:
        for impl in getattr(manager.hook, hook).get_hookimpls():
            name = manager.get_name(impl.plugin) or "?"
            if not (impl.wrapper or impl.hookwrapper) and name not in owners:
                raise PluginError(
                    f"plugin {name!r} implements {hook} but offers no transport; "
                    "only a transport's own plugin answers it (others may wrap it)"
                )


def _typed_list(plugin: str, hook: str, value: Any, cls: type[Any]) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, cls) for v in value):
        raise PluginError(f"plugin {plugin!r}: {hook} must return a list of {cls.__name__}")
    return value


def _with_reenter(outcome: SaveOutcome, reenter: Mapping[str, tuple[str, ...]]) -> SaveOutcome:
    """The save, with the secrets it sent back for re-entry (a destination moved)."""
    moved = tuple(k for k, because in reenter.items() if outcome.key in because)
    return replace(outcome, reenter=moved) if moved else outcome


def _check_bindings(fields: Mapping[str, SettingField]) -> None:
    """Refuse a secret bound to a setting nobody declares: its binding would be void."""
    for spec in fields.values():
        unknown = [key for key in spec.bound_to if key not in fields]
        if spec.bound_to and not spec.secret:
            raise PluginError(f"setting {spec.key!r} is not a secret but declares bound_to")
        if unknown:
            raise PluginError(
                f"secret {spec.key!r} of {spec.plugin or 'crm_core'!r} is bound to "
                f"{', '.join(unknown)}, which no enabled plugin declares"
            )


def _with_plugin(spec: SettingField, plugin: str) -> SettingField:
    return spec if spec.plugin else replace(spec, plugin=plugin)
