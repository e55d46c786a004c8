"""The Entra ID and EWS stand-ins in a process of their own, for the Exchange case.

Why a process: the stand-ins parse SOAP with lxml and speak TLS in Python threads; run
in the benchmark's own process they would take the GIL from the code under test.

Control channel: stdin and stdout, one line each way. The process prints
``READY {json}`` (URLs, CA bundle, tenant and app codes, mailbox), then answers each
``stats`` line with one JSON line of counters and stops on ``quit`` or end of input.
The same ``stats`` line is answered on a plain TCP port on 127.0.0.1 (``control_port``
in READY), so a trial process can read the counters just before and after its timed
part without the parent in between.

    python -m bench.ews_process --dir DIR
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.exchange_fixtures import CLIENT, SECRET, TENANT, TENANT_DOMAIN, USER, USER_NAME
from tests.servers.entra import EntraServer, Secret, TokenRegistry
from tests.servers.ews import EWS_PATH, EwsServer
from tests.servers.http_base import RequestHandler
from tests.servers.tls import make_test_ca


def stats(entra: EntraServer, ews: EwsServer) -> dict[str, Any]:
    """Counters since start: token and EWS requests, operations, what was delivered."""
    delivered = [d.internet_message_id for d in ews.delivered]
    return {
        "token_requests": entra.token_requests,
        "entra_other_requests": entra.oidc_requests + entra.discovery_requests,
        "entra_connections": entra.connections_accepted,
        "ews_requests": len(ews.requests),
        "ews_connections": ews.connections_accepted,
        "ops": dict(ews.ops),
        "messages_per_create_item": ews.messages_per_request,
        "delivered": len(delivered),
        "distinct_delivered": len(set(delivered)),
    }


def _control_server(entra: EntraServer, ews: EwsServer) -> socketserver.ThreadingTCPServer:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for raw in self.rfile:
                answer = stats(entra, ews) if raw.strip() == b"stats" else {"error": "unknown"}
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def read_stats(port: int) -> dict[str, Any]:
    """Ask a running stand-in process for its counters over the control port."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"stats\n")
        reply = sock.makefile("rb").readline()
    result: dict[str, Any] = json.loads(reply)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Start both stand-ins, print READY, serve the control channel until told to stop."""
    parser = argparse.ArgumentParser(prog="python -m bench.ews_process")
    parser.add_argument("--dir", type=Path, required=True, help="where the test CA is written")
    args = parser.parse_args(argv)
    # The stand-ins write the headers and the body of an answer in two sends; with
    # Nagle's algorithm on, the body then waits for the client's delayed ACK (~40 ms on
    # Linux) on every request, which no real Exchange does. Off in this process only.
    RequestHandler.disable_nagle_algorithm = True
    ca = make_test_ca(args.dir)
    registry = TokenRegistry()
    entra = EntraServer(ca, registry)
    ews = EwsServer(ca, registry)
    entra.add_tenant(TENANT, domains=[TENANT_DOMAIN])
    entra.add_app(TENANT, CLIENT, secrets=[Secret(SECRET)])
    ews.add_mailbox(USER, tenant_id=TENANT, display_name=USER_NAME)
    with entra, ews:
        control = _control_server(entra, ews)
        ready = {
            "control_port": control.server_address[1],
            "ews_url": ews.base_url + EWS_PATH,
            "entra_url": entra.base_url,
            "ca_pem": str(ca.ca_pem),
            "tenant": TENANT,
            "domain": TENANT_DOMAIN,
            "client_id": CLIENT,
            "secret": SECRET,
            "mailbox": USER,
            "mailbox_name": USER_NAME,
        }
        print("READY " + json.dumps(ready), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            if command == "stats":
                print(json.dumps(stats(entra, ews)), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
        control.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
