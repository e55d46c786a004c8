"""A local HTTPS stand-in for the Microsoft Entra ID (Azure AD) v2.0 token service.

Why: the Exchange transport gets app-only tokens with msal's
``ConfidentialClientApplication.acquire_token_for_client``. Tests drive the real msal
against this server (``authority=f"{base_url}/{tenant}"``, ``instance_discovery=False``,
the test CA as CA bundle), so every request msal makes, and every error it turns into
an error dict or an exception, is the real code path.

The error bodies follow Entra's documented format (``error``, ``error_description``
starting ``AADSTS<code>:``, ``error_codes``, ``timestamp``, ``trace_id``,
``correlation_id``, ``error_uri``); see MicrosoftDocs/entra-docs
``reference-error-codes.md``. Tokens are JWT-shaped but unsigned-in-effect: the shared
``TokenRegistry`` is the source of truth that the EWS (and SMTP) stand-ins consult.

Modelling choices:

* ``add_app(..., consented=False)``: the app has no service principal / consent in the
  tenant at all -> 400 ``invalid_grant`` AADSTS65001 at the token endpoint.
* ``add_app(..., roles=())``: permissions were added but admin consent was not granted.
  Entra still issues a token, just without a ``roles`` claim; the resource (EWS) then
  answers 401. This is the common real-world case.
* A token carries the roles of its resource alone [R: app roles are defined per API]:
  the Office 365 Exchange Online roles (``EXCHANGE_API_ROLES``: ``full_access_as_app``
  and the protocol roles) never reach a Microsoft Graph token. So the guide's app, with
  ``full_access_as_app`` only, gets a Graph token without ``roles``. So does an app whose
  mail permissions Exchange Online grants with RBAC for Applications (``add_app(...,
  roles=())``, the assignments on the Graph stand-in): that grant lives in Exchange, not
  in Entra. The other roles go on every token [choice: the stand-in does not know which
  API defines ``Mail.Send`` and the like, which both APIs have].
* Client credentials without a ``/.default`` scope -> 400 ``invalid_scope`` AADSTS70011
  (newer Entra releases may answer AADSTS1002012 with the same ``error``; branch on
  ``error``, not on the code).
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from secrets import compare_digest, token_bytes
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .clock import SYSTEM_CLOCK, Clock
from .http_base import Headers, HttpsStandIn, Response
from .tls import TestCA

__all__ = [
    "DEFAULT_RESOURCES",
    "EXCHANGE_API_ROLES",
    "EntraServer",
    "Secret",
    "TokenInfo",
    "TokenRecord",
    "TokenRegistry",
]

#: Resources (audiences) that exist in every tenant of this stand-in.
DEFAULT_RESOURCES: tuple[str, ...] = (
    "https://outlook.office365.com",
    "https://outlook.office.com",
    "https://graph.microsoft.com",
)

_GUID_RE = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")


EXCHANGE_API_ROLES = frozenset(
    {
        "full_access_as_app",
        "Exchange.ManageAsApp",
        "SMTP.SendAsApp",
        "IMAP.AccessAsApp",
        "POP.AccessAsApp",
    }
)
"""Application roles that only the Office 365 Exchange Online API defines."""


def roles_for(resource: str, roles: Sequence[str]) -> tuple[str, ...]:
    """The app's roles that a token for ``resource`` carries: no Exchange API role on a
    Microsoft Graph token (Graph's hosts, or its first-party app id)."""
    host = (urlsplit(resource).hostname or resource).lower()
    if "graph" in host or host == "00000003-0000-0000-c000-000000000000":
        return tuple(r for r in roles if r not in EXCHANGE_API_ROLES)
    return tuple(roles)


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
"""RFC 7523: a client that proves itself with a signed JWT (a certificate credential)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _find_certificate(
    header: dict[str, object], certificates: Sequence[x509.Certificate]
) -> tuple[x509.Certificate | None, str]:
    """The uploaded certificate the assertion's header names (x5t#S256, else x5t), and
    the thumbprint it gave, in hex as Entra's message shows it."""
    for name, algorithm in (("x5t#S256", hashes.SHA256()), ("x5t", hashes.SHA1())):
        value = header.get(name)
        if not isinstance(value, str):
            continue
        try:
            wanted = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except ValueError:
            return None, value
        for cert in certificates:
            if cert.fingerprint(algorithm) == wanted:
                return cert, wanted.hex().upper()
        return None, wanted.hex().upper()
    return None, ""


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenInfo:
    """What a resource server learns from validating a bearer token."""

    token: str
    tenant_id: str
    client_id: str
    roles: tuple[str, ...]
    audience: str
    scope: str
    expires_at: float  # epoch seconds, on the registry's clock


class TokenRegistry:
    """Thread-safe token store shared by the Entra stand-in and resource stand-ins.

    Why: the stand-ins do not verify JWT signatures; a token is valid if and only if
    the registry knows it and it has not expired. Tests can revoke or expire every
    token to provoke 401s at the resource without touching the client. Expiry is read
    from ``clock``: with a ``FakeClock``, ``clock.advance(lifetime)`` expires a token.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, TokenInfo] = {}

    def issue(
        self,
        tenant_id: str,
        client_id: str,
        roles: Sequence[str],
        audience: str,
        lifetime: float = 3599,
        scope: str | None = None,
    ) -> TokenInfo:
        """Mint a JWT-shaped access token and remember it."""
        now = int(self.clock.time())
        expires_at = now + lifetime
        header = {"typ": "JWT", "alg": "RS256", "kid": "stand-in"}
        claims: dict[str, object] = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": int(expires_at),
            "appid": client_id,
            "appidacr": "1",
            "idtyp": "app",
            "oid": str(uuid.uuid4()),
            "tid": tenant_id,
            "ver": "1.0",
            "uti": _b64url(token_bytes(12)),
        }
        if roles:  # Entra omits the claim when nothing was consented
            claims["roles"] = list(roles)
        token = ".".join(
            (
                _b64url(json.dumps(header).encode()),
                _b64url(json.dumps(claims).encode()),
                _b64url(token_bytes(64)),
            )
        )
        info = TokenInfo(
            token=token,
            tenant_id=tenant_id,
            client_id=client_id,
            roles=tuple(roles),
            audience=audience,
            scope=scope if scope is not None else f"{audience}/.default",
            expires_at=expires_at,
        )
        with self._lock:
            self._tokens[token] = info
        return info

    def lookup(self, token: str) -> TokenInfo | None:
        """The token's record even if expired (``None`` if unknown/revoked)."""
        with self._lock:
            return self._tokens.get(token)

    def validate(self, token: str) -> TokenInfo | None:
        """The token's record if it is known and not expired, else ``None``."""
        info = self.lookup(token)
        if info is None or self.clock.time() >= info.expires_at:
            return None
        return info

    def revoke_all(self) -> None:
        """Forget every token (resources answer 401 as for a forged token)."""
        with self._lock:
            self._tokens.clear()

    def expire_all(self) -> None:
        """Mark every token expired now (clients still believe they are valid)."""
        past = self.clock.time() - 1
        with self._lock:
            self._tokens = {
                k: TokenInfo(
                    token=v.token,
                    tenant_id=v.tenant_id,
                    client_id=v.client_id,
                    roles=v.roles,
                    audience=v.audience,
                    scope=v.scope,
                    expires_at=min(v.expires_at, past),
                )
                for k, v in self._tokens.items()
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)


# --------------------------------------------------------------------------- directory


@dataclass(frozen=True)
class Secret:
    """A client secret as shown in the portal: its Value, its Secret ID, its expiry."""

    value: str
    secret_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    expires: datetime = field(default_factory=lambda: datetime(2099, 12, 31, tzinfo=UTC))


@dataclass
class _App:
    tenant_id: str
    client_id: str
    secrets: list[Secret]
    roles: tuple[str, ...]
    consented: bool
    display_name: str
    certificates: list[x509.Certificate] = field(default_factory=list)


@dataclass
class _Tenant:
    tenant_id: str
    domains: list[str]
    resources: set[str]


@dataclass(frozen=True)
class TokenRecord:
    """One request seen by the stand-in (client_secret is never recorded)."""

    method: str
    path: str
    form: dict[str, str]
    has_client_secret: bool
    status: int
    error_code: int | None
    time: float


@dataclass
class _Faults:
    fail: int = 0
    fail_status: int = 503
    throttle: int = 0
    retry_after: int = 5


class EntraServer(HttpsStandIn):
    """HTTPS stand-in for ``login.microsoftonline.com`` (v2.0 endpoints).

    Endpoints: ``GET /{tenant}/v2.0/.well-known/openid-configuration``,
    ``POST /{tenant}/oauth2/v2.0/token`` (client credentials) and
    ``GET /common/discovery/instance``. ``{tenant}`` is a tenant GUID or one of its
    domains. All URLs in discovery documents point back at this server. Its clock
    (secret expiry, timestamps) is the registry's unless ``clock`` is given.
    """

    def __init__(
        self,
        ca: TestCA,
        registry: TokenRegistry,
        *,
        token_lifetime: int = 3599,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(ca, clock=registry.clock if clock is None else clock)
        self.registry = registry
        self.token_lifetime = token_lifetime
        self._tenants: dict[str, _Tenant] = {}
        self._apps: dict[tuple[str, str], _App] = {}
        self._log: list[TokenRecord] = []
        self._token_requests = 0
        self._oidc_requests = 0
        self._discovery_requests = 0
        self._faults = _Faults()

    # directory -------------------------------------------------------------------

    def add_tenant(
        self,
        tenant_id: str,
        domains: Iterable[str] = (),
        resources: Iterable[str] = DEFAULT_RESOURCES,
    ) -> None:
        """Register a tenant by GUID, reachable also by each of ``domains``."""
        tenant = _Tenant(tenant_id.lower(), [d.lower() for d in domains], set(resources))
        with self._lock:
            self._tenants[tenant.tenant_id] = tenant

    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        secrets: Sequence[Secret] = (),
        roles: Sequence[str] = ("full_access_as_app",),
        consented: bool = True,
        display_name: str = "CrmExchange",
    ) -> None:
        """Register an app (client) in a tenant, with its secrets and granted roles."""
        app = _App(
            tenant_id.lower(),
            client_id.lower(),
            list(secrets),
            tuple(roles),
            consented,
            display_name,
        )
        with self._lock:
            if app.tenant_id not in self._tenants:
                raise KeyError(f"unknown tenant {tenant_id}")
            self._apps[(app.tenant_id, app.client_id)] = app

    def add_secret(self, tenant_id: str, client_id: str, secret: Secret) -> None:
        """Add a secret to an existing app (secret rotation)."""
        with self._lock:
            self._apps[(tenant_id.lower(), client_id.lower())].secrets.append(secret)

    def add_certificate(self, tenant_id: str, client_id: str, cert_pem: bytes | str) -> None:
        """Upload a certificate's public part to an app (Certificates & secrets →
        Certificates → Upload certificate)."""
        data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        cert = x509.load_pem_x509_certificate(data)
        with self._lock:
            self._apps[(tenant_id.lower(), client_id.lower())].certificates.append(cert)

    def set_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        roles: Sequence[str] | None = None,
        consented: bool | None = None,
    ) -> None:
        """Change an app's granted roles or consent at run time."""
        with self._lock:
            app = self._apps[(tenant_id.lower(), client_id.lower())]
            if roles is not None:
                app.roles = tuple(roles)
            if consented is not None:
                app.consented = consented

    def _find_tenant(self, name: str) -> _Tenant | None:
        key = unquote(name).lower()
        with self._lock:
            if key in self._tenants:
                return self._tenants[key]
            for tenant in self._tenants.values():
                if key in tenant.domains:
                    return tenant
        return None

    # faults ----------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int = 503) -> None:
        """The next ``n`` token POSTs answer ``status`` (msal raises for 5xx)."""
        with self._lock:
            self._faults.fail = n
            self._faults.fail_status = status

    def throttle_next(self, n: int = 1, retry_after: int = 5) -> None:
        """The next ``n`` token POSTs answer 429 ``temporarily_unavailable`` + Retry-After."""
        with self._lock:
            self._faults.throttle = n
            self._faults.retry_after = retry_after

    def clear_faults(self) -> None:
        with self._lock:
            self._faults = _Faults()

    # counters --------------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        """Number of POSTs to any token endpoint."""
        with self._lock:
            return self._token_requests

    @property
    def oidc_requests(self) -> int:
        """Number of OIDC discovery GETs."""
        with self._lock:
            return self._oidc_requests

    @property
    def discovery_requests(self) -> int:
        """Number of ``/common/discovery/instance`` GETs."""
        with self._lock:
            return self._discovery_requests

    @property
    def log(self) -> list[TokenRecord]:
        """Every request, oldest first (a copy)."""
        with self._lock:
            return list(self._log)

    def _record(self, record: TokenRecord) -> None:
        with self._lock:
            self._log.append(record)

    # HTTP ------------------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        connection_state: dict[str, object],
    ) -> Response:
        parts = urlsplit(path)
        segments = [s for s in parts.path.split("/") if s]
        form: dict[str, str] = {}
        if method == "POST":
            form = {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        correlation_id = headers.get("client-request-id") or str(uuid.uuid4())

        if method == "GET" and segments[-3:] == ["v2.0", ".well-known", "openid-configuration"]:
            with self._lock:
                self._oidc_requests += 1
            response = self._openid_configuration("/".join(segments[:-3]), correlation_id)
        elif method == "GET" and segments == ["common", "discovery", "instance"]:
            with self._lock:
                self._discovery_requests += 1
            response = self._instance_discovery(query)
        elif (
            method == "POST" and len(segments) == 4 and segments[1:] == ["oauth2", "v2.0", "token"]
        ):
            with self._lock:
                self._token_requests += 1
            response = self._token(segments[0], form, headers, correlation_id)
        else:
            response = Response(404, b"", "text/html")
        error_code: int | None = None
        if response.content_type.startswith("application/json") and response.status >= 400:
            codes = json.loads(response.body).get("error_codes") or [None]
            error_code = codes[0]
        self._record(
            TokenRecord(
                method=method,
                path=parts.path,
                form={k: v for k, v in form.items() if k != "client_secret"},
                has_client_secret="client_secret" in form or "authorization" in headers,
                status=response.status,
                error_code=error_code,
                time=self.clock.time(),
            )
        )
        return response

    # client assertions (certificate credentials) ----------------------------------

    def _check_assertion(
        self,
        form: dict[str, str],
        client_id: str,
        certificates: Sequence[x509.Certificate],
        tenant: _Tenant,
        tenant_name: str,
        correlation_id: str,
    ) -> Response | None:
        """Entra's checks of a signed client assertion, in its order: the type, the key
        (by thumbprint, among the app's uploaded certificates), the key's expiry, the
        signature, the audience (this tenant's token endpoint), issuer and subject,
        and the time range (five minutes of clock skew allowed). None: accepted."""
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return self._error(
                400,
                "invalid_request",
                7000218 if not form.get("client_assertion_type") else 50027,
                "The request body must contain the following parameter: "
                "'client_assertion_type' with the value "
                f"'{ASSERTION_TYPE}'.",
                correlation_id,
            )
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            return self._assertion_error(
                50027, "JWT token is invalid or malformed.", correlation_id
            )
        cert, thumbprint = _find_certificate(header, certificates)
        if cert is None:
            return self._assertion_error(
                700027,
                "Client assertion contains an invalid signature. [Reason - The key was not "
                f"found., Thumbprint of key used by client: '{thumbprint}', Please visit the "
                "Azure Portal, Graph Explorer or directly use MS Graph to see configured keys "
                f"for app Id '{client_id}'.]",
                correlation_id,
            )
        now = self._now()
        if cert.not_valid_after_utc <= now:
            return self._assertion_error(
                700027,
                "Client assertion contains an invalid signature. [Reason - The key used is "
                f"expired., Thumbprint of key used by client: '{thumbprint}']",
                correlation_id,
            )
        try:
            claims = jwt.decode(
                assertion,
                key=cert.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256", "PS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False,
                         "verify_iat": False},
            )  # fmt: skip
        except jwt.InvalidTokenError:
            return self._assertion_error(
                700027,
                "Client assertion failed signature validation. [Reason - The provided "
                "signature value did not match the expected signature value., Thumbprint of "
                f"key used by client: '{thumbprint}']",
                correlation_id,
            )
        endpoints = {
            f"{self.base_url}/{name}/oauth2/v2.0/token"
            for name in (tenant.tenant_id, unquote(tenant_name).lower(), *tenant.domains)
        }
        audience = claims.get("aud")
        if audience not in endpoints:
            return self._assertion_error(
                50027,
                f"Invalid JWT token. Token audience '{audience}' is not the token endpoint "
                "of this tenant.",
                correlation_id,
            )
        if (
            str(claims.get("iss", "")).lower() != client_id.lower()
            or str(claims.get("sub", "")).lower() != client_id.lower()
        ):
            return self._assertion_error(
                50027,
                "Invalid JWT token. The issuer and subject of the client assertion must be "
                "the client_id.",
                correlation_id,
            )
        return self._check_assertion_time(claims, now, correlation_id)

    def _check_assertion_time(
        self, claims: dict[str, object], now: datetime, correlation_id: str
    ) -> Response | None:
        skew = 300
        stamp = now.timestamp()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int | float) or not isinstance(nbf, int | float):
            return self._assertion_error(
                50027, "Invalid JWT token. The assertion has no expiry.", correlation_id
            )
        if stamp - skew < exp and nbf < stamp + skew:
            return None

        def iso(value: float) -> str:
            return datetime.fromtimestamp(value, UTC).strftime("%m/%d/%Y %H:%M:%S")

        return self._assertion_error(
            700024,
            f"Client assertion is not within its valid time range. Current time: "
            f"{iso(stamp)}, assertion valid from {iso(nbf)}, expiry time of assertion "
            f"{iso(exp)}. Review the documentation at "
            "https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
            correlation_id,
        )

    def _assertion_error(self, code: int, message: str, correlation_id: str) -> Response:
        return self._error(401, "invalid_client", code, message, correlation_id)

    # endpoints -------------------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.time(), UTC)

    def _json(
        self, status: int, payload: object, headers: dict[str, str] | None = None
    ) -> Response:
        base = {"Cache-Control": "no-store, no-cache", "Pragma": "no-cache"}
        base.update(headers or {})
        return Response(
            status, json.dumps(payload).encode(), "application/json; charset=utf-8", base
        )

    def _error(
        self,
        status: int,
        error: str,
        code: int,
        message: str,
        correlation_id: str,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Entra's documented error body."""
        trace_id = str(uuid.uuid4())
        now = self._now()
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        description = (
            f"AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\n"
            f"Correlation ID: {correlation_id}\r\nTimestamp: {stamp}"
        )
        payload = {
            "error": error,
            "error_description": description,
            "error_codes": [code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": f"{self.base_url}/error?code={code}",
        }
        extra = {"x-ms-request-id": trace_id, "client-request-id": correlation_id}
        extra.update(headers or {})
        return self._json(status, payload, extra)

    def _unknown_tenant(self, name: str, correlation_id: str) -> Response:
        if not _GUID_RE.match(name) and "." not in name:
            return self._error(
                400,
                "invalid_request",
                900023,
                f"Specified tenant identifier '{name}' is neither a valid DNS name, "
                "nor a valid external domain.",
                correlation_id,
            )
        return self._error(
            400,
            "invalid_tenant",
            90002,
            f"Tenant '{name}' not found. Check to make sure you have the correct tenant ID "
            "and are signing into the correct cloud. Check with your subscription "
            "administrator, this may happen if there are no active subscriptions for the tenant.",
            correlation_id,
        )

    def _openid_configuration(self, tenant_name: str, correlation_id: str) -> Response:
        tenant = self._find_tenant(tenant_name)
        if tenant is None:
            return self._unknown_tenant(unquote(tenant_name), correlation_id)
        base = f"{self.base_url}/{tenant.tenant_id}"
        doc = {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "private_key_jwt",
                "client_secret_basic",
            ],
            "jwks_uri": f"{self.base_url}/{tenant.tenant_id}/discovery/v2.0/keys",
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": f"{base}/v2.0",
            "request_uri_parameter_supported": False,
            "userinfo_endpoint": "https://graph.microsoft.com/oidc/userinfo",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "http_logout_supported": True,
            "frontchannel_logout_supported": True,
            "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "tid", "roles"],
            "kerberos_endpoint": f"{base}/kerberos",
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
            "cloud_graph_host_name": "graph.windows.net",
            "msgraph_host": "graph.microsoft.com",
            "rbac_url": "https://pas.windows.net",
        }
        return self._json(200, doc)

    def _instance_discovery(self, query: dict[str, str]) -> Response:
        """Shape of Microsoft's answer, with this server as the only cloud instance."""
        tenant = "common"
        auth_endpoint = query.get("authorization_endpoint", "")
        auth_segments = [s for s in urlsplit(auth_endpoint).path.split("/") if s]
        if auth_segments:
            tenant = auth_segments[0]
        netloc = f"{self.host}:{self.port}"
        payload = {
            "tenant_discovery_endpoint": (
                f"{self.base_url}/{tenant}/v2.0/.well-known/openid-configuration"
            ),
            "api-version": query.get("api-version", "1.1"),
            "metadata": [
                {
                    "preferred_network": netloc,
                    "preferred_cache": netloc,
                    "aliases": [netloc, f"localhost:{self.port}"],
                }
            ],
        }
        return self._json(200, payload)

    def _token(
        self, tenant_name: str, form: dict[str, str], headers: Headers, correlation_id: str
    ) -> Response:
        with self._lock:
            faults = self._faults
            if faults.fail > 0:
                faults.fail -= 1
                return self._error(
                    faults.fail_status,
                    "temporarily_unavailable",
                    90033,
                    "A transient error has occurred. Please try again.",
                    correlation_id,
                )
            if faults.throttle > 0:
                faults.throttle -= 1
                return self._error(
                    429,
                    "temporarily_unavailable",
                    90055,
                    "The request is throttled temporarily. Please try after "
                    f"{faults.retry_after} seconds.",
                    correlation_id,
                    {"Retry-After": str(faults.retry_after)},
                )

        tenant = self._find_tenant(tenant_name)
        if tenant is None:
            return self._unknown_tenant(unquote(tenant_name), correlation_id)

        # client_secret_basic is allowed too; msal uses client_secret_post.
        client_id = form.get("client_id", "")
        client_secret = form.get("client_secret")
        auth = headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                user, _, pwd = base64.b64decode(auth[6:]).decode().partition(":")
                client_id, client_secret = client_id or unquote(user), unquote(pwd)
            except ValueError:
                pass

        grant_type = form.get("grant_type", "")
        if not grant_type:
            return self._error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'grant_type'.",
                correlation_id,
            )
        if grant_type != "client_credentials":
            return self._error(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type "
                f"'{grant_type}'. (The stand-in only implements client_credentials.)",
                correlation_id,
            )
        if not client_id:
            return self._error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
                correlation_id,
            )

        with self._lock:
            app = self._apps.get((tenant.tenant_id, client_id.lower()))
            app_secrets = list(app.secrets) if app else []
            roles = app.roles if app else ()
            consented = app.consented if app else False
            display_name = app.display_name if app else ""
            app_certificates = list(app.certificates) if app else []
        tenant_label = tenant.domains[0] if tenant.domains else tenant.tenant_id
        if app is None:
            return self._error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant_label}'. This can happen if the application has not been installed "
                "by the administrator of the tenant or consented to by any user in the tenant. "
                "You may have sent your authentication request to the wrong tenant.",
                correlation_id,
            )
        assertion_type = form.get("client_assertion_type")
        if assertion_type is not None or "client_assertion" in form:
            refused = self._check_assertion(
                form, client_id, app_certificates, tenant, tenant_name, correlation_id
            )
            if refused is not None:
                return refused
        elif not client_secret:
            return self._error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: "
                "'client_assertion' or 'client_secret'.",
                correlation_id,
            )
        matching = [s for s in app_secrets if compare_digest(s.value, client_secret or "")]
        if client_secret is not None and not matching:
            # Wrong secret and "Secret ID pasted instead of Value" get the same answer.
            return self._error(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request "
                "is the client secret value, not the client secret ID, for a secret added to "
                f"app '{client_id}'.",
                correlation_id,
            )
        now = self._now()
        if matching and all(s.expires <= now for s in matching):
            expired_on = max(s.expires for s in matching).strftime("%Y-%m-%d %H:%M:%SZ")
            return self._error(
                401,
                "invalid_client",
                7000222,
                f"The provided client secret keys for app '{client_id}' are expired "
                f"(expired {expired_on}). Visit the Azure portal to create new keys for your "
                "app: https://aka.ms/NewClientSecret, or consider using certificate credentials "
                "for added security: https://aka.ms/certCreds.",
                correlation_id,
            )

        scope = form.get("scope", "")
        if not scope:
            return self._error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'scope'.",
                correlation_id,
            )
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return self._error(
                400,
                "invalid_scope",
                70011,
                f"The provided value for the input parameter 'scope' is not valid. The scope "
                f"{scope} is not valid. Client credential flows must have a scope value with "
                "/.default suffixed to the resource identifier (application ID URI).",
                correlation_id,
            )
        resource = scopes[0][: -len("/.default")]
        if resource.rstrip("/") not in {r.rstrip("/") for r in tenant.resources}:
            return self._error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {resource} was not found in the tenant named "
                f"{tenant_label}. This can happen if the application has not been installed by "
                "the administrator of the tenant or consented to by any user in the tenant. You "
                "might have sent your authentication request to the wrong tenant.",
                correlation_id,
            )
        if not consented:
            return self._error(
                400,
                "invalid_grant",
                65001,
                "The user or administrator has not consented to use the application with ID "
                f"'{client_id}' named '{display_name}'. Send an interactive authorization "
                "request for this user and resource.",
                correlation_id,
            )

        info = self.registry.issue(
            tenant.tenant_id,
            client_id.lower(),
            roles_for(resource, roles),
            resource.rstrip("/"),
            lifetime=self.token_lifetime,
            scope=scopes[0],
        )
        payload = {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": info.token,
        }
        return self._json(200, payload, {"client-request-id": correlation_id})
