"""Certificate credentials for Entra ID: read a PEM or PFX, check it, hand it to msal.

Why a module of its own: Microsoft recommends a certificate instead of a client secret
for production, and the mistakes people make with one (a PEM with only the
certificate, a key from another certificate, a wrong passphrase, an expired
certificate) must be refused on save with what to fix, not found by Entra ID at the
first mail. The certificate's own dates are the truth about its expiry.

The saved text is what the administrator gave: a PEM file (private key and
certificate, the key possibly encrypted) or a PFX/PKCS#12 file, base64-encoded (the
command line encodes a binary file read from standard input). The private key is
decrypted only in memory, for msal.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import date, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from crm_core.secret_box import Secret

_PEM_KEY = re.compile(
    r"-----BEGIN (?:ENCRYPTED |RSA |EC )?PRIVATE KEY-----.+?-----END (?:ENCRYPTED |RSA |EC )?"
    r"PRIVATE KEY-----",
    re.S,
)
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
MAKE_ONE = (
    "make a key and certificate with `openssl req -x509 -newkey rsa:2048 -nodes -keyout "
    "app.key -out app.crt -days 365 -subj /CN=crm-mail` and save both: "
    "`cat app.key app.crt | crm settings set exchange.certificate`"
)


class CertificateProblem(ValueError):
    """The certificate credential cannot be used; the text says what to fix."""


class PassphraseNeeded(CertificateProblem):
    """The private key (or the PFX) is encrypted and no passphrase was given."""


class WrongPassphrase(CertificateProblem):
    """The passphrase does not open the private key (or the PFX)."""


@dataclass(frozen=True)
class CertificateCredential:
    """A checked certificate credential: what msal needs and what people are shown."""

    key_pem: Secret
    """The private key, decrypted, as PKCS#8 PEM (in memory only, never shown)."""
    cert_pem: str
    subject: str
    not_before: datetime
    not_after: datetime
    sha1: str
    """The SHA-1 thumbprint in upper-case hex, as Entra's Certificates list shows it."""

    @property
    def expires(self) -> date:
        """The last day the certificate is valid (UTC)."""
        return self.not_after.date()

    def msal_credential(self) -> dict[str, str]:
        """msal's ``client_credential``: the key with the certificate, so msal signs
        with PS256 and names the key by its SHA-256 thumbprint (``x5t#S256``)."""
        return {"private_key": self.key_pem.reveal(), "public_certificate": self.cert_pem}


def normalise(text: str) -> str:
    """The text to store: a PEM as given (trimmed), a PFX as one line of base64."""
    stripped = text.strip()
    if "-----BEGIN" in stripped:
        return stripped + "\n"
    compact = "".join(stripped.split())
    try:
        der = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        der = b""
    if not der.startswith(b"\x30"):  # a PFX is a DER SEQUENCE
        raise CertificateProblem(
            "this is neither a PEM file (-----BEGIN PRIVATE KEY----- and -----BEGIN "
            f"CERTIFICATE-----) nor a PFX file; {MAKE_ONE}"
        )
    return compact


def load(text: str, passphrase: str | None, today: date | None = None) -> CertificateCredential:
    """Read and check a saved certificate credential, or say what to fix.

    Refused: no certificate, no private key, a key that does not belong to the
    certificate, a wrong or missing passphrase, and (given ``today``) a certificate
    not valid that day. Without ``today`` an expired certificate is read: Entra ID
    refuses it and the expiry warnings name it, while another credential may work.
    """
    stored = normalise(text)
    if stored.startswith("-----") or "-----BEGIN" in stored:
        key, cert = _from_pem(stored, passphrase)
    else:
        key, cert = _from_pfx(base64.b64decode(stored), passphrase)
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise CertificateProblem(
            "the private key does not belong to the certificate (their public keys "
            "differ); save the key that was made together with this certificate"
        )
    credential = CertificateCredential(
        key_pem=Secret(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        ),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        subject=cert.subject.rfc4514_string() or "(no subject)",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sha1=cert.fingerprint(hashes.SHA1()).hex().upper(),
    )
    if today is not None:
        _check_dates(credential, today)
    return credential


def read_certificate(text: str) -> x509.Certificate | None:
    """The certificate of a PEM without its key (no passphrase needed), else None."""
    stored = normalise(text)
    found = _PEM_CERT.search(stored)
    return x509.load_pem_x509_certificate(found.group(0).encode()) if found else None


_Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _from_pem(text: str, passphrase: str | None) -> tuple[_Key, x509.Certificate]:
    certs = _PEM_CERT.findall(text)
    keys = _PEM_KEY.findall(text)
    if not certs:
        raise CertificateProblem(
            "the PEM holds a private key but no certificate; add the certificate "
            "(-----BEGIN CERTIFICATE-----) after the key: `cat app.key app.crt | crm "
            "settings set exchange.certificate`"
        )
    if not keys:
        raise CertificateProblem(
            "the PEM holds a certificate but no private key; the .cer/.crt alone is what "
            "you upload to Entra, the CRM needs the private key as well: `cat app.key "
            "app.crt | crm settings set exchange.certificate`"
        )
    encrypted = "ENCRYPTED" in keys[0] or "Proc-Type: 4,ENCRYPTED" in keys[0]
    if encrypted and not passphrase:
        raise PassphraseNeeded(
            "the private key is encrypted; save its passphrase with `crm settings set "
            "exchange.certificate_passphrase`"
        )
    try:
        key = serialization.load_pem_private_key(
            keys[0].encode(), passphrase.encode() if encrypted and passphrase else None
        )
    except (ValueError, TypeError) as exc:
        if encrypted:
            raise WrongPassphrase(
                "the passphrase does not open the private key; save the right one with "
                "`crm settings set exchange.certificate_passphrase`"
            ) from exc
        raise CertificateProblem(f"the private key cannot be read ({exc})") from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateProblem("Entra ID takes RSA (or EC) keys; make an RSA key of 2048 bits")
    cert = x509.load_pem_x509_certificate(certs[0].encode())
    return key, cert


def _from_pfx(data: bytes, passphrase: str | None) -> tuple[_Key, x509.Certificate]:
    try:
        key, cert, _ = pkcs12.load_key_and_certificates(
            data, passphrase.encode() if passphrase else None
        )
    except ValueError as exc:
        if not passphrase:
            raise PassphraseNeeded(
                "the PFX file is protected by a passphrase; save it with `crm settings set "
                "exchange.certificate_passphrase`"
            ) from exc
        raise WrongPassphrase(
            "the passphrase does not open the PFX file (or the file is damaged); save the "
            "right one with `crm settings set exchange.certificate_passphrase`"
        ) from exc
    if cert is None:
        raise CertificateProblem(
            "the PFX file holds no certificate; export it with its certificate"
        )
    if key is None:
        raise CertificateProblem(
            "the PFX file holds no private key; export it with the private key "
            "(Windows: 'Yes, export the private key')"
        )
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CertificateProblem("Entra ID takes RSA (or EC) keys; make an RSA key of 2048 bits")
    return key, cert


def _public_der(key: object) -> bytes:
    assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_dates(credential: CertificateCredential, today: date) -> None:
    if credential.not_after.date() < today:
        raise CertificateProblem(
            f"the certificate expired on {credential.expires.isoformat()}; make a new one "
            f"and upload its .cer in Entra → Certificates & secrets ({MAKE_ONE})"
        )
    if credential.not_before.date() > today:
        raise CertificateProblem(
            f"the certificate is valid only from {credential.not_before.date().isoformat()}"
        )
