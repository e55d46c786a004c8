"""Certificate credentials, rotation with two credentials, and expiry warnings.

The real msal signs a client assertion with the saved certificate's key; the Entra
stand-in verifies its signature against the certificate uploaded to the app, its
audience and its time range, and answers with Entra's AADSTS errors otherwise.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import jwt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from crm_core import credential_expiry, signals
from crm_core.cli.values import read_file_content
from crm_core.mail.transport import Outcome
from tests.conftest import CliResult, CrmFactory
from tests.exchange_fixtures import (
    CLIENT,
    SECRET,
    TENANT,
    USER,
    ExchangeWorld,
    exchange_world,
    steps,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import world as world
from tests.servers.clock import FakeClock
from tests.servers.entra import ASSERTION_TYPE
from tests.servers.tls import TestCA

TODAY = datetime.now(UTC)


@dataclass(frozen=True)
class Made:
    """A key and self-signed certificate, as `openssl req -x509` makes them."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self, passphrase: str | None = None) -> str:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase.encode())
            if passphrase
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        ).decode()

    def pem(self, passphrase: str | None = None) -> str:
        """`cat app.key app.crt`"""
        return self.key_pem(passphrase) + self.cert_pem

    def pfx(self, passphrase: str) -> bytes:
        return pkcs12.serialize_key_and_certificates(
            b"crm-mail",
            self.key,
            self.cert,
            None,
            serialization.BestAvailableEncryption(passphrase.encode()),
        )

    @property
    def sha1(self) -> str:
        return self.cert.fingerprint(hashes.SHA1()).hex().upper()

    @property
    def x5t_s256(self) -> str:
        """The header msal sends (base64url of the SHA-256 thumbprint, padded)."""
        return base64.urlsafe_b64encode(self.cert.fingerprint(hashes.SHA256())).decode()


def make_certificate(
    valid_from: datetime | None = None, days: int = 365, key: rsa.RSAPrivateKey | None = None
) -> Made:
    """A 2048-bit RSA key and a self-signed certificate valid ``days`` from ``valid_from``."""
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    start = valid_from or TODAY - timedelta(days=1)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crm-mail")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    return Made(key, cert)


def use_certificate(world: ExchangeWorld, made: Made, key: str = "exchange.certificate") -> None:
    """Save the certificate and remove the client secret: the certificate alone."""
    world.set_system(key, made.pem())
    world.unset_system("exchange.client_secret")


def token_posts(world: ExchangeWorld) -> list[dict[str, str]]:
    return [r.form for r in world.entra.log if r.path.endswith("/oauth2/v2.0/token")]


# --- a certificate gets a token ---------------------------------------------------------


def test_certificate_credential_gets_a_token_and_sends(world: ExchangeWorld) -> None:
    made = make_certificate()
    world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)
    use_certificate(world, made)

    report = world.test_connection()
    assert report.ok, report.summary
    status, detail, _ = steps(report)["token"]
    assert status == "ok"
    assert f"with the certificate exchange.certificate (thumbprint {made.sha1}" in detail
    assert "recommends a certificate" not in detail
    (form,) = token_posts(world)[-1:]
    assert form["client_assertion_type"] == ASSERTION_TYPE
    assert jwt.get_unverified_header(form["client_assertion"])["x5t#S256"] == made.x5t_s256
    assert not any(r.has_client_secret for r in world.entra.log)

    assert world.send_one().outcome is Outcome.SENT


def test_a_client_secret_alone_works_and_a_certificate_is_recommended(
    world: ExchangeWorld,
) -> None:
    status, detail, _ = steps(world.test_connection())["token"]
    assert status == "ok" and "with the client secret exchange.client_secret" in detail
    assert "Microsoft recommends a certificate" in detail


def test_an_encrypted_key_and_a_pfx_with_their_passphrases(world: ExchangeWorld) -> None:
    made = make_certificate()
    world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)
    world.unset_system("exchange.client_secret")
    world.set_system("exchange.certificate", made.pem("correct horse"))
    world.set_system("exchange.certificate_passphrase", "correct horse")
    assert world.test_connection().ok

    pfx = read_file_content(made.pfx("pfx pass"))  # what the CLI reads from a binary file
    world.unset_system("exchange.certificate")  # a new passphrase would not open the old
    world.set_system("exchange.certificate_passphrase", "pfx pass")
    world.set_system("exchange.certificate", pfx)
    report = world.test_connection()
    assert report.ok and made.sha1 in steps(report)["token"][1]


