"""Self-tests of the Entra ID stand-in, driven by the real msal over HTTPS.

Why: the transport's error handling is only as good as the stand-in's fidelity, so
these tests pin what msal 1.39 really does with each answer (error dict vs
exception, token cache, HTTP throttle cache).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msal
import pytest
import requests

from .clock import FakeClock
from .entra import EntraServer, Secret, TokenRegistry
from .tls import TestCA, make_test_ca

TENANT = "7c1f4a52-9d3e-4b8a-a0c6-2f5e8d9b1a34"
CLIENT = "0f3b6c1e-5a7d-4e2b-9c8f-1d2e3f4a5b6c"
SECRET = "Qx8~stand.in-secret-value"
SECRET_ID = "3e1d9c2b-7a6f-4e5d-8c9b-0a1b2c3d4e5f"
SCOPE = ["https://outlook.office365.com/.default"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(Path(tmp_path_factory.mktemp("entra-ca")))


@pytest.fixture(autouse=True)
def trust_test_ca(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    # requests prefers REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE over a session's verify=,
    # and both are set on this machine: point them at the test CA (as a customer with
    # a private CA would).
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca.ca_pem))
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


@pytest.fixture
def registry() -> TokenRegistry:
    return TokenRegistry()


@pytest.fixture
def entra(ca: TestCA, registry: TokenRegistry) -> Iterator[EntraServer]:
    server = EntraServer(ca, registry)
    server.add_tenant(TENANT, domains=["contoso.onmicrosoft.com", "contoso.se"])
    server.add_app(TENANT, CLIENT, secrets=[Secret(SECRET, SECRET_ID)])
    with server:
        yield server


def make_app(
    entra: EntraServer, ca: TestCA, **kwargs: object
) -> msal.ConfidentialClientApplication:
    options: dict[str, object] = {
        "client_credential": SECRET,
        "authority": f"{entra.base_url}/{TENANT}",
        "instance_discovery": False,
        "verify": str(ca.ca_pem),
    }
    options.update(kwargs)
    client_id = str(options.pop("client_id", CLIENT))
    return msal.ConfidentialClientApplication(client_id, **options)


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def test_token_then_cache(entra: EntraServer, ca: TestCA, registry: TokenRegistry) -> None:
    app = make_app(entra, ca)
    first = app.acquire_token_for_client(scopes=SCOPE)
    assert first["token_type"] == "Bearer"
    assert first["expires_in"] == 3599
    assert first["token_source"] == "identity_provider"
    second = app.acquire_token_for_client(scopes=SCOPE)
    assert second["token_source"] == "cache"
    assert second["access_token"] == first["access_token"]
    assert entra.token_requests == 1
    assert entra.oidc_requests == 1

    info = registry.validate(first["access_token"])
    assert info is not None
    assert (info.tenant_id, info.client_id) == (TENANT, CLIENT)
    assert info.roles == ("full_access_as_app",)
    assert info.audience == "https://outlook.office365.com"
    claims = jwt_claims(first["access_token"])
    assert claims["roles"] == ["full_access_as_app"]
    assert claims["tid"] == TENANT

    post = next(r for r in entra.log if r.method == "POST")
    assert post.form["grant_type"] == "client_credentials"
    assert post.form["scope"] == SCOPE[0]
    assert "client_secret" not in post.form and post.has_client_secret


def test_tenant_by_domain_resolves_to_guid(entra: EntraServer, ca: TestCA) -> None:
    app = make_app(entra, ca, authority=f"{entra.base_url}/contoso.se")
    assert app.authority.tenant == TENANT  # taken from the discovered token_endpoint
    assert "access_token" in app.acquire_token_for_client(scopes=SCOPE)
    assert entra.log[-1].path == f"/{TENANT}/oauth2/v2.0/token"


def test_token_lifetime_is_configurable(ca: TestCA, registry: TokenRegistry) -> None:
    with EntraServer(ca, registry, token_lifetime=120) as entra:
        entra.add_tenant(TENANT)
        entra.add_app(TENANT, CLIENT, secrets=[Secret(SECRET)])
        app = make_app(entra, ca)
        assert app.acquire_token_for_client(scopes=SCOPE)["expires_in"] == 120
        # msal treats tokens as expired 5 min early: a 120 s token is never reused.
        assert app.acquire_token_for_client(scopes=SCOPE)["token_source"] == "identity_provider"
        assert entra.token_requests == 2


def test_unknown_tenant_makes_msal_constructor_raise(entra: EntraServer, ca: TestCA) -> None:
    with pytest.raises(ValueError, match="Unable to get authority configuration") as exc:
        make_app(entra, ca, authority=f"{entra.base_url}/fabrikam.se")
    # The Entra error body survives only in the chained exception.
    assert "AADSTS90002" in str(exc.value.__context__)
    assert entra.log[-1].status == 400 and entra.log[-1].error_code == 90002
    assert entra.token_requests == 0

    with pytest.raises(ValueError):
        make_app(entra, ca, authority=f"{entra.base_url}/not-a-tenant")
    assert entra.log[-1].error_code == 900023


def test_unknown_tenant_raw_body(entra: EntraServer) -> None:
    reply = requests.get(f"{entra.base_url}/fabrikam.se/v2.0/.well-known/openid-configuration")
    assert reply.status_code == 400
    body = reply.json()
    assert body["error"] == "invalid_tenant"
    assert body["error_codes"] == [90002]
    assert body["error_description"].startswith("AADSTS90002: Tenant 'fabrikam.se' not found.")
    assert {"timestamp", "trace_id", "correlation_id", "error_uri"} <= body.keys()


EXPIRED = Secret(
    "old-secret-value", "9d8c7b6a-0000-4000-8000-000000000001", datetime(2026, 1, 1, tzinfo=UTC)
)


@pytest.mark.parametrize(
    ("client_id", "secret", "scope", "error", "code", "status"),
    [
        ("11111111-0000-4000-8000-000000000000", SECRET, SCOPE, "unauthorized_client", 700016, 400),
        (CLIENT, SECRET_ID, SCOPE, "invalid_client", 7000215, 401),
        (CLIENT, "wrong-secret", SCOPE, "invalid_client", 7000215, 401),
        (CLIENT, EXPIRED.value, SCOPE, "invalid_client", 7000222, 401),
        (
            CLIENT,
            SECRET,
            ["https://outlook.office365.com/EWS.AccessAsUser.All"],
            "invalid_scope",
            70011,
            400,
        ),
        (CLIENT, SECRET, ["https://nowhere.example/.default"], "invalid_resource", 500011, 400),
    ],
    ids=["unknown-client", "secret-id", "wrong-secret", "expired", "no-default", "bad-resource"],
)
def test_token_errors_come_back_as_dicts(
    entra: EntraServer,
    ca: TestCA,
    client_id: str,
    secret: str,
    scope: list[str],
    error: str,
    code: int,
    status: int,
) -> None:
    entra.add_secret(TENANT, CLIENT, EXPIRED)
    app = make_app(entra, ca, client_id=client_id, client_credential=secret)
    result = app.acquire_token_for_client(scopes=scope)
    assert result["error"] == error
    assert result["error_codes"] == [code]
    assert result["error_description"].startswith(f"AADSTS{code}: ")
    post = [r for r in entra.log if r.method == "POST"][-1]
    assert (post.status, post.error_code) == (status, code)
    if code == 7000215:
        assert "client secret value, not the client secret ID" in result["error_description"]
    if code == 7000222:
        assert "expired" in result["error_description"]


def test_missing_consent(entra: EntraServer, ca: TestCA, registry: TokenRegistry) -> None:
    entra.set_app(TENANT, CLIENT, consented=False)
    result = make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)
    assert (result["error"], result["error_codes"]) == ("invalid_grant", [65001])

    # Permissions added but never admin-consented: a token, without roles.
    entra.set_app(TENANT, CLIENT, consented=True, roles=())
    result = make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)
    info = registry.validate(result["access_token"])
    assert info is not None and info.roles == ()
    assert "roles" not in jwt_claims(result["access_token"])


def test_a_graph_token_carries_no_exchange_api_role(
    entra: EntraServer, ca: TestCA, registry: TokenRegistry
) -> None:
    # The guide's app: full_access_as_app (Office 365 Exchange Online) and a Graph grant.
    entra.set_app(TENANT, CLIENT, roles=("full_access_as_app", "User.Read.All"))
    app = make_app(entra, ca)
    exchange = app.acquire_token_for_client(scopes=SCOPE)["access_token"]
    graph = app.acquire_token_for_client(scopes=["https://graph.microsoft.com/.default"])
    assert jwt_claims(exchange)["roles"] == ["full_access_as_app", "User.Read.All"]
    assert jwt_claims(graph["access_token"])["roles"] == ["User.Read.All"]
    # With its mail permissions granted by RBAC for Applications in Exchange alone, the
    # Graph token has no roles claim at all.
    entra.set_app(TENANT, CLIENT, roles=("full_access_as_app",))
    fresh = make_app(entra, ca).acquire_token_for_client(
        scopes=["https://graph.microsoft.com/.default"]
    )
    assert "roles" not in jwt_claims(fresh["access_token"])
    info = registry.validate(fresh["access_token"])
    assert info is not None and info.roles == ()


def test_http_400_is_replayed_by_msal_for_60_seconds(entra: EntraServer, ca: TestCA) -> None:
    app = make_app(entra, ca, client_credential="wrong-secret")
    assert app.acquire_token_for_client(scopes=SCOPE)["error_codes"] == [7000215]
    before = entra.token_requests
    # msal's HTTP cache answers an identical request that got HTTP 400 for 60 s; the
    # 401 invalid_client is NOT cached, so it is re-sent.
    assert app.acquire_token_for_client(scopes=SCOPE)["error_codes"] == [7000215]
    assert entra.token_requests == before + 1

    scoped = make_app(entra, ca)
    bad_scope = ["https://outlook.office365.com/Mail.Send"]
    assert scoped.acquire_token_for_client(scopes=bad_scope)["error_codes"] == [70011]
    before = entra.token_requests
    assert scoped.acquire_token_for_client(scopes=bad_scope)["error_codes"] == [70011]
    assert entra.token_requests == before  # served from msal's 400 cache


def test_fail_next_503_raises_and_is_replayed(entra: EntraServer, ca: TestCA) -> None:
    app = make_app(entra, ca)
    entra.fail_next(1, status=503)
    with pytest.raises(msal.exceptions.MsalServiceError, match="503"):
        app.acquire_token_for_client(scopes=SCOPE)
    # msal replays a 5xx for Retry-After (default 5 s) without asking the server again.
    with pytest.raises(msal.exceptions.MsalServiceError):
        app.acquire_token_for_client(scopes=SCOPE)
    assert entra.token_requests == 1
    # A fresh app object has its own HTTP cache.
    assert "access_token" in make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)


def test_throttle_next_429(entra: EntraServer, ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    # msal's HTTP throttle cache reads ``time.time()`` through its module's ``time``: give
    # it a clock the test moves, instead of sleeping through the Retry-After. Only msal's
    # view of time changes; what it does with it is its own code.
    clock = FakeClock()
    monkeypatch.setattr(msal.individual_cache, "time", clock)
    app = make_app(entra, ca)
    entra.throttle_next(1, retry_after=2)
    result = app.acquire_token_for_client(scopes=SCOPE)
    assert result["error"] == "temporarily_unavailable"
    assert result["error_codes"] == [90055]
    clock.advance(1)  # still inside Retry-After: replayed from msal's cache
    again = app.acquire_token_for_client(scopes=SCOPE)
    assert again["error"] == "temporarily_unavailable"
    assert entra.token_requests == 1
    clock.advance(1)  # Retry-After is over: msal asks the server again
    assert "access_token" in app.acquire_token_for_client(scopes=SCOPE)
    assert entra.token_requests == 2


def test_instance_discovery_document(entra: EntraServer, ca: TestCA) -> None:
    reply = requests.get(
        f"{entra.base_url}/common/discovery/instance",
        params={
            "api-version": "1.1",
            "authorization_endpoint": f"{entra.base_url}/{TENANT}/oauth2/v2.0/authorize",
        },
    )
    body = reply.json()
    assert body["tenant_discovery_endpoint"] == (
        f"{entra.base_url}/{TENANT}/v2.0/.well-known/openid-configuration"
    )
    assert body["metadata"][0]["preferred_network"] == f"127.0.0.1:{entra.port}"

    # msal accepts a URL as instance_discovery and asks it in the constructor. (Its
    # error paths would still ask login.microsoftonline.com: tests use False.)
    app = make_app(entra, ca, instance_discovery=f"{entra.base_url}/common/discovery/instance")
    assert entra.discovery_requests == 2
    assert "access_token" in app.acquire_token_for_client(scopes=SCOPE)


def test_openid_configuration_points_back_here(entra: EntraServer) -> None:
    doc = requests.get(
        f"{entra.base_url}/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration"
    ).json()
    assert doc["token_endpoint"] == f"{entra.base_url}/{TENANT}/oauth2/v2.0/token"
    assert doc["issuer"] == f"{entra.base_url}/{TENANT}/v2.0"
    assert doc["authorization_endpoint"].startswith(entra.base_url)


def test_registry_revoke_and_expire(
    entra: EntraServer, ca: TestCA, registry: TokenRegistry
) -> None:
    token = make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)["access_token"]
    registry.expire_all()
    assert registry.validate(token) is None
    assert registry.lookup(token) is not None  # known, but expired
    registry.revoke_all()
    assert registry.lookup(token) is None and len(registry) == 0


def test_tokens_expire_on_the_registrys_clock(ca: TestCA) -> None:
    clock = FakeClock()
    registry = TokenRegistry(clock)
    with EntraServer(ca, registry, token_lifetime=600) as entra:
        entra.add_tenant(TENANT)
        entra.add_app(TENANT, CLIENT, secrets=[Secret(SECRET)])
        token = make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)["access_token"]
        assert entra.log[-1].time == clock.time()  # the log is on the same clock
    clock.advance(599)
    assert registry.validate(token) is not None
    clock.advance(1)
    assert registry.validate(token) is None  # expired, as resources will now answer 401
    assert registry.lookup(token) is not None


def test_secret_expiry_follows_the_servers_clock(ca: TestCA) -> None:
    clock = FakeClock()
    with EntraServer(ca, TokenRegistry(clock)) as entra:
        entra.add_tenant(TENANT)
        expires = datetime.fromtimestamp(clock.time(), UTC) + timedelta(days=1)
        entra.add_app(TENANT, CLIENT, secrets=[Secret(SECRET, expires=expires)])
        assert "access_token" in make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)
        clock.advance(timedelta(days=1).total_seconds())
        result = make_app(entra, ca).acquire_token_for_client(scopes=SCOPE)
        assert result["error_codes"] == [7000222]


def test_keep_alive_and_tls(entra: EntraServer, ca: TestCA) -> None:
    with requests.Session() as session:
        for _ in range(3):
            session.get(f"{entra.base_url}/{TENANT}/v2.0/.well-known/openid-configuration")
    assert entra.connections_accepted == 1
    # A client that does not trust the test CA is refused at the TLS layer.
    with requests.Session() as untrusting, pytest.raises(requests.exceptions.SSLError):
        untrusting.trust_env = False  # ignore REQUESTS_CA_BUNDLE: system CAs only
        untrusting.get(f"{entra.base_url}/{TENANT}/v2.0/.well-known/openid-configuration")
    # The server thread records the refused handshake after the client has raised.
    assert entra.wait_for_connection_errors(1) == 1


def test_unknown_path_is_404(entra: EntraServer) -> None:
    assert requests.get(f"{entra.base_url}/{TENANT}/oauth2/token").status_code == 404


def test_expired_client_secret_after_rotation(entra: EntraServer, ca: TestCA) -> None:
    fresh = Secret("rotated-secret", expires=datetime.now(UTC) + timedelta(days=30))
    entra.add_secret(TENANT, CLIENT, fresh)
    assert "access_token" in make_app(
        entra, ca, client_credential=fresh.value
    ).acquire_token_for_client(scopes=SCOPE)
