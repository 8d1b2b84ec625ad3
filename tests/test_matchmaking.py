"""The coordinator's matchmaker and a node's puller, fed by hand."""

from __future__ import annotations

from hived.mesh.matchmaking import Matchmaker, Offer, Puller, Want

A, B, C, N = "tcp://a:1", "tcp://b:1", "tcp://c:1", "tcp://n:1"


def test_owners_with_work_are_pointed_at_in_turn():
    m = Matchmaker(expire=1.0, fan_out=1)
    m.offer(A, Offer(10, 0), 0.0)
    m.offer(B, Offer(10, 0), 0.0)
    picks = [m.want(N, Want(1, 0), 0.1)[0] for _ in range(6)]
    assert picks.count(A) == picks.count(B) == 3  # two jobs share the slots evenly


def test_gpu_work_goes_only_to_nodes_with_gpu_slots():
    m = Matchmaker(expire=1.0)
    m.offer(A, Offer(0, 5), 0.0)
    assert m.want(N, Want(4, 0), 0.1) == []
    assert m.want(N, Want(0, 1), 0.1) == [A]


def test_a_node_is_never_pointed_at_itself():
    m = Matchmaker(expire=1.0)
    m.offer(A, Offer(3, 0), 0.0)
    assert m.want(A, Want(1, 0), 0.1) == []


def test_offers_expire_so_a_dead_owner_is_not_pointed_at():
    m = Matchmaker(expire=1.0)
    m.offer(A, Offer(3, 0), 0.0)
    assert m.want(N, Want(1, 0), 0.5) == [A]
    assert m.want(N, Want(1, 0), 1.5) == []
    m.offer(B, Offer(0, 0), 2.0)  # nothing queued: not an offer
    assert m.offers == {}


def test_nodes_that_asked_in_vain_are_pointed_when_work_arrives():
    m = Matchmaker(expire=1.0)
    assert m.want(N, Want(2, 0), 0.0) == []
    assert m.offer(A, Offer(5, 0), 0.2) == [(N, [A])]
    assert m.offer(B, Offer(5, 0), 0.3) == []  # N was served; it is not waiting now
    assert m.want(C, Want(1, 0), 5.0) == []  # stale offers gone
    assert m.offer(A, Offer(1, 0), 9.0) == []  # C's wish expired too


def test_the_puller_keeps_pulling_from_an_owner_with_work_without_the_coordinator():
    p = Puller(retry=0.5)
    direct, want = p.idle(0.0)
    assert (direct, want) == ([], True)
    assert p.idle(0.1) == ([], False)  # one WANT per retry
    assert p.pointed([A, B], 0.1, free=True) == [A, B]
    assert p.pointed([A], 0.1, free=True) == []  # one PULL at a time per owner
    p.answered(A, got_work=True)
    p.answered(B, got_work=False)
    assert p.idle(0.2) == ([A], True)  # straight back to A; B ran dry, so ask too
    assert p.idle(0.3) == ([], False)  # A not answered yet; WANT asked a moment ago
    p.answered(A, got_work=False)
    assert p.idle(0.35) == ([], True)  # A ran dry: ask the coordinator again at once


def test_a_busy_puller_still_asks_the_coordinator_once_per_retry():
    """So an owner whose work arrived later gets a share of a node that is
    already pulling from another."""
    p = Puller(retry=0.5)
    p.idle(0.0)
    p.pointed([A], 0.0, free=True)
    p.answered(A, got_work=True)
    assert p.idle(0.2) == ([A], False)
    p.answered(A, got_work=True)
    assert p.idle(0.6) == ([A], True)
    assert p.pointed([B, A], 0.6, free=True) == [B]  # A's PULL is still out
    p.answered(A, got_work=True)
    p.answered(B, got_work=True)
    assert sorted(p.idle(0.7)[0]) == [A, B]  # both owners now take turns


def test_the_puller_takes_owners_in_turn_a_few_at_a_time():
    p = Puller(retry=0.5, fan_out=2)
    p.pointed([A, B, C], 0.0, free=True)
    for owner in (A, B, C):
        p.answered(owner, got_work=True)
    rounds = []
    for i in range(3):
        direct, _ = p.idle(1.0 + i)
        rounds.append(direct)
        for owner in direct:
            p.answered(owner, got_work=True)
    assert rounds == [[A, B], [C, A], [B, C]]


def test_owners_pointed_at_while_no_slot_is_free_are_pulled_from_later():
    p = Puller(retry=0.5)
    assert p.pointed([A], 0.0, free=False) == []
    assert p.idle(0.1) == ([A], True)


def test_a_gone_owner_is_forgotten():
    p = Puller(retry=0.5)
    p.pointed([A], 0.0, free=True)
    p.answered(A, got_work=True)
    p.gone(A)
    assert p.idle(0.0) == ([], True)


def test_an_unanswered_pull_is_given_up_so_the_node_asks_again():
    p = Puller(retry=0.5)
    assert p.idle(0.0) == ([], True)
    p.pointed([A], 0.0, free=True)
    assert p.idle(0.2) == ([], False)  # still waiting for A
    assert p.idle(6.0) == ([A], True)  # A never answered: given up, asked again
