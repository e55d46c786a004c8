"""First checks that the core wires together on every backend."""

from __future__ import annotations

from crm_core import directory
from tests.conftest import CrmFactory


def test_user_and_person_round_trip(make_crm: CrmFactory) -> None:
    crm = make_crm()
    with crm.transaction() as session:
        directory.add_user(session, "Anna@Example.se", "Anna", "commercial")
        directory.add_person(session, "per@example.com", "Per", "0701")
    with crm.transaction() as session:
        user = directory.find_user(session, "anna@example.se")
        account = crm.sender_account(session, user)
    assert account.transport == "maildir"
    assert account.email == "anna@example.se"
