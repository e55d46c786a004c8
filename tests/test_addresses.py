"""Address validation: the guide's "Error validating e-mail", with which address and why."""

from __future__ import annotations

import email_validator
import pytest

from crm_core.errors import MailValidationError
from crm_core.mail.addresses import (
    check_header_text,
    explain_address,
    parse_address,
    special_domain,
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


@pytest.mark.parametrize("text", ["Hello\r\nBcc: victim@example.com", "a\nb", "x\ry"])
def test_header_injection_is_rejected(text: str) -> None:
    with pytest.raises(MailValidationError, match="line break"):
        check_header_text(text, "subject")
    with pytest.raises(MailValidationError, match="line break"):
        parse_address("anna@example.se", name=text)


@pytest.mark.parametrize(
    ("char", "named"),
    [
        ("\x00", "U+0000 null"),
        ("\x0b", "U+000B vertical tab"),
        ("\x0c", "U+000C form feed"),
        ("\x1b", "U+001B escape"),
        ("\x1c", "U+001C file separator"),
        ("\x1f", "U+001F unit separator"),
        ("\x7f", "U+007F delete"),
        ("\x85", "U+0085 next line"),
        ("\x9b", "U+009B C1 control"),
        ("\u2028", "U+2028 line separator"),
    ],
)
def test_a_control_character_is_refused_by_name(char: str, named: str) -> None:
    """Python's email package reads VT, FF, \\x1c-\\x1e, NEL and U+2028 as line breaks and
    refuses a subject or file name holding one, mid-batch; the others reach screens."""
    with pytest.raises(MailValidationError) as caught:
        check_header_text(f"Visning{char}imorgon", "subject")
    (problem,) = caught.value.problems
    assert problem.key == "subject"
    assert problem.message == f"contains a control character ({named}); remove it"
    _, (bad,) = validate_addresses([f"Per{char}Persson <per@example.se>"], "to")
    assert bad.message == f"contains a control character ({named}); remove it"


def test_a_tab_is_blank_but_a_vertical_tab_is_refused() -> None:
    check_header_text("Visning\timorgon", "subject")  # a header may fold at a tab
    assert parse_address("Per\tPersson <per@example.se>").name == "Per\tPersson"
    with pytest.raises(MailValidationError, match="U\\+000B vertical tab"):
        parse_address("per@example.se", name="Per\x0bPersson")


# --- display names ("Per Persson <per@example.se>") ---------------------------------


@pytest.mark.parametrize(
    ("raw", "email", "name"),
    [
        ("Per Persson <per@example.se>", "per@example.se", "Per Persson"),
        ('"Persson, Per" <per@example.se>', "per@example.se", "Persson, Per"),
        ('"Per \\"P\\" Persson" <per@example.se>', "per@example.se", 'Per "P" Persson'),
        ("  Åsa Öberg  < asa@Example.se >  ", "asa@example.se", "Åsa Öberg"),
        ("<per@example.se>", "per@example.se", ""),
        ('"per@example.se" <per@example.se>', "per@example.se", "per@example.se"),
    ],
)
def test_an_address_with_a_display_name_keeps_the_name(raw: str, email: str, name: str) -> None:
    address = parse_address(raw)
    assert (address.email, address.name) == (email, name)
    assert parse_address(str(address)) == address  # str() reads back as typed


def test_the_display_name_is_normalised_nfc() -> None:
    assert parse_address("A\u0308sa <asa@example.se>").name == "\u00c4sa"


def test_a_name_given_by_the_caller_wins_over_the_typed_one() -> None:
    assert parse_address("Pelle <per@example.se>", name="Per Persson").name == "Per Persson"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("Persson, Per <per@example.se>", "double quotes"),
        ('"Per" Persson <per@example.se>', "inside the double quotes"),
        ('"Per Persson <per@example.se>', "not closed"),
        ("Per <per@example.se> extra", "text after the >"),
        ("Per <per@example.se", "no closing >"),
        ("per@example.se>", "without a <"),
        ('"Per Persson"', "angle brackets"),
        ("Per <per @example.se>", "space"),
        ("Per <per@nodot>", "no dot"),
        ("Per\r\nBcc: victim@example.com <per@example.se>", "line break"),
    ],
)
def test_a_malformed_name_form_says_why(raw: str, reason: str) -> None:
    good, problems = validate_addresses([raw], "to")
    assert good == []
    (problem,) = problems
    assert problem.key == f"to {raw!r}"
    assert reason in problem.message


