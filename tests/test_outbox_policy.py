"""The outbox's pure policy: back-off with jitter and cap, budget, leases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from crm_core.config import OutboxConfig
from crm_core.mail.policy import (
    backoff_seconds,
    lease_expired,
    lease_until,
    new_token,
    retry_delay,
    state_after,
)
from crm_core.mail.transport import Outcome
from crm_core.models import OutboxState

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("attempt", "step"), [(1, 30), (2, 60), (3, 120), (5, 480)])
def test_backoff_doubles_and_jitter_spans_half_to_full_step(attempt: int, step: float) -> None:
    assert backoff_seconds(attempt, 30, 3600, 0.0) == step / 2
    assert backoff_seconds(attempt, 30, 3600, 0.999999) == pytest.approx(step, rel=1e-5)
    assert step / 2 < backoff_seconds(attempt, 30, 3600, 0.5) < step


def test_backoff_is_capped_and_jitter_clamped() -> None:
    assert backoff_seconds(40, 30, 3600, 1.0) == 3600
    assert backoff_seconds(40, 30, 3600, 7.0) == 3600
    assert backoff_seconds(1, 30, 3600, -1.0) == 15
    assert backoff_seconds(0, 30, 3600, 0.0) == 15


def test_a_servers_retry_after_wins_only_when_longer() -> None:
    config = OutboxConfig(backoff_base_seconds=30, backoff_max_seconds=3600)
    assert retry_delay(1, config, None, 0.0) == 15
    assert retry_delay(1, config, 5.0, 0.0) == 15
    assert retry_delay(1, config, 7200.0, 0.0) == 7200


@pytest.mark.parametrize(
    ("outcome", "attempts", "expected"),
    [
        (Outcome.SENT, 8, OutboxState.SENT),
        (Outcome.PERMANENT, 1, OutboxState.FAILED),
        (Outcome.AMBIGUOUS, 1, OutboxState.UNKNOWN),
        (Outcome.CONFIGURATION, 8, OutboxState.QUEUED),
        (Outcome.TEMPORARY, 1, OutboxState.RETRY),
        (Outcome.TEMPORARY, 7, OutboxState.RETRY),
        (Outcome.TEMPORARY, 8, OutboxState.FAILED),
    ],
)
def test_state_after_an_attempt(outcome: Outcome, attempts: int, expected: OutboxState) -> None:
    assert state_after(outcome, attempts, max_attempts=8) is expected


def test_leases() -> None:
    until = lease_until(NOW, 300)
    assert until == NOW + timedelta(minutes=5)
    assert not lease_expired(until, NOW + timedelta(seconds=299))
    assert lease_expired(until, until)
    assert lease_expired(None, NOW)
    assert new_token() != new_token() and len(new_token()) == 32
