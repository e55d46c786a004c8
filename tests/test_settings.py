"""Settings and secrets: validated on save, encrypted at rest, never shown again."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from crm_core import SecretKeyError, SettingField, SettingValueError, directory, hookimpl
from crm_core.app import Crm
from crm_core.fields import FieldType, Scope
from crm_core.keyring import KeyRing
from crm_core.models import SystemSetting, UserSetting
from crm_core.rotation import reencrypt
from crm_core.secret_box import Secret, SecretBox, create_key_file, load_keys
from crm_core.settings import SettingsStore, private_domains_allowed
from tests.conftest import CrmFactory

CONFIG = """
[product_lines.sales]
plugins = ["maildir_mail", "vault"]
default_transport = "maildir"
"""


class Vault:
    """A test plugin that declares a system secret, a user secret and a date."""

    @hookimpl
    def register_settings(self) -> list[SettingField]:
        return [
            SettingField("vault.client_secret", Scope.SYSTEM, "Secret", FieldType.SECRET),
            SettingField("vault.expires", Scope.SYSTEM, "Expires", FieldType.DATE),
            SettingField("vault.password", Scope.USER, "Password", FieldType.SECRET),
        ]


@pytest.fixture
def make_crm(make_crm: CrmFactory) -> Callable[..., Crm]:
    """The shared factory, with the Vault plugin available."""

    def make(config: str = CONFIG) -> Crm:
        return make_crm(config, extra_plugins=(("vault", Vault()),))

    return make


SECRET = "Zx8~Q.superSecretValue-1234567890abc"


def test_secret_is_encrypted_at_rest_and_never_read_back(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with crm.transaction() as session:
        crm.set_system_setting(session, "vault.client_secret", SECRET)
    with crm.transaction() as session:
        row = session.get(SystemSetting, "vault.client_secret")
        assert row is not None and row.secret
        assert SECRET not in row.value
        views = {v.key: v for v in crm.settings_store().describe_system(session)}
        values = crm.settings_store().system_values(session)
    view = views["vault.client_secret"]
    assert view.state == "saved" and view.value is None
    assert view.fingerprint and len(view.fingerprint) == 8
    assert view.updated_at is not None
    assert SECRET not in repr(view.as_dict())
    secret = values["vault.client_secret"]
    assert isinstance(secret, Secret) and secret.reveal() == SECRET
    assert SECRET not in repr(values) and SECRET not in str(secret)


def test_empty_value_keeps_the_stored_secret(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with crm.transaction() as session:
        crm.set_system_setting(session, "vault.client_secret", SECRET)
    with crm.transaction() as session:
        outcome = crm.set_system_setting(session, "vault.client_secret", "   ")
    assert outcome.kept_secret and not outcome.changed
    with crm.transaction() as session:
        value = crm.settings_store().system_values(session)["vault.client_secret"]
    assert isinstance(value, Secret) and value.reveal() == SECRET


def test_same_secret_again_is_unchanged_and_new_one_replaces(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with crm.transaction() as session:
        first = crm.set_system_setting(session, "vault.client_secret", SECRET)
        again = crm.set_system_setting(session, "vault.client_secret", SECRET)
        other = crm.set_system_setting(session, "vault.client_secret", SECRET + "x")
    assert first.changed and not again.changed and other.changed


def test_user_secret_is_encrypted_too(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with crm.transaction() as session:
        user = directory.add_user(session, "anna@example.se", "Anna", "sales")
        crm.set_user_setting(session, user, "vault.password", SECRET)
    with crm.transaction() as session:
        rows = session.scalars(select(UserSetting)).all()
    assert rows and all(SECRET not in r.value for r in rows)


def test_unknown_key_lists_the_known_ones(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with pytest.raises(SettingValueError) as info, crm.transaction() as session:
        crm.set_system_setting(session, "maildir.pth", "/tmp/x")
    assert "no such system setting" in str(info.value)
    assert "maildir.path" in str(info.value)


def test_invalid_value_writes_nothing(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    with pytest.raises(SettingValueError, match="YYYY-MM-DD"), crm.transaction() as session:
        crm.set_system_setting(session, "vault.client_secret", SECRET)
        crm.set_system_setting(session, "vault.expires", "31/12/2026")
    with crm.transaction() as session:
        assert session.scalars(select(SystemSetting)).all() == []


def test_key_file_is_created_with_mode_0600(tmp_path: Path) -> None:
    key_file = tmp_path / "sub" / "crm-secret.key"
    create_key_file(key_file)
    keys = load_keys(key_file, environ={})
    assert len(keys) == 1
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert load_keys(key_file, environ={}) == keys


def test_a_missing_key_file_is_never_made_on_reading(tmp_path: Path) -> None:
    key_file = tmp_path / "crm-secret.key"
    with pytest.raises(SecretKeyError, match=f"no key file at {key_file}: run `crm init`"):
        load_keys(key_file, environ={})
    assert not key_file.exists()


def test_environment_key_wins_over_key_file(tmp_path: Path) -> None:
    key = Fernet.generate_key().decode()
    assert load_keys(tmp_path / "k", environ={"CRM_SECRET_KEY": key}) == [key.encode()]
    assert not (tmp_path / "k").exists()


def test_wrong_key_says_what_happened() -> None:
    one = SecretBox([Fernet.generate_key()])
    two = SecretBox([Fernet.generate_key()])
    token = one.encrypt(SECRET)
    with pytest.raises(SecretKeyError) as info:
        two.decrypt(token)
    assert "crm secrets rotate" in str(info.value)
    assert SECRET not in str(info.value)


def test_malformed_key_is_refused() -> None:
    with pytest.raises(SecretKeyError, match="44 url-safe base64 characters"):
        SecretBox([b"not-a-key"])


def test_rotation_keeps_secrets_readable(make_crm: Callable[..., Crm], secret_key: str) -> None:
    crm = make_crm(CONFIG)
    with crm.transaction() as session:
        crm.set_system_setting(session, "vault.client_secret", SECRET)
    new_key = Fernet.generate_key()
    rotated = SecretBox([new_key, secret_key.encode()])
    with crm.transaction() as session:
        assert reencrypt(session, rotated) == 1
    only_new = KeyRing(lambda: [new_key])
    with crm.transaction() as session:
        store = SettingsStore(crm.settings_fields(), only_new)
        value = store.system_values(session)["vault.client_secret"]
    assert isinstance(value, Secret) and value.reveal() == SECRET


def test_field_scope_is_enforced(make_crm: Callable[..., Crm]) -> None:
    crm = make_crm(CONFIG)
    store = crm.settings_store()
    assert store.field("maildir.path", Scope.SYSTEM).key == "maildir.path"
    with pytest.raises(SettingValueError, match="no such user setting"):
        store.field("maildir.path", Scope.USER)


def test_allow_private_domains_is_a_system_yes_no_that_defaults_to_off(
    make_crm: Callable[..., Crm],
) -> None:
    crm = make_crm(CONFIG)
    spec = crm.settings_store().field("mail.allow_private_domains", Scope.SYSTEM)
    assert spec.type is FieldType.BOOL and "corp.local" in spec.help
    with crm.transaction() as session:
        assert private_domains_allowed(session) is False
        assert crm.settings_store().system_values(session)["mail.allow_private_domains"] is False
        with pytest.raises(SettingValueError, match="yes/no"):
            crm.set_system_setting(session, "mail.allow_private_domains", "sometimes")
        crm.set_system_setting(session, "mail.allow_private_domains", "yes")
        assert private_domains_allowed(session) is True
