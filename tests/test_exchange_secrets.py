"""No secret and no token ever reaches a log, an error text or a report.

Every path that touches a credential runs here with logging at DEBUG for every logger
(exchangelib and requests-oauthlib print request headers at DEBUG; the plugin masks
them): sends with a fresh token, a token evicted after 401, a wrong and an expired
secret, Test connection, on-premises NTLM and Basic with the user's password.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import pytest

from crm_core.mail.transport import ConnectionReport, SendResult
from tests.exchange_fixtures import (
    EXPIRED_SECRET,
    ONPREM_PASSWORD,
    ONPREM_USER,
    SECRET,
    SECRET_ID,
    SECRETS,
    ExchangeWorld,
    go_onprem,
    make_message,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.exchange_fixtures import world as world

# Every token the Entra stand-in issues starts with this JWT header segment.
TOKEN_HEADER = (
    base64.urlsafe_b64encode(json.dumps({"typ": "JWT", "alg": "RS256", "kid": "stand-in"}).encode())
    .rstrip(b"=")
    .decode()
)
BASIC_CREDENTIALS = base64.b64encode(f"{ONPREM_USER}:{ONPREM_PASSWORD}".encode()).decode()


def texts(items: list[SendResult | ConnectionReport]) -> str:
    out = []
    for item in items:
        out.append(repr(item))
        if isinstance(item, ConnectionReport):
            out.extend(f"{s.detail} {s.fix}" for s in item.steps)
    return "\n".join(out)


def test_no_secret_or_token_in_logs_or_texts(
    world: ExchangeWorld,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[SendResult | ConnectionReport] = []

    seen += world.send([make_message(1), make_message(2)])
    world.registry.revoke_all()  # 401 → evict → new token → retry
    seen += world.send([make_message(3)])
    seen.append(world.test_connection())
    world.set_system("exchange.client_secret", SECRET_ID)
    seen += world.send([make_message(4)])
    world.set_system("exchange.client_secret", EXPIRED_SECRET)
    seen.append(world.test_connection())
    world.set_system("exchange.client_secret", SECRET)
    world.ews.drop_after_request(3)
    seen += world.send([make_message(5)])

    monkeypatch.setenv("NTLM_USER_FILE", str(go_onprem(world, tmp_path / "ntlm")))
    seen += world.send([make_message(6, sender=ONPREM_USER)], email=ONPREM_USER)
    world.set_system("exchange.onprem_auth", "basic")
    seen += world.send([make_message(7, sender=ONPREM_USER)], email=ONPREM_USER)
    seen.append(world.test_connection(ONPREM_USER))
    world.set_user("exchange.password", "Wrong-" + ONPREM_PASSWORD, email=ONPREM_USER)
    seen.append(world.test_connection(ONPREM_USER))

    # The paths really ran, and the libraries really logged request headers.
    assert world.entra.token_requests >= 3
    assert {r.auth_kind for r in world.ews.requests} >= {"Bearer", "NTLM", "Basic"}
    logged = caplog.text
    assert "Request headers" in logged and "'Authorization': '********'" in logged

    everything = logged + "\n" + texts(seen)
    for secret in (*SECRETS, SECRET_ID, BASIC_CREDENTIALS, TOKEN_HEADER):
        assert secret not in everything, secret
