"""Address validation: the guide's "Error validating e-mail", with which address and why."""

from __future__ import annotations

import pytest

from crm_core.errors import MailValidationError
from crm_core.mail.addresses import (
    check_header_text,
    explain_address,
    parse_address,
    validate_addresses,
)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("anna @example.se", "space"),
        ("anna@exam ple.se", "space"),
        ("anna@example.se\u00a0x", "space"),
        ("anna.example.se", "no @"),
        ("anna@", "domain after the @ is missing"),
        ("@example.se", "before the @ is missing"),
        ("anna@localhost", "no dot"),
        ("an(na@example.se", "character"),
        ("anna@exa_mple.se", "character"),
        ("anna..b@example.se", "period"),
        ("", "empty"),
    ],
)
def test_bad_addresses_say_why(raw: str, reason: str) -> None:
    explanation = explain_address(raw)
    assert explanation is not None
    assert reason in explanation.lower()
    with pytest.raises(MailValidationError) as info:
        parse_address(raw)
    assert "Error validating e-mail" in str(info.value)
    assert repr(raw) in str(info.value)


def test_surrounding_whitespace_is_trimmed_not_an_error() -> None:
    assert parse_address("  anna@example.se \n").email == "anna@example.se"


def test_idn_domain_is_kept_and_has_an_ascii_form() -> None:
    address = parse_address("kontakt@bostäder.se")
    assert address.email == "kontakt@bostäder.se"
    assert address.ascii_email == "kontakt@xn--bostder-8wa.se"
    assert not address.needs_smtputf8


def test_unicode_local_part_needs_smtputf8() -> None:
    address = parse_address("åsa@example.se")
    assert address.needs_smtputf8
    assert address.ascii_email is None


def test_unicode_is_normalised_nfc() -> None:
    decomposed = "a\u0308sa@example.se"  # "ä" as a + combining diaeresis
    assert parse_address(decomposed).email == "\u00e4sa@example.se"


def test_every_bad_address_in_a_list_is_reported() -> None:
    good, problems = validate_addresses(
        ["ok@example.se", "bad @example.se", "also-bad@", "fine@example.com"], "to"
    )
    assert [a.email for a in good] == ["ok@example.se", "fine@example.com"]
    assert len(problems) == 2
    assert "bad @example.se" in str(problems[0]) and "space" in str(problems[0])
    assert "also-bad@" in str(problems[1]) and "domain" in str(problems[1])


@pytest.mark.parametrize("text", ["Hello\r\nBcc: victim@example.com", "a\nb", "x\ry", "nul\x00"])
def test_header_injection_is_rejected(text: str) -> None:
    with pytest.raises(MailValidationError, match="line break"):
        check_header_text(text, "subject")
    with pytest.raises(MailValidationError, match="line break"):
        parse_address("anna@example.se", name=text)
