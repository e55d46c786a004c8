"""crm.toml: every unknown key, bad value or unknown plugin stops start-up, naming it."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from crm_core.config import Config, load_config
from crm_core.errors import ConfigError

PLUGINS = ("exchange_mail", "smtp_mail", "maildir_mail")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "crm.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load(path: Path, env: dict[str, str] | None = None) -> Config:
    return load_config(path, available_plugins=PLUGINS, environ=env or {})


def test_issue_example_parses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[product_lines.commercial]
plugins = ["exchange_mail", "smtp_mail"]
default_transport = "exchange"
[product_lines.boplats]
plugins = ["smtp_mail"]
default_transport = "smtp"
[outbox]
lease_seconds = 300
backoff_base_seconds = 5
""",
    )
    config = load(path)
    assert config.product_lines["commercial"].plugins == ("exchange_mail", "smtp_mail")
    assert config.product_lines["boplats"].default_transport == "smtp"
    assert config.outbox.lease_seconds == 300
    assert config.outbox.backoff_base_seconds == 5.0
    assert config.database_url == f"sqlite:///{(tmp_path / 'crm.db').as_posix()}"
    assert config.key_file == tmp_path / "crm-secret.key"


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("[databse]\nurl='x'\n", "'databse'", "database, secrets, outbox, mail, product_lines"),
        ("[outbox]\nlease_second = 3\n", "'outbox.lease_second'", "lease_seconds"),
        (
            "[product_lines.sales]\nplugins=[]\ndefault_transprot='smtp'\n",
            "'product_lines.sales.default_transprot'",
            "plugins, default_transport, label",
        ),
        ("[database]\nuri='x'\n", "'database.uri'", "url"),
    ],
)
def test_unknown_key_names_file_key_and_allowed(
    tmp_path: Path, text: str, key: str, allowed: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert allowed in message


def test_unknown_plugin_names_the_installed_ones(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[product_lines.rentals]\nplugins=['smtp_mial']\ndefault_transport='smtp'\n"
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "smtp_mial" in message and "product_lines.rentals.plugins" in message
    assert "exchange_mail, maildir_mail, smtp_mail" in message


def test_unknown_product_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[product_lines.comercial]\nplugins=[]\ndefault_transport='smtp'\n")
    with pytest.raises(ConfigError, match="commercial, sales, rentals, boplats"):
        load(path)


@pytest.mark.parametrize(
    "text",
    [
        "[outbox]\nlease_seconds = -1\n",
        "[outbox]\nlease_seconds = 'long'\n",
        "[outbox]\nmax_attempts = true\n",
        "[product_lines.sales]\nplugins='smtp_mail'\ndefault_transport='smtp'\n",
        "[product_lines.sales]\nplugins=['smtp_mail']\n",
        "not toml at all [",
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    assert str(tmp_path / "crm.toml") in str(info.value)


def test_the_outbox_gives_up_after_a_lifetime_not_a_count_by_default(tmp_path: Path) -> None:
    outbox = load(write(tmp_path, "")).outbox
    assert (outbox.give_up_after, outbox.max_attempts) == (timedelta(days=2), None)


@pytest.mark.parametrize(
    ("written", "lifetime"),
    [
        ('"2d"', timedelta(days=2)),
        ('"36h"', timedelta(hours=36)),
        ('"90m"', timedelta(minutes=90)),
        ('"1d 12h"', timedelta(days=1, hours=12)),
        ('"1w"', timedelta(weeks=1)),
        ('"3600s"', timedelta(hours=1)),
    ],
)
def test_give_up_after_is_a_duration_with_units(
    tmp_path: Path, written: str, lifetime: timedelta
) -> None:
    text = f"[outbox]\ngive_up_after = {written}\nmax_attempts = 20\n"
    outbox = load(write(tmp_path, text)).outbox
    assert (outbox.give_up_after, outbox.max_attempts) == (lifetime, 20)


@pytest.mark.parametrize(
    ("written", "said"),
    [
        ("172800", 'a unit: write "172800s" for seconds, or e.g. "2d" or "36h"'),
        ('"2 days"', 'a duration such as "2d", "36h", "90m" or "1d 12h"'),
        ('"2x"', "units: w, d, h, m, s"),
        ('"0h"', "longer than 0"),
        ('""', 'a duration such as "2d"'),
        ("true", 'a duration such as "2d"'),
    ],
)
def test_a_bad_give_up_after_says_how_to_write_it(tmp_path: Path, written: str, said: str) -> None:
    path = write(tmp_path, f"[outbox]\ngive_up_after = {written}\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: outbox.give_up_after ") and said in message


def test_environment_overrides_database(tmp_path: Path) -> None:
    path = write(tmp_path, "[database]\nurl = 'sqlite:///a.db'\n")
    config = load(path, {"CRM_DATABASE_URL": "postgresql://db.example/crm"})
    assert config.database_url == "postgresql://db.example/crm"
    assert config.key_file == tmp_path / "crm-secret.key"


def test_embedded_default_has_four_product_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CRM_CONFIG", raising=False)
    config = load_config(None, available_plugins=PLUGINS, environ={})
    assert config.source == "<embedded default>"
    assert set(config.product_lines) == {"commercial", "sales", "rentals", "boplats"}
    assert "exchange_mail" not in config.product_lines["boplats"].plugins


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", available_plugins=PLUGINS, environ={})


@pytest.mark.parametrize(
    ("text", "said"),
    [
        # nan compares false with everything: the worker's wait(nan) returned at once.
        ("[outbox]\npoll_seconds = nan\n", "outbox.poll_seconds must be from 0.01 to 3600"),
        ("[outbox]\npoll_seconds = inf\n", "outbox.poll_seconds must be from 0.01 to 3600"),
        ("[outbox]\nbackoff_base_seconds = -inf\n", "outbox.backoff_base_seconds must be from"),
        ("[outbox]\nreconcile_seconds = nan\n", "outbox.reconcile_seconds must be from 1"),
        # A lease past timedelta's range crashed every poll at lease_until().
        ("[outbox]\nlease_seconds = 9223372036854775807\n", "outbox.lease_seconds must be"),
        ("[outbox]\nlease_seconds = 30\n", "longer than the transports' timeouts"),
        ("[outbox]\nbatch_size = 0\n", "outbox.batch_size must be from 1 to 10000"),
        ("[outbox]\nmax_attempts = 0\n", "write e.g. max_attempts = 8"),
        ('[outbox]\ngive_up_after = "99999999999999d"\n', "outbox.give_up_after is far too"),
        ('[outbox]\ngive_up_after = "400d"\n', "from 1s to 365d, got 400d"),
        ("[mail]\nmax_message_bytes = 100\n", "mail.max_message_bytes must be from 1024"),
        ("[mail]\nmax_recipients = 10000000\n", "mail.max_recipients must be from 1 to 100000"),
    ],
)
def test_numbers_are_finite_and_in_range(tmp_path: Path, text: str, said: str) -> None:
    """Each error names the file and the key, gives the range and what to write."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and said in message
    assert "write e.g." in message or "far too long" in message


def test_backoff_max_must_be_at_least_backoff_base(tmp_path: Path) -> None:
    path = write(tmp_path, "[outbox]\nbackoff_base_seconds = 600\nbackoff_max_seconds = 60\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == (
        f"{path}: outbox.backoff_max_seconds (60) must be at least outbox.backoff_base_seconds "
        "(600): the longest wait between two tries cannot be shorter than the first; raise "
        "backoff_max_seconds or lower backoff_base_seconds"
    )


def test_the_cli_refuses_a_nan_with_exit_2(tmp_path: Path) -> None:
    """What an operator sees: one line naming file and key, exit 2, no traceback."""
    path = write(tmp_path, "[outbox]\npoll_seconds = nan\n")
    done = subprocess.run(
        [sys.executable, "-m", "crm_core", "--config", str(path), "outbox", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"Error: {path}: outbox.poll_seconds must be from 0.01")
    assert "Traceback" not in done.stderr
