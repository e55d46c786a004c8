"""TLS trust for our HTTPS sessions: the system store, plus a private CA when set.

Its own module because every HTTPS client of ours (msal's token session, Graph,
exchangelib's sessions) mounts it, and it needs requests, which the settings and
fields of the Microsoft transports do not.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import TYPE_CHECKING, Any

import requests
import requests.adapters

if TYPE_CHECKING:
    from requests.adapters import _HostParams, _PoolKwargs


class TrustAdapter(requests.adapters.HTTPAdapter):
    """An HTTPS adapter that verifies against the system store plus a private CA.

    Why not ``verify=path``: requests lets ``REQUESTS_CA_BUNDLE`` override a session's
    ``verify``, and a path *replaces* the trust store, so a private CA for an
    on-premises Exchange would make Microsoft's public endpoints fail. Here trust is
    the union of the operating system's store (``ssl.create_default_context``), the
    bundle requests chose (``REQUESTS_CA_BUNDLE`` when set) and ``tls.ca_bundle``.
    The adapter is mounted on our own sessions only, so no global state of requests,
    msal or exchangelib is changed. ``verify=False`` is never passed by our code.
    """

    def __init__(self, ca_bundle: str | None = None, **kwargs: Any) -> None:
        self._ca_bundle = ca_bundle
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._context_lock = threading.Lock()
        super().__init__(**kwargs)

    def ssl_context(self, requested: str | None) -> ssl.SSLContext:
        """The verifying context for the bundle requests chose (made once per bundle)."""
        key = requested or ""
        with self._context_lock:
            context = self._contexts.get(key)
            if context is None:
                context = ssl.create_default_context()
                for extra in (requested, self._ca_bundle):
                    if extra:
                        if os.path.isdir(extra):
                            context.load_verify_locations(capath=extra)
                        else:
                            context.load_verify_locations(cafile=extra)
                self._contexts[key] = context
            return context

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host, pool = super().build_connection_pool_key_attributes(request, verify, cert)
        if verify is not False and host.get("scheme") == "https":
            pool.pop("ca_certs", None)
            pool.pop("ca_cert_dir", None)
            pool["ssl_context"] = self.ssl_context(verify if isinstance(verify, str) else None)
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if verify is not False:
            # The trust anchors are in the pool's ssl_context; keep urllib3 from loading
            # certifi into that shared context on every new connection.
            conn.ca_certs = None
            conn.ca_cert_dir = None
