"""The outbox's pure policy: back-off with jitter and cap, budget, leases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from crm_core.config import OutboxConfig
from crm_core.mail.policy import (
    backoff_seconds,
    duration_text,
    lease_expired,
    lease_until,
    new_token,
    next_attempt_at,
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


LIFETIME = OutboxConfig()  # give_up_after 2 days, no max_attempts
HOUR = timedelta(hours=1)


@pytest.mark.parametrize(
    ("outcome", "attempts", "age", "expected"),
    [
        (Outcome.SENT, 80, 3 * LIFETIME.give_up_after, OutboxState.SENT),
        (Outcome.PERMANENT, 1, HOUR, OutboxState.FAILED),
        (Outcome.AMBIGUOUS, 1, HOUR, OutboxState.UNKNOWN),
        (Outcome.CONFIGURATION, 80, 3 * LIFETIME.give_up_after, OutboxState.QUEUED),
        (Outcome.TEMPORARY, 1, HOUR, OutboxState.RETRY),
        (Outcome.TEMPORARY, 8, HOUR, OutboxState.RETRY),  # a one-hour outage: waited out
        (Outcome.TEMPORARY, 60, timedelta(days=2) - timedelta(seconds=1), OutboxState.RETRY),
        (Outcome.TEMPORARY, 2, timedelta(days=2), OutboxState.FAILED),
    ],
)
def test_state_after_an_attempt(
    outcome: Outcome, attempts: int, age: timedelta, expected: OutboxState
) -> None:
    assert state_after(outcome, attempts, LIFETIME, age) is expected


def test_max_attempts_is_an_extra_bound_when_set() -> None:
    counted = OutboxConfig(max_attempts=8)
    assert state_after(Outcome.TEMPORARY, 7, counted, HOUR) is OutboxState.RETRY
    assert state_after(Outcome.TEMPORARY, 8, counted, HOUR) is OutboxState.FAILED
    assert state_after(Outcome.TEMPORARY, 1, counted, 2 * LIFETIME.give_up_after) is (
        OutboxState.FAILED
    )


def test_the_next_attempt_comes_at_the_lifetimes_end_at_the_latest() -> None:
    created = NOW - timedelta(days=2) + timedelta(minutes=10)
    assert next_attempt_at(NOW, created, 60.0, LIFETIME) == NOW + timedelta(minutes=1)
    assert next_attempt_at(NOW, created, 3600.0, LIFETIME) == NOW + timedelta(minutes=10)


@pytest.mark.parametrize(
    ("span", "words"),
    [
        (timedelta(days=2), "2 days"),
        (timedelta(days=2, hours=1, minutes=5), "2 days 1 hour"),
        (timedelta(days=1, minutes=5), "1 day"),
        (timedelta(minutes=90), "1 hour 30 minutes"),
        (timedelta(seconds=45.4), "45 seconds"),
        (timedelta(0), "0 seconds"),
    ],
)
def test_durations_read_as_words(span: timedelta, words: str) -> None:
    assert duration_text(span) == words


def test_leases() -> None:
    until = lease_until(NOW, 300)
    assert until == NOW + timedelta(minutes=5)
    assert not lease_expired(until, NOW + timedelta(seconds=299))
    assert lease_expired(until, until)
    assert lease_expired(None, NOW)
    assert new_token() != new_token() and len(new_token()) == 32
