"""Shared fixtures: a fresh database per test, on SQLite and on PostgreSQL.

Every test that uses ``database_url`` runs on both backends, each in a database of its
own, dropped afterwards. PostgreSQL needs ``CRM_TEST_POSTGRES_URL``, a server's admin
URL (``scripts/with-postgres`` starts a throwaway cluster and sets it); without it the
PostgreSQL cases are reported as skipped, with the reason, not left out. They carry
the ``postgres`` marker, so ``-m "not postgres"`` deselects them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from crm_core.app import Crm
from crm_core.config import load_config
from crm_core.plugins import installed_plugins

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ENV = "CRM_TEST_POSTGRES_URL"
POSTGRES_SKIP_REASON = (
    "PostgreSQL not available: set CRM_TEST_POSTGRES_URL or run via scripts/with-postgres "
    "(make test does)"
)


def backends() -> list[Any]:
    """Both database backends; PostgreSQL is marked ``postgres`` and skipped without a server."""
    return [
        pytest.param("sqlite", id="sqlite"),
        pytest.param(
            "postgres",
            id="postgres",
            marks=[
                pytest.mark.postgres,
                pytest.mark.skipif(not os.environ.get(POSTGRES_ENV), reason=POSTGRES_SKIP_REASON),
            ],
        ),
    ]


class SchemaTemplates:
    """Databases migrated once per test session, copied for each test that wants one.

    Why: running the migrations for every test was a third of the suite's set-up time.
    A copy (a file for SQLite, ``CREATE DATABASE … TEMPLATE`` on PostgreSQL) is the
    same schema, made by the same migrations, a test-session earlier.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: dict[str, str] = {}

    def sqlite(self) -> Path:
        if "sqlite" not in self.made:
            path = self.folder / "template.db"
            self._migrate(f"sqlite:///{path}")
            self.made["sqlite"] = str(path)
        return Path(self.made["sqlite"])

    def postgres(self, admin_url: str) -> str:
        if "postgres" not in self.made:
            import psycopg

            name = f"crm_template_{uuid.uuid4().hex[:12]}"
            with psycopg.connect(admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            self._migrate(f"{admin_url.rpartition('/')[0]}/{name}")
            self.made["postgres"] = name
        return self.made["postgres"]

    @staticmethod
    def _migrate(url: str) -> None:
        from crm_core import db

        engine = db.make_engine(url)
        try:
            db.upgrade(engine)
        finally:
            engine.dispose()

    def drop(self) -> None:
        if "postgres" in self.made:
            import psycopg

            with psycopg.connect(os.environ[POSTGRES_ENV], autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.made["postgres"]}" WITH (FORCE)')


@pytest.fixture(scope="session")
def schema_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaTemplates]:
    """The session's migrated template databases (made on first use)."""
    templates = SchemaTemplates(tmp_path_factory.mktemp("schema"))
    yield templates
    templates.drop()


def _postgres_database(admin_url: str, template: str) -> Iterator[str]:
    import psycopg

    name = f"crm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    base, _, _ = admin_url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=backends())
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, schema_templates: SchemaTemplates
) -> Iterator[str]:
    """A URL of a fresh database at the newest schema, on each backend.

    ``crm init`` on it says it is up to date; a test of ``init`` itself uses a folder
    of its own (see test_cli_newcomer.py).
    """
    if request.param == "sqlite":
        path = tmp_path / "crm.db"
        shutil.copyfile(schema_templates.sqlite(), path)
        yield f"sqlite:///{path}"
        return
    admin_url = os.environ[POSTGRES_ENV]
    yield from _postgres_database(admin_url, schema_templates.postgres(admin_url))


@pytest.fixture
def secret_key() -> str:
    """A fresh Fernet key for this test."""
    return Fernet.generate_key().decode()


DEFAULT_TEST_CONFIG = """\
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.sales]
plugins = ["exchange_mail", "smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.rentals]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"

[product_lines.boplats]
plugins = ["smtp_mail", "maildir_mail"]
default_transport = "maildir"
"""


@dataclass
class CrmFactory:
    """Makes Crm objects on the test's database, with a config written to disk."""

    tmp_path: Path
    database_url: str
    secret_key: str
    made: list[Crm]

    def __call__(
        self,
        config_text: str = DEFAULT_TEST_CONFIG,
        extra_plugins: tuple[tuple[str, object], ...] = (),
        init: bool = True,
        clock: Callable[[], datetime] | None = None,
    ) -> Crm:
        path = self.tmp_path / "crm.toml"
        path.write_text(config_text, encoding="utf-8")
        env = {"CRM_DATABASE_URL": self.database_url, "CRM_SECRET_KEY": self.secret_key}
        available = (*installed_plugins(), *(name for name, _ in extra_plugins))
        config = load_config(path, available_plugins=available, environ=env)
        crm = Crm(config, environ=env, extra_plugins=extra_plugins, **_clock(clock))
        crm.check_plugins()
        if init:
            crm.init_database()
        self.made.append(crm)
        return crm

    @property
    def env(self) -> dict[str, str]:
        """Environment for a ``crm`` subprocess on the same database and key."""
        return {
            "CRM_DATABASE_URL": self.database_url,
            "CRM_SECRET_KEY": self.secret_key,
            "CRM_CONFIG": str(self.tmp_path / "crm.toml"),
        }


def _clock(clock: Callable[[], datetime] | None) -> dict[str, Callable[[], datetime]]:
    """Crm's own default clock unless a test gives one (a skewed host's, say)."""
    return {"clock": clock} if clock is not None else {}


@pytest.fixture
def make_crm(tmp_path: Path, database_url: str, secret_key: str) -> Iterator[CrmFactory]:
    """A factory of Crm objects on a fresh database; all are closed after the test."""
    factory = CrmFactory(tmp_path, database_url, secret_key, [])
    yield factory
    for crm in factory.made:
        crm.close()


@dataclass
class CliResult:
    """What a ``crm`` command printed and how it exited."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """stdout and stderr together."""
        return self.stdout + self.stderr


@pytest.fixture
def run_crm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Run the ``crm`` command in this process, in ``tmp_path``, as a user would type it.

    In-process (click's CliRunner) for speed: every invocation opens a fresh Crm from
    the configuration and closes it, exactly as a new process would; the environment
    is the given one, with no CRM_ variable of the test runner's leaking in. The few
    things only a real process shows (the README's commands, signals, a real
    terminal's standard input) have subprocess tests of their own (``run_process``).
    """
    from click.testing import CliRunner

    from crm_core.cli import main

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> CliResult:
        full_env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CRM_")}
        full_env.update(env or {})
        with monkeypatch.context() as patch:
            patch.chdir(tmp_path)
            result = CliRunner().invoke(
                main, list(args), input=input, env=full_env, catch_exceptions=False
            )
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def run_process(tmp_path: Path) -> Callable[..., CliResult]:
    """Run the real ``crm`` command in a subprocess, in ``tmp_path``."""

    def run(
        *args: str,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> CliResult:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRM_")}
        full_env.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-m", "crm_core", *args],
            cwd=tmp_path,
            input=input,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run
