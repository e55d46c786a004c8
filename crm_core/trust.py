"""TLS trust for our HTTPS sessions: the system store, plus a private CA when set.

Its own module because every HTTPS client of ours (msal's token session, Graph,
exchangelib's sessions) mounts it, and it needs requests, which the settings and
fields of the Microsoft transports do not.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

import requests.adapters
from urllib3.poolmanager import PoolManager, ProxyManager


class TrustAdapter(requests.adapters.HTTPAdapter):
    """An HTTPS adapter that verifies against the system store plus a private CA.

    Why not ``verify=path``: requests lets ``REQUESTS_CA_BUNDLE`` override a session's
    ``verify``, and a path *replaces* the trust store, so a private CA for an
    on-premises Exchange would make Microsoft's public endpoints fail. Here trust is
    the union of the operating system's store (``ssl.create_default_context``),
    ``tls.ca_bundle`` and the bundle requests chose (``REQUESTS_CA_BUNDLE`` when set),
    in one :class:`ssl.SSLContext` that the adapter gives urllib3's pool manager and
    proxy manager: ``init_poolmanager`` and ``proxy_manager_for`` are the hooks
    requests documents for this, in every version we support (the previous
    ``build_connection_pool_key_attributes`` exists only from requests 2.32, and on
    2.31 ``tls.ca_bundle`` was silently ignored). The adapter is mounted on our own
    sessions only, so no global state of requests, msal or exchangelib is changed.
    ``verify=False`` is never passed by our code.
    """

    def __init__(self, ca_bundle: str | None = None, **kwargs: Any) -> None:
        self.context = ssl.create_default_context()
        self._loaded: set[str] = set()
        self._lock = threading.Lock()
        if ca_bundle:
            self.trust(ca_bundle)
        super().__init__(**kwargs)

    def trust(self, bundle: str) -> None:
        """Add the certificate authorities of ``bundle`` (a PEM file or a folder)."""
        with self._lock:
            if bundle in self._loaded:
                return
            if os.path.isdir(bundle):
                self.context.load_verify_locations(capath=bundle)
            else:
                self.context.load_verify_locations(cafile=bundle)
            self._loaded.add(bundle)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["ssl_context"] = self.context
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager | ProxyManager:
        proxy_kwargs["ssl_context"] = self.context
        manager: PoolManager | ProxyManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        return manager

    def cert_verify(self, conn: Any, url: str, verify: bool | str, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
        if verify is not False and url.lower().startswith("https:"):
            if isinstance(verify, str):  # REQUESTS_CA_BUNDLE: added to the union
                self.trust(verify)
            # The trust anchors are in the shared context; keep urllib3 from loading
            # certifi (or a bundle) into it again on every new connection.
            conn.ca_certs = None
            conn.ca_cert_dir = None