# --- a wrong certificate is explained ----------------------------------------------------


def test_a_certificate_not_uploaded_is_explained(world: ExchangeWorld) -> None:
    world.entra.add_certificate(TENANT, CLIENT, make_certificate().cert_pem)  # another one
    made = make_certificate()
    use_certificate(world, made)

    report = world.test_connection()
    status, detail, fix = steps(report)["token"]
    assert status == "failed"
    assert detail.startswith(
        f"Entra ID does not know the certificate exchange.certificate (thumbprint {made.sha1}"
    )
    assert "(AADSTS700027)" in detail and report.summary.endswith(detail)
    assert "Certificates & secrets → Certificates → Upload certificate" in fix
    assert f"its thumbprint there must read {made.sha1}" in fix

    result = world.send_one()
    assert result.outcome is Outcome.CONFIGURATION
    assert result.code == "AADSTS700027"
    assert (
        "does not know the certificate" in result.detail and "Upload certificate" in result.detail
    )


def test_an_expired_uploaded_certificate_is_explained(world: ExchangeWorld) -> None:
    made = make_certificate(days=3)
    world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)
    use_certificate(world, made)
    world.entra.clock = FakeClock(time.time() + 5 * 86400)  # Entra's today: it has expired
    status, detail, fix = steps(world.test_connection())["token"]
    assert status == "failed"
    assert "the certificate has expired (AADSTS700027)" in detail
    assert "Make a new certificate" in fix


# --- the stand-in checks assertions like Entra ---------------------------------------------


def _post(world: ExchangeWorld, ca: TestCA, assertion: str) -> requests.Response:
    return requests.post(
        f"{world.entra.base_url}/{TENANT}/oauth2/v2.0/token",
        data={
            "client_id": CLIENT,
            "grant_type": "client_credentials",
            "scope": "https://outlook.office365.com/.default",
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion,
        },
        verify=str(ca.ca_pem),
        timeout=30,
    )


def _assertion(made: Made, signer: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {
        "aud": claims.pop("aud"),
        "iss": CLIENT,
        "sub": CLIENT,
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
        **claims,
    }
    return jwt.encode(
        payload, signer or made.key, algorithm="PS256", headers={"x5t#S256": made.x5t_s256}
    )


def test_the_stand_in_verifies_signature_audience_and_time(
    world: ExchangeWorld, ca: TestCA
) -> None:
    made = make_certificate()
    world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)
    endpoint = f"{world.entra.base_url}/{TENANT}/oauth2/v2.0/token"

    def codes(response: requests.Response) -> list[int]:
        return list(response.json().get("error_codes", []))

    good = _post(world, ca, _assertion(made, aud=endpoint))
    assert good.status_code == 200 and "access_token" in good.json()

    wrong_audience = _post(world, ca, _assertion(made, aud="https://login.example/token"))
    assert wrong_audience.status_code == 401 and codes(wrong_audience) == [50027]

    now = int(time.time())
    expired = _post(world, ca, _assertion(made, aud=endpoint, iat=now - 1500, exp=now - 900))
    assert expired.status_code == 401 and codes(expired) == [700024]
    assert "not within its valid time range" in expired.json()["error_description"]

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = _post(world, ca, _assertion(made, signer=other_key, aud=endpoint))
    assert codes(forged) == [700027]
    assert "failed signature validation" in forged.json()["error_description"]

    unknown = make_certificate()
    not_uploaded = _post(world, ca, _assertion(unknown, aud=endpoint))
    assert codes(not_uploaded) == [700027]
    thumbprint = unknown.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert (
        f"Thumbprint of key used by client: '{thumbprint}'"
        in (not_uploaded.json()["error_description"])
    )


# --- checked on save ---------------------------------------------------------------------


@pytest.fixture
def shell(
    run_crm: Callable[..., CliResult], make_crm: CrmFactory, ca: TestCA
) -> Iterator[Callable[..., CliResult]]:
    crm = make_crm()
    crm.close()
    with exchange_world(crm, ca, configure=False):

        def run(*args: str, input: str | None = None) -> CliResult:
            return run_crm(*args, input=input, env=make_crm.env)

        yield run


