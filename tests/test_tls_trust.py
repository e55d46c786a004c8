"""``tls.ca_bundle`` is what msal's, exchangelib's and Graph's sessions trust.

Why: the TLS adapter relied on a requests method that exists only from requests 2.32,
so with requests 2.31 (which our floor allowed) ``tls.ca_bundle`` was silently ignored
and a private CA could not be trusted. Here the stand-ins' CA is given only through
``tls.ca_bundle``: every variable that could add trust is removed, so a green Test
connection means each session (the token's, then the mailbox's) used the bundle.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.exchange_fixtures import SECRET, ExchangeWorld, steps, with_graph
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import world as world

TRUST_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


@pytest.fixture(autouse=True)
def only_the_setting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No trust from the environment: only tls.ca_bundle can make the stand-ins trusted."""
    for name in TRUST_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.mark.parametrize("api", ["ews", "graph"])
def test_the_bundle_alone_makes_test_connection_green(world: ExchangeWorld, api: str) -> None:
    if api == "graph":
        with with_graph(world):
            report = world.test_connection()
    else:
        report = world.test_connection()
    assert report.summary == "Connected to Exchange", steps(report)
    assert report.ok


@pytest.mark.parametrize("api", ["ews", "graph"])
def test_without_the_bundle_the_certificate_is_refused(world: ExchangeWorld, api: str) -> None:
    world.unset_system("tls.ca_bundle")
    # The secret is bound to the trusted CA (docs/security.md): entered again after the
    # change, so that the token step runs and meets the untrusted certificate.
    world.set_system("exchange.client_secret", SECRET)
    if api == "graph":
        with with_graph(world):
            report = world.test_connection()
    else:
        report = world.test_connection()
    assert not report.ok
    status, detail, fix = steps(report)["token"]
    assert status == "failed"
    assert detail == f"The TLS certificate of {world.entra.base_url} could not be verified."
    assert "tls.ca_bundle" in fix
