"""hived.mesh.steering: forwarded drain/undrain/cancel requests, fed answers and a clock."""

from __future__ import annotations

import pytest

from hived.errors import RemoteProtocolError
from hived.mesh.sansio import Send
from hived.mesh.steering import Forwards, Steer, Steered
from hived.protocol.wire import decode, encode

A, B, C = "tcp://10.0.0.1:7700", "tcp://10.0.0.2:7700", "tcp://10.0.0.3:7700"


def test_a_drain_goes_to_its_node_and_its_answer_settles_it() -> None:
    f = Forwards(timeout=2.0)
    request, sends = f.ask([B], "drain", "node2", now=0.0)
    assert sends == [Send(B, Steer(request, "drain", "node2"))]
    assert f.answered(C, Steered(request, True, "stray", [])) is None  # never asked
    outcome = f.answered(B, Steered(request, True, "node2 is draining", []))
    assert outcome is not None and outcome.done and outcome.peer == B
    assert outcome.texts == ["node2 is draining"]
    assert len(f) == 0
    assert f.answered(B, Steered(request, True, "again", [])) is None  # late: ignored


def test_a_cancel_is_settled_by_its_owner_whoever_said_no_first() -> None:
    f = Forwards(timeout=2.0)
    request, sends = f.ask([A, B, C], "cancel", "00ab/3", now=0.0)
    assert {s.to for s in sends} == {A, B, C}
    assert f.answered(A, Steered(request, False, "n1 owns no job", ["00aa/1"])) is None
    outcome = f.answered(C, Steered(request, True, "job 00ab/3 cancelled on its owner n3", []))
    assert outcome is not None and outcome.done and outcome.peer == C
    assert f.answered(B, Steered(request, False, "n2 owns no job", [])) is None


def test_when_every_peer_says_no_the_refusals_and_their_jobs_come_back() -> None:
    f = Forwards(timeout=2.0)
    request, _ = f.ask([A, B], "cancel", "nosuch", now=0.0)
    assert f.answered(A, Steered(request, False, "n1 owns no job", ["00aa/1"])) is None
    outcome = f.answered(B, Steered(request, False, "n2 owns no job", ["00bb/2"]))
    assert outcome is not None and not outcome.done
    assert outcome.jobs == ["00aa/1", "00bb/2"] and outcome.silent == []


def test_the_deadline_settles_it_naming_who_never_answered() -> None:
    f = Forwards(timeout=2.0)
    request, _ = f.ask([A, B], "cancel", "x/1", now=10.0)
    f.answered(A, Steered(request, False, "no", ["00aa/1"]))
    assert f.expire(request, now=11.9) is None  # not yet
    outcome = f.expire(request, now=12.0)
    assert outcome is not None and not outcome.done
    assert outcome.silent == [B] and outcome.jobs == ["00aa/1"]
    assert f.expire(request, now=13.0) is None  # settled once


def test_a_peer_the_link_refused_counts_as_having_said_no_at_once() -> None:
    f = Forwards(timeout=2.0)
    request, _ = f.ask([B], "undrain", "node2", now=0.0)
    outcome = f.unsent(request, B)
    assert outcome is not None and not outcome.done
    assert outcome.unreachable == [B] and outcome.silent == [] and outcome.texts == []


def test_concurrent_requests_are_kept_apart() -> None:
    f = Forwards(timeout=2.0)
    first, _ = f.ask([B], "drain", "node2", now=0.0)
    second, _ = f.ask([B], "undrain", "node2", now=0.0)
    assert first != second
    assert f.answered(B, Steered(second, True, "taking work again", [])).request == second
    assert len(f) == 1


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (Steer(1, "reboot", "node2"), "action"),
        (Steer(1, "drain", ""), "target"),
        (Steer(1, "drain", "x" * 301), "target"),
        (Steer(-1, "drain", "node2"), "request"),
        (Steered(1, True, "x" * 2001, []), "text"),
        (Steered(1, False, "no", ["a/1"] * 257), "jobs"),
    ],
)
def test_a_peer_steers_only_with_what_the_rules_allow(msg, field) -> None:
    with pytest.raises(RemoteProtocolError, match=f"field '{field}'"):
        decode(encode(msg))
