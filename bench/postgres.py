"""PostgreSQL for the benchmarks: ``CRM_BENCH_POSTGRES_URL``, or a throwaway cluster.

Why a cluster of our own: the numbers must not depend on whatever server happens to
run, and a fresh database per trial keeps one trial's rows (and bloat) out of the
next. The cluster is made like ``.ci/run`` makes its own (initdb + pg_ctl as the
postgres user, on a free port, in a /tmp directory owned by postgres), but keeps
PostgreSQL's durable defaults (fsync on): the benchmark measures what production pays.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.core import free_port, have_postgres_user, log, postgres_binaries

ENV = "CRM_BENCH_POSTGRES_URL"


@dataclass(frozen=True)
class Postgres:
    """An admin URL of a server on which the benchmark may create databases."""

    admin_url: str
    version: str
    how: str

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh, empty database (dropped afterwards); yields its URL."""
        url = self.create()
        try:
            yield url
        finally:
            self.drop(url)

    def create(self) -> str:
        """Create a fresh database; its URL."""
        import psycopg

        name = f"crm_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    def drop(self, url: str) -> None:
        """Drop a database made by :meth:`create`."""
        import psycopg

        name = url.rpartition("/")[2]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _server_version(admin_url: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _as_postgres(command: str) -> None:
    subprocess.run(
        ["su", "postgres", "-s", "/bin/sh", "-c", command],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def postgres() -> Iterator[Postgres | None]:
    """The server to use, or None (with a logged reason) when none can be had."""
    given = os.environ.get(ENV)
    if given:
        yield Postgres(given, _server_version(given), f"given by {ENV}")
        return
    binaries = postgres_binaries()
    if binaries is None or not have_postgres_user() or os.geteuid() != 0:
        log("no PostgreSQL: set CRM_BENCH_POSTGRES_URL, or run as root with the server installed")
        yield None
        return
    root = Path(tempfile.mkdtemp(prefix="crm-bench-pg."))
    root.chmod(0o755)
    os.chown(root, *_postgres_ids())
    data = root / "data"
    port = free_port()
    q = shlex.quote
    _as_postgres(f"{q(str(binaries / 'initdb'))} -D {q(str(data))} -A trust -U postgres")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100"
    _as_postgres(
        f"{q(str(binaries / 'pg_ctl'))} -D {q(str(data))} -l {q(str(root / 'server.log'))} "
        f"-w start -o {q(options)}"
    )
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        yield Postgres(url, _server_version(url), f"throwaway cluster from {binaries}")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _as_postgres(f"{q(str(binaries / 'pg_ctl'))} -D {q(str(data))} -m fast stop")
        subprocess.run(["rm", "-rf", str(root)], check=False)


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid
