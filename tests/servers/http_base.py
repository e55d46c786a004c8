"""Shared plumbing for the local HTTPS stand-in servers (Entra ID, EWS).

Why: msal and exchangelib must be driven over real TLS with keep-alive, exactly as
in production, so each stand-in is a real ``ThreadingHTTPServer`` whose accepted
sockets are wrapped with a certificate from the test CA. The TLS handshake runs in
the per-connection thread, so a stalled client cannot block ``accept()``.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self, TypeAlias

from .clock import SYSTEM_CLOCK, Clock
from .tls import TestCA

#: Request headers as the stdlib parses them (case-insensitive ``get``).
Headers: TypeAlias = "Message[str, str]"

__all__ = ["Headers", "HttpsStandIn", "RequestHandler", "Response", "TlsHttpServer"]


@dataclass
class Response:
    """What a stand-in answers; ``drop`` closes the socket without answering."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)
    drop: bool = False
    close: bool = False


class TlsHttpServer(ThreadingHTTPServer):
    """A threading HTTP server that speaks TLS and can cut every open connection.

    Why the connection set: requests keeps connections alive, so handler threads sit
    in ``readline()`` after the last request; ``stop()`` must wake them up.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, app: HttpsStandIn):
        self.ssl_context = context
        self.app = app
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self.accepted = 0
        super().__init__(address, RequestHandler)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, addr

    def track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conn_lock:
            if add:
                self.accepted += 1
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def cut_all(self) -> None:
        """Shut down every open client connection (wakes idle keep-alive threads)."""
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS failures (client rejects our certificate) and client resets are expected in
        # tests; count them instead of printing tracebacks.
        self.app.record_connection_error()


class RequestHandler(BaseHTTPRequestHandler):
    """Reads one HTTP/1.1 request, asks the stand-in for a ``Response``, writes it."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, every answer stalls ~40 ms.
    disable_nagle_algorithm = True
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""
    timeout = 30
    server: TlsHttpServer

    def setup(self) -> None:
        # Per-TCP-connection memory, e.g. an NTLM handshake (IIS binds NTLM to the connection).
        self.connection_state: dict[str, object] = {}
        super().setup()
        self.server.track(self.connection, add=True)
        self.connection.do_handshake()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, add=False)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log; stand-ins keep their own log."""

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        response = self.server.app.handle(
            self.command, self.path, self.headers, body, self.connection_state
        )
        if response.drop:
            # The ambiguous case: the request was read and processed, no answer comes.
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = _dispatch
    do_POST = _dispatch
    do_HEAD = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch


class HttpsStandIn:
    """Base class: lifecycle (start/stop/context manager) and ``base_url``.

    Subclasses implement ``handle()``; it runs in a per-connection thread, so all
    shared state must be guarded by ``self._lock``. ``clock`` is what the stand-in
    reads time from and sleeps on (injected delays); tests pass a ``FakeClock``.
    """

    hostnames: ClassVar[tuple[str, ...]] = ("127.0.0.1", "localhost")

    def __init__(self, ca: TestCA, host: str = "127.0.0.1", *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.ca = ca
        self.host = host
        self.clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._httpd: TlsHttpServer | None = None
        self._thread: threading.Thread | None = None
        self._connection_errors = 0

    # lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Bind a free port on ``host`` and serve in a daemon thread."""
        if self._httpd is not None:
            return
        context = self.ca.server_context(*self.hostnames)
        self._httpd = TlsHttpServer((self.host, 0), context, self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and cut all open keep-alive connections."""
        httpd, thread = self._httpd, self._thread
        if httpd is None:
            return
        httpd.shutdown()
        httpd.cut_all()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT`` (no trailing slash)."""
        return f"https://{self.host}:{self.port}"

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far (keep-alive reuses one for many requests)."""
        return self._httpd.accepted if self._httpd is not None else 0

    @property
    def connection_errors(self) -> int:
        """Connections that failed below HTTP (TLS rejected, reset by client)."""
        with self._lock:
            return self._connection_errors

    def record_connection_error(self) -> None:
        with self._lock:
            self._connection_errors += 1
            self._changed.notify_all()

    def wait_for_connection_errors(self, count: int, timeout: float = 10.0) -> int:
        """Block until ``count`` connections failed below HTTP; the number now.

        Why: the server thread records a refused TLS handshake after the client has
        already raised, so a test waits for the record instead of sleeping.
        """
        with self._lock:
            self._changed.wait_for(lambda: self._connection_errors >= count, timeout)
            return self._connection_errors

    def close_client_connections(self) -> None:
        """Cut every open keep-alive connection (the server keeps listening)."""
        if self._httpd is not None:
            self._httpd.cut_all()

    # request handling ------------------------------------------------------------

    def handle(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes,
        connection_state: dict[str, object],
    ) -> Response:
        """Answer one request; ``connection_state`` lives as long as the TCP connection."""
        raise NotImplementedError
