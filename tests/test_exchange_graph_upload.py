"""Attachments of 3 MB and more through Microsoft Graph: a draft and an upload session.

The Graph stand-in takes the draft (``POST /users/{id}/messages``, Mail.ReadWrite), an
upload session per large file (ranges of at most 4 MB PUT to a pre-authenticated URL
without a token) and the draft's send; the bytes are compared by sha256 where they
arrive, and the mail is found again by its Message-ID like any other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from crm_core.mail.message import Attachment
from crm_core.mail.transport import Outcome
from crm_core.models import utcnow
from tests.conftest import CrmFactory
from tests.exchange_fixtures import (
    USER,
    ExchangeWorld,
    exchange_world,
    make_message,
    with_graph,
)
from tests.exchange_fixtures import ca as ca
from tests.exchange_fixtures import database_url as database_url
from tests.servers.graph import GraphServer
from tests.servers.tls import TestCA

MB = 1024 * 1024
CHUNK = 4 * MB


@pytest.fixture
def world(make_crm: CrmFactory, ca: TestCA) -> Iterator[ExchangeWorld]:
    roles = ("Mail.Send", "Mail.ReadBasic.All", "Mail.ReadWrite", "User.Read.All")
    with exchange_world(make_crm(), ca) as w, with_graph(w, roles=roles) as graph:
        graph.max_message_bytes = 150 * MB  # a tenant that raised the 35 MB default
        yield w


def graph_of(world: ExchangeWorld) -> GraphServer:
    assert world.graph is not None
    return world.graph


def payload(size: int, seed: bytes) -> bytes:
    """``size`` bytes that differ everywhere, so a lost or repeated range shows."""
    block = hashlib.sha256(seed).digest() * (MB // 32)
    return (block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("size", [5 * MB, 40 * MB])
def test_large_attachment_arrives_intact_through_an_upload_session(
    world: ExchangeWorld, size: int
) -> None:
    graph = graph_of(world)
    data = payload(size, b"offer")
    small = payload(200_000, b"floor plan")
    message = make_message(
        attachments=[
            Attachment("visning.mp4", "video/mp4", data),
            Attachment("planritning.pdf", "application/pdf", small),
        ]
    )
    result = world.send_one(message)

    assert result.outcome is Outcome.SENT, result
    [sent] = graph.delivered
    assert sent.internet_message_id == message.message_id
    got = {name: sha(content) for name, content in sent.attachments}
    assert got == {"visning.mp4": sha(data), "planritning.pdf": sha(small)}
    chunks = graph.upload_chunks
    assert sum(chunks) == size and max(chunks) <= CHUNK
    assert len(chunks) == -(-size // CHUNK)
    ops = graph.ops
    assert (ops["createMessage"], ops["createUploadSession"], ops["sendDraft"]) == (1, 1, 1)
    assert ops["addAttachment"] == 1 and ops["sendMail"] == 0
    assert graph.drafts(USER) == []
    # Reconciling finds the mail sent through the draft by its Message-ID.
    [found] = world.crm.reconcile_mail(world.account(), [message], utcnow())
    assert found.sent is True


def test_small_mails_still_go_in_one_batch_beside_a_large_one(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    big = make_message(9, attachments=[Attachment("a.bin", "x/y", payload(3_000_000, b"a"))])
    messages = [make_message(1), big, make_message(2)]
    results = world.send(messages)
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert graph.ops["$batch"] == 1 and graph.ops["sendDraft"] == 1
    assert sorted(d.internet_message_id for d in graph.delivered) == sorted(
        m.message_id for m in messages
    )


def test_missing_mail_read_write_is_named(make_crm: CrmFactory, ca: TestCA) -> None:
    roles = ("Mail.Send", "Mail.ReadBasic.All", "User.Read.All")
    with exchange_world(make_crm(), ca) as world, with_graph(world, roles=roles) as graph:
        big = make_message(attachments=[Attachment("a.bin", "x/y", payload(5 * MB, b"b"))])
        result = world.send_one(big)
        assert (result.outcome, result.code) == (Outcome.CONFIGURATION, "ErrorAccessDenied")
        assert "need the Mail.ReadWrite application permission" in result.detail
        assert "the app's token holds Mail.Send, Mail.ReadBasic.All, User.Read.All" in (
            result.detail
        )
        assert "Microsoft Graph → Application permissions → Mail.ReadWrite" in result.detail
        assert graph.delivered == [] and graph.upload_chunks == []


def test_lost_answer_to_the_drafts_send_is_reconciled(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    graph.drop_after_request(1)  # the send is carried out, its answer lost
    big = make_message(attachments=[Attachment("a.bin", "x/y", payload(5 * MB, b"c"))])
    assert world.send_one(big).outcome is Outcome.AMBIGUOUS
    assert len(graph.delivered) == 1
    [found] = world.crm.reconcile_mail(world.account(), [big], utcnow())
    assert found.sent is True


def test_a_failure_before_the_send_is_temporary_never_ambiguous(world: ExchangeWorld) -> None:
    graph = graph_of(world)
    big = make_message(attachments=[Attachment("a.bin", "x/y", payload(5 * MB, b"d"))])
    graph.throttle(1, retry_after=9)  # the first mailbox request: the draft itself
    result = world.send_one(big)
    # A 429 pauses the mailbox for its Retry-After (pacing), spending no attempt.
    assert (result.outcome, result.retry_after) == (Outcome.THROTTLED, 9.0)
    # The draft's answer lost: nothing was sent (only the send sends), so no reconcile.
    graph.drop_after_request(1, only_sends=False)
    lost = world.send_one(big)
    assert lost.outcome is Outcome.TEMPORARY
    assert lost.detail.startswith("Not sent: preparing the draft failed")
    assert graph.delivered == []
