"""The README's way to keep PostgreSQL's password out of ``ps`` and of ``crm.toml``.

Why a test: the README tells operators to put no server, user or password in
``CRM_DATABASE_URL`` but name a libpq service (``postgresql:///?service=crm``) whose
file says where to connect, with the password in a ``.pgpass`` file. This runs
``crm`` exactly so, so the advice is known to work as written through SQLAlchemy and
psycopg. (The test server trusts local connections, so libpq's own reading of the
password file is not what this proves.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import backends

SERVICE = """\
[crm]
host={host}
port={port}
dbname={dbname}
user={user}
"""


@pytest.mark.parametrize("database_url", [backends()[1]], indirect=True)
def test_crm_connects_through_a_service_file(
    database_url: str, run_crm: Any, tmp_path: Path, secret_key: str
) -> None:
    url = make_url(database_url)
    service = tmp_path / "pg_service.conf"
    service.write_text(
        SERVICE.format(host=url.host, port=url.port, dbname=url.database, user=url.username),
        encoding="utf-8",
    )
    env = {
        "CRM_DATABASE_URL": "postgresql:///?service=crm",
        "CRM_SECRET_KEY": secret_key,
        "PGSERVICEFILE": str(service),
    }
    checked = run_crm("check", env=env)
    assert checked.code == 0, checked.output
    assert "the database is ready" in checked.stdout
    # The service file is what decides: pointed at a role that does not exist, it fails.
    service.write_text(SERVICE.format(host=url.host, port=url.port, dbname="x", user="nobody"))
    refused = run_crm("check", env=env)
    assert refused.code == 2 and 'role "nobody"' in refused.stderr
