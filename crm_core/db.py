"""Engine, sessions and migrations.

SQLite is the embedded default: WAL journal (readers do not block the writer), a busy
timeout and foreign keys on. A transaction is a writing one unless its caller says it
only reads (:data:`READ_ONLY`, ``Crm.transaction(write=False)``):

- A writing transaction starts with ``BEGIN IMMEDIATE``, so that the single writer is
  chosen at the start of a transaction, not half-way through (which would otherwise
  fail with "database is locked" on upgrade from a read lock). That makes the outbox
  claim correct with many worker threads or processes on one SQLite file.
- A reading transaction starts with a plain (deferred) ``BEGIN`` under
  ``PRAGMA query_only``: it takes no write lock, so ``crm outbox list`` or a dry run
  never makes the worker wait, and a write in it by mistake fails at once ("attempt
  to write a readonly database") instead of now and then, under load, on upgrade. On
  PostgreSQL it is a ``READ ONLY`` transaction, so the mistake fails there too.

Why writing is the default: a caller that forgets to say is slower, never wrong.
PostgreSQL is for production and many workers (``CRM_DATABASE_URL``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from crm_core.errors import ConfigError, DatabaseError
from crm_core.files import private_file, private_folder
from crm_core.migrations import REVISIONS

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from sqlalchemy.dialects import postgresql, sqlite

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
READ_ONLY = "crm_read_only"
"""The execution option that marks a connection's transactions as reading only."""
_QUERY_ONLY = "crm_query_only"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings this project relies on (no connection yet)."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"the database URL is not valid: {exc}") from exc
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return create_engine(url, pool_pre_ping=True)
    except (NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"the database URL {where(parsed)} names a database this installation cannot "
            f"use ({exc}); use sqlite:///path/crm.db or postgresql://user@host/name"
        ) from exc


def where(url: URL | str) -> str:
    """The database's URL as shown to people: never the password."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database, or in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database or "")


def _create_private(url: str) -> None:
    """Make a missing SQLite database file 0600 before SQLite makes it 0644.

    Only in a folder that exists: a missing folder is ``crm init``'s to make. A URI
    filename (``?uri=true``) is left to SQLite.
    """
    path = sqlite_file(url)
    if path is None or "uri" in make_url(url).query or not path.parent.is_dir():
        return
    private_file(path)


def read_only(engine: Engine) -> Engine:
    """``engine`` for transactions that only read (same pool; see the module's words)."""
    options: dict[str, Any] = {READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        options["postgresql_readonly"] = True
    return engine.execution_options(**options)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "do_connect")
    def _before_connect(*_args: Any) -> None:
        _create_private(url)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        dbapi_conn.isolation_level = None  # let SQLAlchemy's BEGIN below take over
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()
        record.info[_QUERY_ONLY] = False

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        reading = bool(conn.get_execution_options().get(READ_ONLY))
        if conn.info.get(_QUERY_ONLY) is not reading:
            conn.exec_driver_sql(f"PRAGMA query_only={'ON' if reading else 'OFF'}")
            conn.info[_QUERY_ONLY] = reading
        conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")

    return engine


def rowcount(result: Any) -> int:
    """How many rows an UPDATE or DELETE touched (typed for mypy)."""
    return int(cast(CursorResult[Any], result).rowcount)


def upsert(session: Session, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT into ``table`` that can say ``ON CONFLICT``: the session's dialect's own.

    Imported when asked: a worker on SQLite need not load PostgreSQL's dialect, which
    pulls in its asyncpg variant and asyncio (start-up, docs/performance.md case 8).
    """
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgres_insert

        return postgres_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded objects usable after commit (CLI prints them)."""
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig  # only `crm init` pays for Alembic

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Create or upgrade the schema to the newest revision; idempotent.

    Returns (revision before, revision after). Refuses a database from a newer
    crm-mail, whose schema this code does not know.
    """
    path = sqlite_file(str(engine.url))
    if path is not None:
        private_folder(path.parent)
    before = current_revision(engine)
    if before is not None and before not in REVISIONS:
        raise DatabaseError(newer_schema(engine, before))
    if before == head_revision():
        return before, before  # up to date: Alembic need not even be loaded
    from alembic import command  # only `crm init` pays for Alembic

    command.upgrade(_alembic_config(engine), "head")
    return before, head_revision()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at, or None for an empty database."""
    with read_only(engine).connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        found = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        return str(found) if found is not None else None


def head_revision() -> str:
    """The newest schema revision this code knows."""
    return REVISIONS[-1]


def newer_schema(engine: Engine, revision: str) -> str:
    """The words for a database made by a newer crm-mail."""
    return (
        f"the database at {where(engine.url)} has schema {revision}, which is newer than "
        f"this crm-mail knows (up to {head_revision()}); upgrade crm-mail before using it. "
        "Nothing was changed"
    )


def check_ready(engine: Engine) -> None:
    """Refuse, in words, a database that is missing, unreachable, foreign, old or new.

    Why before any command touches it: a missing SQLite file would otherwise be created
    empty, and every other case ends in a driver's traceback. Only ``crm init`` creates
    or upgrades the database.
    """
    path = sqlite_file(str(engine.url))
    if path is not None and not path.exists():
        raise DatabaseError(f"no database at {path}: run `crm init`")
    if path is not None and path.is_dir():
        raise DatabaseError(f"{path} is a folder, not a database file; check the database URL")
    try:
        revision = current_revision(engine)
    except DBAPIError as exc:
        raise DatabaseError(unreachable(engine, exc)) from exc
    if revision is None:
        raise DatabaseError(f"the database at {where(engine.url)} is empty: run `crm init`")
    if revision not in REVISIONS:
        raise DatabaseError(newer_schema(engine, revision))
    if revision != head_revision():
        raise DatabaseError(
            f"the database at {where(engine.url)} has schema {revision}; this crm-mail "
            f"needs {head_revision()}: run `crm init` to upgrade it"
        )


def driver_said(exc: DBAPIError) -> str:
    """The driver's own first line: not SQLAlchemy's text with the statement and its
    parameters, which may hold mail addresses and replies (never for a log or a user)."""
    lines = str(exc.orig).strip().splitlines() if exc.orig else []
    return lines[0] if lines else type(exc.orig or exc).__name__


def unreachable(engine: Engine, exc: DBAPIError) -> str:
    """Why the database could not be used, from the driver's own first line."""
    reason = driver_said(exc)
    path = sqlite_file(str(engine.url))
    if path is not None and "not a database" in reason:
        return f"{path} is not a crm-mail database ({reason}); check the database URL"
    return (
        f"cannot use the database at {where(engine.url)}: {reason}; check CRM_DATABASE_URL "
        "or [database] url in crm.toml"
    )
