"""A TCP proxy on loopback that adds network latency: each direction arrives half a
round trip late, in order.

Why: on loopback a reply comes back in microseconds, so a client that waits for every
reply looks as fast as one that pipelines. A real SMTP server is tens of milliseconds
away, and then the number of round trips decides the rate. netem is not available to
unprivileged tests, so this proxy stands in for the network: every chunk read from one
side is written to the other side ``rtt / 2`` seconds later, in the order read (one
reader and one writer thread per direction, with a queue of (due time, bytes)). The
connection to the server is made one round trip after the client connects (the TCP
handshake a real network costs). It forwards bytes, so STARTTLS and TLS pass through.

It also counts what a test can assert on without a clock: connections, the most open
at once, and the client's *flights* (a flight is the bytes a client sends before the
server says anything back: a client that waits for each reply makes one flight per
command, a pipelining client one for MAIL, RCPT… and DATA together).

In-process: ``with LatencyProxy(target_port, rtt=0.02) as proxy:`` then connect to
``proxy.port``. As a process (benchmarks)::

    python -m tests.servers.latency --target-port PORT --rtt-ms 20

prints ``READY <port>`` and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

_CHUNK = 65536
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Link:
    """One proxied connection: both sockets and its flight count."""

    client: socket.socket
    server: socket.socket | None = None
    flights: int = 0
    last_from_client: bool = False
    open: bool = True  # until the client has closed its side (or the link broke)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def heard(self, from_client: bool) -> None:
        """A chunk arrived; a client chunk after the server spoke starts a new flight."""
        with self.lock:
            if from_client and not self.last_from_client:
                self.flights += 1
            self.last_from_client = from_client

    def close(self) -> None:
        for sock in (self.client, self.server):
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class LatencyProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port`` with ``rtt`` seconds of
    round-trip time (``rtt / 2`` each way)."""

    def __init__(
        self, target_port: int, rtt: float, target_host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if rtt < 0:
            raise ValueError("rtt must not be negative")
        self.target = (target_host, target_port)
        self.rtt = rtt
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = int(self.listener.getsockname()[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._links: list[_Link] = []
        self._open = 0
        self._peak = 0
        self._threads: list[threading.Thread] = []

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        """Accept connections in a background thread."""
        self._spawn(self._accept, "latency-accept")
        return self

    def stop(self) -> None:
        """Close the listener and every proxied connection; join the threads."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        for thread in list(self._threads):
            thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- counters -----------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Client connections accepted."""
        with self._lock:
            return len(self._links)

    @property
    def peak_connections(self) -> int:
        """The most client connections that were open at the same time."""
        with self._lock:
            return self._peak

    def flights(self) -> list[int]:
        """Each connection's client flights, in the order the connections came."""
        with self._lock:
            links = list(self._links)
        return [link.flights for link in links]

    # --- forwarding ---------------------------------------------------------------------

    def _spawn(self, target: Callable[..., object], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            with self._lock:
                self._links.append(link)
                self._open += 1
                self._peak = max(self._peak, self._open)
            self._spawn(self._serve, "latency-link", link)

    def _serve(self, link: _Link) -> None:
        """Connect upstream one round trip later, then pump both ways until both end."""
        try:
            if self._stop.wait(self.rtt):
                return
            try:
                link.server = socket.create_connection(self.target)
            except OSError:
                return
            link.server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = [
                threading.Thread(target=self._pump, args=(link, True), daemon=True),
                threading.Thread(target=self._pump, args=(link, False), daemon=True),
            ]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
        finally:
            link.close()
            self._client_done(link)

    def _client_done(self, link: _Link) -> None:
        """The client closed its side: the connection no longer counts as open.

        Why not when both directions are done: the close reaches the server half a
        round trip later, and a client that connects again at once (Django's next
        batch) would be counted as having two connections open.
        """
        with self._lock:
            if link.open:
                link.open = False
                self._open -= 1

    def _pump(self, link: _Link, from_client: bool) -> None:
        """Read one direction; a writer thread delivers each chunk half a round trip later."""
        assert link.server is not None
        source, sink = (link.client, link.server) if from_client else (link.server, link.client)
        due: queue.Queue[tuple[float, bytes]] = queue.Queue()
        writer = threading.Thread(target=self._deliver, args=(link, sink, due), daemon=True)
        writer.start()
        while True:
            try:
                chunk = source.recv(_CHUNK)
            except OSError:
                chunk = b""
            if chunk:
                link.heard(from_client)
            due.put((time.monotonic() + self.rtt / 2, chunk))
            if not chunk:
                break
        if from_client:
            self._client_done(link)
        writer.join()

    def _deliver(
        self, link: _Link, sink: socket.socket, due: queue.Queue[tuple[float, bytes]]
    ) -> None:
        while True:
            when, chunk = due.get()
            if self._stop.wait(max(0.0, when - time.monotonic())):
                return
            if not chunk:  # the other side closed: pass the end on, keep reading replies
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            try:
                sink.sendall(chunk)
            except OSError:
                link.close()
                return


# --- process mode -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.servers.latency", description=__doc__)
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--rtt-ms", type=float, required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    with LatencyProxy(args.target_port, args.rtt_ms / 1000, args.target_host, args.port) as proxy:
        sys.stdout.write(f"READY {proxy.port}\n")
        sys.stdout.flush()
        signal.sigwait(stop_signals)
    return 0


class LatencyProcess:
    """A ``python -m tests.servers.latency`` child; ``port`` is where clients connect."""

    def __init__(self, target_port: int, rtt_ms: float, ready_timeout: float = 15.0) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.servers.latency",
                "--target-port",
                str(target_port),
                "--rtt-ms",
                str(rtt_ms),
            ],
            cwd=_REPO_ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"latency proxy did not start: {line!r}")
        self.port = int(line.split()[1])

    def stop(self) -> None:
        """SIGTERM the child and reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
