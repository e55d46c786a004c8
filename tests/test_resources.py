"""Resources: the per-Crm cache of clients, keyed per account and closed when replaced."""

from __future__ import annotations

from crm_core.entra import CLIENT_SECRET, AppCredentials, Credential
from crm_core.mail.transport import Resources
from crm_core.mail.worker import Worker
from crm_core.secret_box import Secret
from crm_core.tokens import token_client
from tests.conftest import CrmFactory


class Client:
    """Something with a connection to close."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_client_whose_settings_changed_is_closed_when_replaced() -> None:
    resources = Resources()
    first = resources.current(("acme", 1), "v1", lambda: Client("v1"))
    assert resources.current(("acme", 1), "v1", lambda: Client("again")) is first
    other = resources.current(("acme", 2), "v1", lambda: Client("v1"))  # per account
    second = resources.current(("acme", 1), "v2", lambda: Client("v2"))
    assert second is not first and second.version == "v2"
    assert first.closed and not second.closed and not other.closed
    resources.close()
    assert second.closed and other.closed


def test_a_new_client_secret_replaces_the_token_client() -> None:
    resources = Resources()
    creds = AppCredentials(
        "https://login.example", "contoso.se", "client", (Credential(CLIENT_SECRET, Secret("one")),)
    )
    first = token_client(resources, creds)
    assert token_client(resources, creds) is first  # one token for every mailbox
    renewed = AppCredentials(
        "https://login.example", "contoso.se", "client", (Credential(CLIENT_SECRET, Secret("two")),)
    )
    second = token_client(resources, renewed)
    assert second is not first and second.creds.secret == Secret("two")
    assert resources.get(("entra", "https://login.example", "contoso.se", "client")) is second


def test_the_worker_sizes_shared_pools_to_its_threads(make_crm: CrmFactory) -> None:
    crm = make_crm()
    assert crm.resources.pool_size == 1
    Worker(crm, concurrency=8)
    assert crm.resources.pool_size == 8