def test_broken_certificates_are_refused_on_save(shell: Callable[..., CliResult]) -> None:
    made = make_certificate()
    other = make_certificate()
    key = "exchange.certificate"
    refusals = {
        "no private key": made.cert_pem,
        "no certificate": made.key_pem(),
        "does not belong to the certificate": other.key_pem() + made.cert_pem,
        "expired on": make_certificate(TODAY - timedelta(days=400), days=300).pem(),
        "neither a PEM file": "not a certificate at all",
    }
    for reason, text in refusals.items():
        result = shell("settings", "set", key, input=text)
        assert result.code == 2, (reason, result.output)
        assert reason in result.stderr, result.stderr
        for secret in (made.key_pem(), other.key_pem()):
            assert secret.splitlines()[1] not in result.output

    # An encrypted key is saved; it cannot be used until its passphrase is saved, and a
    # wrong passphrase is refused.
    saved = shell("settings", "set", key, input=made.pem("s3cret pass"))
    assert saved.code == 0, saved.output
    shown = shell("settings", "show")
    assert "the private key is encrypted" in shown.output
    assert "crm settings set exchange.certificate_passphrase" in shown.output
    wrong = shell("settings", "set", "exchange.certificate_passphrase", input="guess\n")
    assert wrong.code == 2 and "the passphrase does not open the private key" in wrong.stderr
    right = shell("settings", "set", "exchange.certificate_passphrase", input="s3cret pass\n")
    assert right.code == 0, right.output
    assert "encrypted" not in shell("settings", "show").output
    for line in (made.key_pem(), made.key_pem("s3cret pass")):
        assert line.splitlines()[1] not in "".join(r.output for r in (saved, shown, wrong, right))


# --- two credentials side by side ----------------------------------------------------------


def test_newer_credential_first_then_the_older(world: ExchangeWorld) -> None:
    made = make_certificate()
    world.set_system("exchange.certificate", made.pem())  # beside the secret, not uploaded

    report = world.test_connection()
    assert report.ok, report.summary
    status, detail, _ = steps(report)["token"]
    assert status == "ok" and "with the client secret exchange.client_secret" in detail
    status, refused, fix = steps(report)["refused credential"]
    assert status == "warning"
    assert refused.startswith(
        f"the certificate exchange.certificate (thumbprint {made.sha1}, valid until "
    )
    assert "was refused, the client secret exchange.client_secret was used instead" in refused
    assert "AADSTS700027" in refused and "Upload certificate" in fix
    posts = token_posts(world)
    assert "client_assertion" in posts[-2] and "client_assertion" not in posts[-1]

    assert world.send_one().outcome is Outcome.SENT  # the secret carries the mail

    world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)  # now uploaded in Entra
    report = world.test_connection()
    assert "with the certificate exchange.certificate" in steps(report)["token"][1]
    assert "refused credential" not in steps(report)


def test_of_two_certificates_the_newer_is_tried_first(world: ExchangeWorld) -> None:
    older = make_certificate(valid_from=TODAY - timedelta(days=300))
    newer = make_certificate(valid_from=TODAY - timedelta(days=2))
    world.entra.add_certificate(TENANT, CLIENT, older.cert_pem)
    world.set_system("exchange.certificate_2", older.pem())  # the slot does not decide
    use_certificate(world, newer)

    report = world.test_connection()
    assert report.ok
    assert f"thumbprint {older.sha1}" in steps(report)["token"][1]
    assert f"thumbprint {newer.sha1}" in steps(report)["refused credential"][1]
    headers = [jwt.get_unverified_header(f["client_assertion"]) for f in token_posts(world)]
    assert [h["x5t#S256"] for h in headers[-2:]] == [newer.x5t_s256, older.x5t_s256]


# --- expiry warnings: 60, 30, 7 days ---------------------------------------------------------


EXPIRES = datetime(2027, 6, 30, 12, tzinfo=UTC)


def _expiring() -> Made:
    return make_certificate(valid_from=EXPIRES - timedelta(days=365), days=365)


