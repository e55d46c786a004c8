"""A test certificate authority, made by the tests, for the local TLS servers.

Why: the transports verify certificates against a CA bundle (system store, or the
``tls.ca_bundle`` setting a customer uses for a private CA). Tests use the same
setting, pointed at this CA, so no code path turns verification off.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class TestCA:
    """A CA on disk plus helpers to issue server certificates from it."""

    ca: trustme.CA
    directory: Path

    __test__ = False  # not a pytest test class

    @property
    def ca_pem(self) -> Path:
        """Path of the CA certificate (PEM), to use as a CA bundle."""
        return self.directory / "test-ca.pem"

    def server_context(self, *hostnames: str) -> ssl.SSLContext:
        """An SSL server context with a certificate for ``hostnames``."""
        names = hostnames or ("127.0.0.1", "localhost")
        cert = self.ca.issue_cert(*names)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def make_test_ca(directory: Path) -> TestCA:
    """Create a fresh CA whose PEM lives in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    test_ca = TestCA(ca=trustme.CA(organization_name="crm-mail test CA"), directory=directory)
    # Always (re)write: a stale PEM of an earlier CA in the same folder must not win.
    test_ca.ca.cert_pem.write_to_path(str(test_ca.ca_pem))
    return test_ca