def test_a_name_typed_without_angle_brackets_gets_a_hint() -> None:
    _, (problem,) = validate_addresses(["Per Persson per@example.se"], "to")
    assert "space" in problem.message
    assert problem.fix.endswith("Per Persson <per@example.se>")


# --- one value, one address ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "a@example.se, c@example.se",
        "a@example.se; c@example.se",
        "a@example.se c@example.se",
        "A <a@example.se>, C <c@example.se>",
    ],
)
def test_a_value_holding_several_addresses_is_refused_with_a_hint(raw: str) -> None:
    good, (problem,) = validate_addresses([raw], "cc")
    assert good == []
    assert "2 addresses" in problem.message
    assert problem.fix.startswith("give each address its own --cc")
    assert problem.fix.count("--cc ") == 2  # one for each address


def test_a_quoted_comma_in_a_name_is_one_address() -> None:
    good, problems = validate_addresses(['"Persson, Per" <per@example.se>'], "to")
    assert problems == [] and good[0].name == "Persson, Per"


# --- private and special-use domains -------------------------------------------------

PRIVATE = [
    "it@corp.local",
    "it@mail.localhost",
    "it@ci.test",
    "it@corp.internal",
    "it@router.home.arpa",
    "it@srv.lan",
    "it@ad.corp",
    "it@nas.home",
    "it@portal.intranet",
    "it@mail.private",
    "it@mailhost",
    "it@CORP.LOCAL",
]


@pytest.mark.parametrize("raw", PRIVATE)
def test_a_private_domain_is_refused_by_default_with_the_setting_as_fix(raw: str) -> None:
    _, (problem,) = validate_addresses([raw], "to")
    domain = raw.partition("@")[2]
    assert repr(domain) in problem.message
    assert "private network" in problem.message
    assert problem.fix.endswith("crm settings set mail.allow_private_domains true")


@pytest.mark.parametrize("raw", PRIVATE)
def test_a_private_domain_is_accepted_when_allowed(raw: str) -> None:
    good, problems = validate_addresses([raw], "to", allow_private=True)
    assert problems == []
    assert good[0].email == raw.lower()


def test_an_allowed_private_domain_is_still_checked_for_typing_mistakes() -> None:
    _, (problem,) = validate_addresses(["it@exa_mple.local"], "to", allow_private=True)
    assert "character" in problem.message


@pytest.mark.parametrize("raw", ["x@never.invalid", "x@abc.onion", "x@1.0.0.10.in-addr.arpa"])
def test_domains_no_network_delivers_to_are_refused_even_when_allowed(raw: str) -> None:
    _, (problem,) = validate_addresses([raw], "to", allow_private=True)
    assert "no mail server delivers" in problem.message
    assert problem.fix == ""


@pytest.mark.parametrize("raw", ["a@example.com", "a@example.se", "a@example.org", "a@corp.se"])
def test_sample_and_ordinary_domains_are_not_private(raw: str) -> None:
    assert special_domain(raw.partition("@")[2]) is None
    assert explain_address(raw) is None


def test_every_name_email_validator_treats_as_special_use_has_a_rule() -> None:
    """So an upgrade that adds a name is noticed here, not as a puzzling refusal."""
    for name in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        assert special_domain(f"host.{name}") is not None, name


def test_explain_address_for_plugins_names_the_private_domain() -> None:
    reason = explain_address("anna@corp.local")
    assert reason is not None and "'corp.local'" in reason
    assert explain_address("anna@corp.local", allow_private=True) is None