def test_test_connection_warns_by_the_injected_clock(make_crm: CrmFactory, ca: TestCA) -> None:
    made = _expiring()
    today = [EXPIRES - timedelta(days=61)]
    with exchange_world(make_crm(clock=lambda: today[0]), ca) as world:
        world.entra.add_certificate(TENANT, CLIENT, made.cert_pem)
        world.set_system("exchange.certificate", made.pem())
        for days_before, expected in [(61, None), (60, "expires in 60 days"), (7, "in 7 days")]:
            today[0] = EXPIRES - timedelta(days=days_before)
            found = steps(world.test_connection()).get("credential expiry")
            if expected is None:
                assert found is None
            else:
                assert found is not None and found[0] == "warning"
                assert f"the certificate exchange.certificate (thumbprint {made.sha1}) " in found[1]
                assert expected in found[1] and "upload its .cer" in found[1]


def test_crm_check_warns_of_a_secret_and_a_certificate(shell: Callable[..., CliResult]) -> None:
    made = make_certificate(valid_from=TODAY - timedelta(days=300), days=325)  # 25 days left
    expires = (TODAY + timedelta(days=50)).date().isoformat()
    assert shell("settings", "set", "exchange.client_secret", input=SECRET).code == 0  # piped
    assert shell("settings", "set", "exchange.client_secret_expires", expires).code == 0
    assert shell("settings", "set", "exchange.certificate", input=made.pem()).code == 0

    checked = shell("check")
    assert "Warning: exchange.client_secret_expires: the client secret expires in 50 days" in (
        checked.stdout
    )
    assert (
        f"Warning: exchange.certificate: the certificate exchange.certificate (thumbprint "
        f"{made.sha1}) expires in 25 days"
    ) in checked.stdout
    assert SECRET not in checked.output


def _fixed(day: datetime) -> credential_expiry.Clock:
    """The database's clock, stopped at ``day``."""

    def now(session: object) -> datetime:
        return day

    return now


def test_expiry_signal_once_per_threshold(world: ExchangeWorld) -> None:
    heard: list[dict[str, Any]] = []

    def receiver(sender: object, **payload: Any) -> None:
        heard.append(payload)

    made = _expiring()
    world.set_system("exchange.certificate", made.pem())
    world.set_system("exchange.client_secret_expires", "2027-06-30")
    signal = signals.signal_named("credential-expiring")
    signal.connect(receiver)
    try:
        for days_before in (61, 59, 58, 30, 29, 8, 7, 3, -1, -2):
            day = EXPIRES - timedelta(days=days_before)
            credential_expiry.check(world.crm, now=_fixed(day))
    finally:
        signal.disconnect(receiver)

    got = [(p["key"], p["days_left"], p["threshold"]) for p in heard]
    for key in ("exchange.certificate", "exchange.client_secret"):
        assert [g[1:] for g in got if g[0] == key] == [(59, 60), (30, 30), (7, 7), (-1, 0)]
    certificate = next(p for p in heard if p["key"] == "exchange.certificate")
    assert certificate["expires"] == date(2027, 6, 30)
    assert (
        certificate["credential"]
        == f"the certificate exchange.certificate (thumbprint {made.sha1})"
    )


def test_a_late_first_check_sends_only_the_sharpest(world: ExchangeWorld) -> None:
    heard: list[int] = []

    def receiver(sender: object, **payload: Any) -> None:
        heard.append(payload["threshold"])

    world.set_system("exchange.client_secret_expires", "2027-06-30")
    signal = signals.signal_named("credential-expiring")
    signal.connect(receiver)
    try:
        for days_before in (5, 4):
            day = EXPIRES - timedelta(days=days_before)
            credential_expiry.check(world.crm, now=_fixed(day))
    finally:
        signal.disconnect(receiver)
    assert heard == [7]


def test_the_worker_checks_at_start(world: ExchangeWorld) -> None:
    from crm_core.mail.worker import Worker

    heard: list[dict[str, Any]] = []

    def receiver(sender: object, **payload: Any) -> None:
        heard.append(payload)

    soon = (TODAY + timedelta(days=20)).date()
    world.set_system("exchange.client_secret_expires", soon.isoformat())
    signal = signals.signal_named("credential-expiring")
    signal.connect(receiver)
    try:
        Worker(world.crm).run_once()
        Worker(world.crm).run_once()  # a second worker (or a restart) sends nothing new
    finally:
        signal.disconnect(receiver)
    assert [(p["key"], p["threshold"], p["expires"]) for p in heard] == [
        ("exchange.client_secret", 30, soon)
    ]
    assert USER  # the world's user exists; nothing was queued
