"""The TLS context that SMTP connections verify their server with: made once, then reused.

Why: ``ssl.create_default_context()`` loads the system trust store. On Debian that
means parsing the whole ca-certificates bundle, about 20 ms of CPU. Each batch opened
up to ``mail.max_connections`` connections, and each connection made its own context.
That cost more CPU than sending the batch's 50 mails: the Postfix-shaped benchmark
(case 9) went at 0.43 × raw smtplib with the system trust store, against about 0.8
with a one-certificate store. A context can be shared by threads and connections.
The worker keeps one per CA bundle in its ``Resources``.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable, Hashable

from crm_core.plugin_api import Resources

ContextSource = Callable[[str | None], ssl.SSLContext]
"""Gives the context for a CA bundle (None: the system trust store alone)."""


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A new context: verification on, the system trust store (honours SSL_CERT_FILE)
    plus the CA bundle."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(cafile=ca_bundle)
    return context


def shared_contexts(resources: Resources) -> ContextSource:
    """Contexts kept in ``resources``, one per CA bundle, made again when it changes."""

    def context(ca_bundle: str | None) -> ssl.SSLContext:
        key = ("smtp_mail", "tls-context", ca_bundle)
        return resources.current(key, _version(ca_bundle), lambda: tls_context(ca_bundle))

    return context


def _version(ca_bundle: str | None) -> Hashable:
    """What the context was made from. The CA bundle's size, time and inode, so a
    replaced or renewed bundle is read again without a restart. The trust store's
    environment variables too. An unreadable bundle raises OSError, as loading it would.

    A change to the system's own trust store (a ca-certificates update) is seen only
    when the worker restarts, as in most servers.
    """
    stamp: tuple[int, int, int] | None = None
    if ca_bundle:
        found = os.stat(ca_bundle)
        stamp = (found.st_size, found.st_mtime_ns, found.st_ino)
    return (stamp, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
