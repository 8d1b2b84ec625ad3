"""The lease election core, alone and on the simulated network (no event loop)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_strategies import SIM_SETTINGS, fault_schedules

from hived.config import DEFAULT_HEARTBEAT, DEFAULT_LEASE
from hived.errors import InternalError, RemoteProtocolError
from hived.mesh import election as el
from hived.mesh.sansio import Send
from hived.protocol.wire import decode, encode
from hived.testing.simnet import Faults, InvariantViolation, SimNet

LEASE, HEARTBEAT = DEFAULT_LEASE, DEFAULT_HEARTBEAT
HOLD = LEASE - (LEASE * 0.01 + 0.01)
FAILOVER = 2 * LEASE + HEARTBEAT  # the DESIGN.md target for a new agreed coordinator
A, B, C = "tcp://a:7700", "tcp://b:7700", "tcp://c:7700"


def core(address=A, voters=(A, B, C), now=0.0, **options) -> el.Election:
    name = address.split("/")[-1].split(":")[0]
    return el.Election(name, address, list(voters), now, random.Random(7), **options)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def sent(actions, kind):
    return [a for a in of(actions, Send) if isinstance(a.msg, kind)]


def elect(net: SimNet, within: float) -> tuple[str, int]:
    """Run until every live node agrees on one coordinator; return it."""
    start = net.now
    assert net.run_for(within, stop=lambda: net.agreed() is not None), (
        f"no agreed coordinator within {within}s: {net.views()}"
    )
    assert net.now - start <= within
    return net.agreed()


# -- one core ---------------------------------------------------------------


def test_a_node_without_seeds_elects_itself_at_once():
    solo = el.Election("solo", A, [], 100.0, random.Random(1))
    assert solo.next_deadline() == 100.0
    actions = solo.tick(100.0)
    assert of(actions, el.BecameCoordinator) == [el.BecameCoordinator(1, 100.0 + HOLD)]
    assert isinstance(actions[0], el.Persist)  # persisted before anything leaves
    assert solo.is_coordinator(100.0) and solo.coordinator(100.0) == ("solo", 1)
    assert solo.term == 1
    # it renews on its own and never lapses
    now = 100.0
    while now < 130.0:
        now = solo.next_deadline()
        solo.tick(now)
        assert solo.is_coordinator(now)
    assert solo.term == 1


def test_a_restarted_voter_grants_nothing_for_one_lease():
    voter = core(B, now=50.0)
    early = voter.handle(A, el.Ask(1, 9, "a"), 50.5)
    (deny,) = sent(early, el.Deny)
    assert deny.to == A and deny.msg.wait == pytest.approx(1.5)
    later = voter.handle(A, el.Ask(1, 10, "a"), 52.0)
    assert sent(later, el.Grant) and isinstance(later[0], el.Persist)


def test_voter_grants_one_holder_at_a_time_and_only_rising_terms():
    v = core(B, now=-10.0)
    assert sent(v.handle(A, el.Ask(3, 1, "a"), 0.0), el.Grant)
    # another candidate is refused while A's grant stands, and told how long
    (deny,) = sent(v.handle(C, el.Ask(4, 2, "c"), 1.0), el.Deny)
    assert deny.msg.wait == pytest.approx(1.0) and deny.msg.seen == 3
    # A renews the same term
    assert sent(v.handle(A, el.Ask(3, 3, "a"), 1.5), el.Grant)
    # after the grant ran out: a term not above the promise is refused ...
    assert sent(v.handle(C, el.Ask(3, 4, "c"), 3.6), el.Deny)
    # ... a higher one is granted
    assert sent(v.handle(C, el.Ask(4, 5, "c"), 3.6), el.Grant)
    assert sent(v.handle(A, el.Ask(4, 6, "a"), 3.7), el.Deny)


def test_candidate_counts_its_lease_from_when_it_asked():
    a = core(A, now=-10.0)
    asks = a.tick(0.0)
    assert a.state == el.CANDIDATE
    (to_b, to_c) = sent(asks, el.Ask)
    assert {to_b.to, to_c.to} == {B, C} and to_b.msg.term == 1
    won = a.handle(B, el.Grant(1, to_b.msg.round), 0.3)  # self + B: a majority of 3
    (became,) = of(won, el.BecameCoordinator)
    assert became == el.BecameCoordinator(1, 0.0 + HOLD)
    (announce,) = of(won, el.Broadcast)
    assert announce.msg == el.Leader(1, "a", A, pytest.approx(HOLD - 0.3))
    assert a.is_coordinator(HOLD - 1e-6) and not a.is_coordinator(HOLD)
    # unrenewed, it steps down at the end of its lease
    now = a.next_deadline()
    while now < HOLD:
        a.tick(now)  # renewal asks go unanswered
        now = a.next_deadline()
    assert now == HOLD and el.LostCoordinator(1) in a.tick(now)
    assert a.coordinator(now) is None


def test_grants_for_terms_or_rounds_never_asked_are_ignored():
    a = core(A, now=-10.0)
    (ask, _) = sent(a.tick(0.0), el.Ask)
    assert a.handle(B, el.Grant(7, ask.msg.round), 0.1) == []
    assert a.handle(B, el.Grant(1, ask.msg.round + 1), 0.1) == []
    assert a.handle("tcp://stranger:1", el.Grant(1, ask.msg.round), 0.1) == []
    assert a.state == el.CANDIDATE


def test_a_deny_teaches_the_candidate_higher_terms_and_how_long_to_wait():
    a = core(A, now=-10.0)
    (ask, _) = sent(a.tick(0.0), el.Ask)
    a.handle(B, el.Deny(1, ask.msg.round, 6, 1.5), 0.01)
    a.handle(C, el.Deny(1, ask.msg.round, 2, 0.0), 0.01)
    assert a.state == el.FOLLOWER and a.next_deadline() >= 1.51
    (again, _) = sent(a.tick(a.next_deadline()), el.Ask)
    assert again.msg.term == 7


def test_stale_terms_are_fenced():
    f = core("tcp://f:7700", now=0.0)
    f.handle(B, el.Leader(5, "b", B, 1.0), 1.0)
    assert f.coordinator(1.5) == ("b", 5) and f.coordinator_address(1.5) == B
    assert f.term == 5
    assert not f.accept_term(4) and f.accept_term(5)
    f.handle(C, el.Leader(4, "c", C, 1.9), 1.6)  # an old coordinator's late message
    assert f.coordinator(1.7) == ("b", 5)
    # belief runs out on our own clock, minus the drift margin
    assert f.coordinator(1.0 + 1.0 - 0.02) is None
    # a higher term seen (e.g. in a heartbeat) raises the floor at once
    assert f.accept_term(6) and f.term == 6 and not f.accept_term(5)


def test_a_coordinator_that_sees_a_higher_term_steps_down():
    solo = el.Election("solo", A, [], 0.0, random.Random(1))
    solo.tick(0.0)
    assert solo.accept_term(3)
    assert not solo.is_coordinator(0.1)
    assert solo.next_deadline() == -math.inf
    actions = solo.tick(0.1)
    assert el.LostCoordinator(1) in actions and el.Persist(3, 1) in actions


def test_persisted_terms_come_back_after_a_restart():
    again = core(A, now=0.0, initial_term=8, initial_promised=11)
    assert again.term == 8
    assert not again.accept_term(7)
    (ask, _) = sent(again.tick(10.0), el.Ask)
    assert ask.msg.term == 12


@pytest.mark.parametrize(
    "msg, match",
    [
        (el.Ask(-1, 1, "b"), "'term' should be a term"),
        (el.Ask(2**62 - 1, 1, "b"), "'term' should be a term from 0 to 2\\*\\*53"),
        (el.Leader(1, "b", B, math.nan), "'remaining' should be a finite number of seconds"),
        (el.Leader(1, "b", "b:7700", 1.0), "'address' should be a tcp://host:port"),
        (el.Deny(1, 1, 1, -1.0), "'wait' should be"),
        (el.Deny(1, 1, 2**53, 1.0), "'seen' should be a term"),
        (el.Grant(1, -1), "'round' should be a round id"),
    ],
)
def test_peer_nonsense_is_refused_where_it_is_decoded(msg, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(encode(msg))


def test_a_hostile_lease_is_clamped_to_our_own():
    a = core(A, now=-10.0)
    a.handle(B, el.Leader(1, "b", B, 1e9), 0.0)
    assert a.coordinator(LEASE) is None


def test_misuse_raises_internal_error_naming_state_and_term():
    with pytest.raises(InternalError, match="election of a, term 0: event won in state follower"):
        core()._move(el.RoleEvent.WON, 0.0)
    with pytest.raises(InternalError, match="not one of its messages"):
        core().handle(B, Send(A, el.Grant(1, 1)), 0.0)  # type: ignore[arg-type]
    with pytest.raises(InternalError, match="drift"):
        core(lease=0.01, min_margin=0.02)


@pytest.mark.parametrize(
    "msg", [el.Ask(3, 2**40, "a"), el.Grant(3, 9), el.Deny(3, 9, 4, 0.5), el.Leader(3, "a", A, 1.5)]
)
def test_messages_survive_the_wire(msg):
    assert decode(encode(msg))[0] == msg


@given(
    rate_c=st.floats(1 - 0.005, 1 + 0.005),
    rate_v=st.floats(1 - 0.005, 1 + 0.005),
    delay=st.floats(0, 0.5),
)
def test_a_holder_stops_before_any_voters_grant_ends(rate_c, rate_v, delay):
    """Invariant 2 in real time, for any two clock rates within the drift bound."""
    cand = core(A, now=-10.0)
    (ask, _) = sent(cand.tick(0.0), el.Ask)  # sent at real time 0 (local 0 / rate_c)
    voter = core(B, now=-10.0)
    voter.handle(A, ask.msg, delay * rate_v)  # received `delay` later, on its clock
    (became,) = of(cand.handle(B, el.Grant(1, ask.msg.round), 0.0), el.BecameCoordinator)
    holder_ends = became.until / rate_c
    grant_ends = (delay * rate_v + LEASE) / rate_v
    assert holder_ends < grant_ends


# -- the simulated network ----------------------------------------------------


@pytest.mark.parametrize("voters", [1, 3, 5])
def test_voters_elect_exactly_one(voters):
    net = SimNet.cluster(voters + 2, voters=voters, seed=voters, codec=True)
    name, term = elect(net, within=LEASE + 1.5)  # every voter waits one lease at start
    assert net.coordinators() == [name] and term >= 1
    net.run_for(20.0)  # and it holds on
    assert net.agreed() == (name, term) and len(net.elections) == 1


@pytest.mark.parametrize("seed", range(4))
def test_killed_coordinator_is_replaced_with_a_higher_term(seed):
    net = SimNet.cluster(5, voters=3, seed=seed)
    old, term = elect(net, within=4.0)
    net.kill(old)
    new, new_term = elect(net, within=FAILOVER)
    assert new != old and new_term > term


# The voter after the one that stopped moves up to its place in the back-off
# order and stands within one slot (lease/8, on a clock up to 1 % slow); its
# round takes one round trip, its LEADER one more hop (5 ms each at most).
HAND_OVER = LEASE / 8 * 1.01 + 3 * 0.005


@pytest.mark.parametrize("seed", range(8))
def test_a_stopped_coordinator_hands_over_within_a_round(seed):
    net = SimNet.cluster(5, voters=3, seed=seed)
    old, term = elect(net, within=4.0)
    net.stop(old)
    assert old not in net.coordinators()
    new, new_term = elect(net, within=HAND_OVER)  # the old one, draining, believes it too
    assert new != old and new_term == term + 1
    net.run_for(2.0)  # it drains, still a member, and never stands
    net.leave(old)
    net.run_for(10.0)
    assert net.agreed() == (new, new_term)


@pytest.mark.parametrize("seed", range(4))
def test_a_lost_resign_costs_the_old_wait_and_no_second_coordinator(seed):
    net = SimNet.cluster(5, voters=3, seed=seed)
    old, _ = elect(net, within=4.0)
    node = net.nodes[old]
    send = node.send
    node.send = lambda to, msg: None if isinstance(msg, el.Resign) else send(to, msg)
    net.stop(old)
    new, _ = elect(net, within=FAILOVER)
    assert new != old


def test_coordinator_cut_off_in_a_minority_steps_down_and_the_majority_elects():
    net = SimNet.cluster(5, voters=5, seed=11)
    old, term = elect(net, within=4.0)
    minority = [old, next(n for n in net.nodes if n != old)]
    majority = [n for n in net.nodes if n not in minority]
    net.partition(minority, majority)
    cut = net.now
    # the old coordinator stops on its own before its lease could have ended
    net.run_until(cut + HOLD * 1.006, stop=lambda: old not in net.coordinators())
    assert old not in net.coordinators()
    new, new_term = elect_among(net, majority, within=FAILOVER)
    assert new in majority and new_term > term
    # the minority side knows of no coordinator
    net.run_for(LEASE)
    assert all(net.views()[n] is None for n in minority)
    # healing leaves exactly one, the majority's
    net.heal()
    assert elect(net, within=net.dead_after + LEASE) == (new, new_term)
    net.run_for(10.0)
    assert net.agreed() == (new, new_term)


def elect_among(net: SimNet, names: list[str], within: float) -> tuple[str, int]:
    assert net.run_for(within, stop=lambda: net.agreed(names) is not None), net.views()
    return net.agreed(names)


def test_restarting_every_node_keeps_terms_rising():
    net = SimNet.cluster(3, voters=3, seed=3)
    _, term = elect(net, within=4.0)
    for name in net.nodes:
        net.restart(name)
    restarted = net.now
    _, new_term = elect(net, within=2 * LEASE + 1.0)
    assert new_term > term
    assert net.elections[-1][0] >= restarted + LEASE  # voters waited a lease


def test_non_voters_stand_only_after_the_voters():
    net = SimNet.cluster(6, voters=3, seed=5)
    name, _ = elect(net, within=4.0)
    assert name in ("n0", "n1", "n2")


def test_the_checker_catches_two_coordinators():
    """Two nodes without seeds are two one-node clusters: both elect themselves.
    That is a configuration error, and the checker must see it."""
    net = SimNet(0)
    net.add_node("x", [])
    net.add_node("y", [])
    with pytest.raises(
        InvariantViolation, match="held by x and y|all believe they are coordinator"
    ):
        net.run_for(1.0)


# -- properties over random schedules -----------------------------------------

OPS = fault_schedules(run_for=4.0, max_size=30)
ELECTION_BOUND = 4 * LEASE  # stale grants + a quarantine + back-off, see below
AGREEMENT_BOUND = ELECTION_BOUND + 3.0 + LEASE  # + probe_cap to re-find peers + one announcement


@SIM_SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    voters=st.sampled_from([1, 3, 5]),
    others=st.integers(0, 2),
    ops=OPS,
)
def test_one_coordinator_rising_terms_and_a_bounded_election(seed, voters, others, ops):
    """After every event (SimNet checks): never two coordinators at one real
    instant, no term going backwards, no term with two holders. Then, once a
    majority of voters is up, connected, the network clean and disks free, one
    coordinator is elected within ELECTION_BOUND: at most one lease for old
    grants and restarted voters' quarantine, plus the back-off (rank plus at
    most eight slots of lease/8) and a refused round or two."""
    net = SimNet.cluster(voters + others, voters=voters, seed=seed)
    for op in ops:
        net.apply(op)
    settle_then_elect(net, voters)


def settle_then_elect(net: SimNet, voters: int) -> None:
    """Heal everything, start voters until a majority runs, and check that
    one coordinator comes within ELECTION_BOUND and agreement within
    AGREEMENT_BOUND."""
    net.heal()
    net.free_disks()
    net.faults = Faults()
    dead = [f"n{i}" for i in range(voters) if not net.nodes[f"n{i}"].alive]
    while voters - len(dead) < voters // 2 + 1:
        net.start(dead.pop())
    stable = net.now
    assert net.run_for(ELECTION_BOUND, stop=lambda: len(net.coordinators()) == 1), (
        f"no coordinator {ELECTION_BOUND}s after the majority came together: {net.views()}"
    )
    assert net.run_until(stable + AGREEMENT_BOUND, stop=lambda: net.agreed() is not None), (
        f"no agreement {AGREEMENT_BOUND}s after the majority came together: {net.views()}"
    )


STOP_OPS = fault_schedules(run_for=4.0, max_size=30, leave=True, stop=True)


@SIM_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), voters=st.sampled_from([3, 5]), ops=STOP_OPS)
def test_hand_overs_among_faults_keep_one_coordinator_and_the_election_bounded(seed, voters,
                                                                              ops):
    """Stops (a hand-over, then a drain of any length) among kills, restarts,
    partitions, full disks and lost, duplicated and reordered messages: the
    net's checks hold after every event, and once the stopping nodes have
    left, the hive elects as it does after any fault."""
    net = SimNet.cluster(voters + 1, voters=voters, seed=seed)
    for op in ops:
        net.apply(op)
    for node in net.alive():
        if node.election.stopping:
            net.leave(node.name)
    settle_then_elect(net, voters)


# -- hostile members: terms move by bounded, checked steps --------------------


def test_a_leader_or_an_ask_far_above_what_voters_vouch_for_changes_nothing():
    """The issue's inflation, at 2**40 (2**62 - 1 no longer decodes at all)."""
    f = core("tcp://f:7700", now=0.0)
    with pytest.raises(RemoteProtocolError, match="more than 16 above"):
        f.handle(B, el.Leader(2**40, "b", B, 1.0), 1.0)
    assert f.term == 0 and not f.accept_term(2**40) and f.term == 0
    assert f.next_deadline() != -math.inf  # nothing to persist
    v = core(B, now=-10.0)
    out = v.handle("tcp://m:7700", el.Ask(2**40, 1, "m"), 0.0)
    (deny,) = sent(out, el.Deny)
    assert deny.msg.seen == 0 and not of(out, el.Persist)
    # an honest candidate is granted at once
    assert sent(v.handle(A, el.Ask(1, 2, "a"), 0.1), el.Grant)


def test_a_leader_speaks_only_for_itself():
    f = core("tcp://f:7700", now=0.0)
    with pytest.raises(RemoteProtocolError, match="announces only itself"):
        f.handle("tcp://m:7700", el.Leader(1, "b", B, 1.0), 1.0)
    assert f.coordinator(1.1) is None


def test_a_node_far_behind_catches_up_once_a_majority_of_voters_vouch():
    f = core("tcp://f:7700", now=0.0)  # a wiped disk: term 0; the hive is at 5000
    assert not f.heard_term(B, 5000)  # one voter's word is not enough
    assert f.heard_term(C, 5000) and f.term == 5000  # two of three are
    f.handle(B, el.Leader(5001, "b", B, 1.0), 1.0)
    assert f.coordinator(1.1) == ("b", 5001)


def test_a_deny_from_a_stranger_teaches_nothing():
    a = core(A, now=-10.0)
    (ask, _) = sent(a.tick(0.0), el.Ask)
    a.handle("tcp://m:7700", el.Deny(1, ask.msg.round, 2**40, 0.0), 0.01)
    a.handle(B, el.Deny(1, ask.msg.round, 2**40, 0.0), 0.01)  # a voter, but incredible
    a.handle(C, el.Deny(1, ask.msg.round, 3, 0.0), 0.01)
    a.tick(a.next_deadline())
    (again, _) = sent(a.tick(a.next_deadline()), el.Ask)
    assert again.msg.term <= 4 + el.TERM_STEP


HOSTILE = "tcp://m:7700"


def hostile_election_messages():
    term = st.one_of(st.integers(0, 40), st.integers(0, 2**53 - 1))
    rid = st.integers(0, 2**64 - 1)
    who = st.sampled_from([B, HOSTILE])  # a voter's address, and a non-voter's
    return st.tuples(who, st.one_of(
        st.builds(el.Ask, term, rid, st.sampled_from(["b", "m"])),
        st.builds(el.Grant, term, rid),
        st.builds(el.Deny, term, rid, term, st.floats(0, 10)),
        st.builds(el.Release, term, rid),
        st.builds(el.Leader, term, st.sampled_from(["b", "m"]), who, st.floats(0, 10)),
        st.builds(lambda t: ("heartbeat", t), term),
    ))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(hostile_election_messages(), max_size=60), st.sampled_from([A, "tcp://f:7700"]))
def test_no_sequence_of_messages_from_one_member_lifts_terms_past_the_step(batch, address):
    """Whatever one key holder sends (even from a voter's address), terms stay
    within TERM_STEP of what the honest voters know (0 here), whether we are
    a voter or not, and our next ask still fits the wire."""
    e = core(address, now=-10.0)
    now = 0.0
    for sender, msg in batch:
        now += 0.01
        with contextlib.suppress(RemoteProtocolError):
            if isinstance(msg, tuple):
                e.heard_term(sender, msg[1])
            else:
                e.handle(sender, msg, now)
        e.tick(now)
        e.validate()
        assert e.term <= el.TERM_STEP and e._book.promised <= el.TERM_STEP + 1
    assert e._next_term() <= el.TERM_STEP + 1


# -- hand-over at stop ----------------------------------------------------------


def elected(now=0.0) -> el.Election:
    """A's core (voters A, B, C), having won term 1 at `now` with B's grant."""
    a = core(A, now=now - 10.0)
    (ask, _) = sent(a.tick(now), el.Ask)
    assert of(a.handle(B, el.Grant(1, ask.msg.round), now), el.BecameCoordinator)
    return a


def granted(voter=B, to=A, term=1, at=0.0) -> el.Election:
    """Voter `voter` (of A, B, C) that granted `term` to `to` at `at`."""
    v = core(voter, now=at - 10.0)
    assert sent(v.handle(to, el.Ask(term, 100 + term, to.split("/")[-1][0]), at), el.Grant)
    return v


def test_a_coordinator_that_steps_down_stops_first_then_resigns_to_every_voter():
    a = elected()
    actions = a.step_down(0.5)
    assert not a.is_coordinator(0.5) and a.coordinator(0.5) is None
    (lost,) = of(actions, el.LostCoordinator)
    (resign,) = of(actions, el.Broadcast)
    assert lost == el.LostCoordinator(1) and actions.index(lost) < actions.index(resign)
    assert resign == el.Broadcast(el.Resign(1), also=(B, C))
    assert a.step_down(0.6) == []  # once
    a.validate()


def test_a_stopping_node_never_stands_and_late_grants_make_it_nothing():
    a = elected()
    (renew, _) = sent(a.tick(a.next_deadline()), el.Ask)  # a renewal in flight
    a.step_down(1.0)
    assert a.handle(B, el.Grant(renew.msg.term, renew.msg.round), 1.01) == []
    now = 1.01
    while now < 30.0:  # no coordinator heard of, ever: it still never stands
        assert not sent(a.tick(now), el.Ask) and not a.is_coordinator(now)
        a.validate()
        due = a.next_deadline()
        if due is None:
            break
        now = max(due, now + 0.1)
    assert a.state == el.FOLLOWER


def test_a_candidate_that_stops_frees_the_votes_it_got():
    five = (A, B, C, "tcp://d:7700", "tcp://e:7700")
    a = core(A, voters=five, now=-10.0)
    (ask, *_) = sent(a.tick(0.0), el.Ask)
    a.handle(B, el.Grant(1, ask.msg.round), 0.01)  # two of five: not yet
    actions = a.step_down(0.02)
    assert a.state == el.FOLLOWER and not of(actions, el.Broadcast)
    assert [(r.to, r.msg.term) for r in sent(actions, el.Release)] == [(B, 1)]
    assert a.handle(C, el.Grant(1, ask.msg.round), 0.03) == []  # a late grant: nothing
    assert not a.is_coordinator(0.03)


def test_a_stopping_follower_still_votes_and_sends_no_resign():
    f = core(B, now=-10.0)
    f.handle(A, el.Leader(1, "a", A, 1.5), 0.0)
    assert f.step_down(0.1) == []
    assert sent(f.handle(C, el.Ask(2, 9, "c"), 0.2), el.Grant)


def test_a_node_that_is_its_own_only_voter_keeps_the_lease_when_it_stops():
    solo = el.Election("solo", A, [], 0.0, random.Random(1))
    solo.tick(0.0)
    assert solo.step_down(0.5) == [] and solo.is_coordinator(0.5)
    now = 0.5
    while now < 10.0:  # and renews it while it drains
        now = solo.next_deadline()
        solo.tick(now)
        assert solo.is_coordinator(now)


def test_a_resign_from_the_holder_frees_its_grant_at_once():
    b = granted(B, to=A, term=1, at=0.0)
    (deny,) = sent(b.handle(C, el.Ask(2, 7, "c"), 0.3), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.3)
    assert b.handle(A, el.Resign(1), 0.4) == []
    assert sent(b.handle(C, el.Ask(2, 8, "c"), 0.41), el.Grant)


def test_a_duplicated_resign_frees_nothing_more():
    b = granted(B, to=A, term=1, at=0.0)
    b.handle(A, el.Resign(1), 0.4)
    assert sent(b.handle(C, el.Ask(2, 8, "c"), 0.41), el.Grant)
    b.handle(A, el.Resign(1), 0.5)  # the same RESIGN again, late
    (deny,) = sent(b.handle("tcp://d:7700", el.Ask(3, 9, "d"), 0.6), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.19)  # C's grant stands


@pytest.mark.parametrize("sender, term", [
    (C, 1),  # a voter that holds nothing from us
    ("tcp://m:7700", 1),  # a stranger
    (A, 2),  # the holder, for a term it does not hold here
    (A, 0),  # the holder, for an older term
])
def test_a_resign_from_anyone_else_or_for_another_term_changes_nothing(sender, term):
    b = granted(B, to=A, term=1, at=0.0)
    b.handle(sender, el.Resign(term), 0.4)
    (deny,) = sent(b.handle("tcp://d:7700", el.Ask(2, 8, "d"), 0.41), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.41)


def test_a_late_resign_of_an_old_term_frees_nothing_the_holder_won_since():
    b = granted(B, to=A, term=1, at=0.0)
    assert sent(b.handle(A, el.Ask(3, 12, "a"), 2.5), el.Grant)  # A again, term 3
    b.handle(A, el.Resign(1), 2.6)  # from its term-1 lease, delayed
    (deny,) = sent(b.handle(C, el.Ask(4, 13, "c"), 2.7), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.2)


def test_a_renewal_or_announcement_of_the_resigned_lease_arriving_late_is_refused():
    b = granted(B, to=A, term=1, at=0.0)
    b.handle(A, el.Resign(1), 0.4)
    assert sent(b.handle(A, el.Ask(1, 102, "a"), 0.45), el.Deny)  # the renewal, reordered
    f = core("tcp://f:7700", now=-10.0)
    f.handle(A, el.Resign(1), 0.4)
    f.handle(A, el.Leader(1, "a", A, 1.5), 0.45)  # the LEADER before it, reordered
    assert f.coordinator(0.5) is None


def test_a_follower_that_believed_the_resigned_lease_stands_after_its_back_off():
    b = core(B, now=-10.0)
    b.handle(A, el.Leader(1, "a", A, 1.9), 0.0)
    assert b.next_deadline() > 1.5  # the belief's end: nothing to do before it
    b.handle(C, el.Resign(1), 0.2)  # not the coordinator: changes nothing
    assert b.coordinator(0.3) == ("a", 1)
    b.handle(A, el.Resign(1), 0.3)
    assert b.coordinator(0.3) is None
    due = b.next_deadline()
    assert 0.3 <= due <= 0.3 + LEASE / 8  # rank 1, but A stands no more: first, plus jitter
    (ask, _) = sent(b.tick(due), el.Ask)
    assert ask.msg.term == 2


def test_a_restarted_voter_holds_nothing_a_resign_could_free():
    b = core(B, now=0.0, initial_term=1, initial_promised=1)  # granted term 1 before
    b.handle(A, el.Resign(1), 0.5)
    (deny,) = sent(b.handle(C, el.Ask(2, 8, "c"), 0.6), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.6)  # the start-up quarantine still


def test_the_resigned_node_restarted_asks_above_and_a_late_resign_spares_its_new_grant():
    a = elected()
    a.step_down(0.5)
    b = granted(B, to=A, term=1, at=0.0)
    b.handle(A, el.Resign(1), 0.51)
    # the next process of A, from what the first wrote down
    again = core(A, now=5.0, initial_term=1, initial_promised=1)
    (ask, _) = sent(again.tick(10.0), el.Ask)
    assert ask.msg.term == 2
    assert sent(b.handle(A, ask.msg, 10.01), el.Grant)
    b.handle(A, el.Resign(1), 10.02)  # the first process's RESIGN, duplicated and late
    (deny,) = sent(b.handle(C, el.Ask(3, 8, "c"), 10.03), el.Deny)
    assert deny.msg.wait == pytest.approx(LEASE - 0.02)


def test_resign_survives_the_wire_and_an_incredible_term_is_not_believed():
    assert decode(encode(el.Resign(5)))[0] == el.Resign(5)
    with pytest.raises(RemoteProtocolError, match="'term' should be a term"):
        decode(encode(el.Resign(-1)))
    b = granted(B, to=A, term=1, at=0.0)
    b.handle(A, el.Resign(2**40), 0.3)
    assert sent(b.handle(A, el.Ask(1, 102, "a"), 0.35), el.Grant)  # A renews as before


class MidRandom(random.Random):
    """Back-off jitter at the middle of its range: the explorer's runs are
    then functions of the order of events alone, so equal states merge."""

    def uniform(self, a, b):
        return (a + b) / 2


# B, first in the back-off order once A stopped, stands half a slot after
# the RESIGN (MidRandom), C one slot later: the search ends before C does,
# which would multiply the orders to try without a new kind of one.
HORIZON = 1.2 * LEASE / 8


def explore_hand_over(step_down, horizon=HORIZON) -> tuple[int, str | None, set[str]]:
    """Every order of delivery, duplication (one message, once) and loss of
    the messages around a hand-over, with every timer that falls due within
    `horizon` after it: A holds term 1, has renewal ASKs in flight to B and
    C, and steps down (`step_down(core, now)`). Returns the number of states
    seen, the first violation (two coordinators at one instant, or one term
    with two holders) with the path to it, and who won a later term."""
    cores = {}
    for address in (A, B, C):
        name = address.split("/")[-1].split(":")[0]
        cores[address] = el.Election(name, address, [A, B, C], -10.0, MidRandom(1),
                                     lease=LEASE, story_size=8)  # fmt: skip

    def route(src, actions, flight, holders):
        for a in actions:
            if isinstance(a, Send):
                flight.append((a.to, src, a.msg))
            elif isinstance(a, el.Broadcast):
                flight.extend((to, src, a.msg) for to in (A, B, C) if to != src)
            elif isinstance(a, el.BecameCoordinator):
                if holders.setdefault(a.term, src) != src:
                    return f"term {a.term} held by {holders[a.term]} and {src}"
        return None

    # A wins term 1 and is announced; its first renewal's ASKs stay in flight
    flight, holders = [], {}
    route(A, cores[A].tick(0.0), flight, holders)
    while flight:
        to, src, msg = flight.pop(0)
        route(to, cores[to].handle(src, msg, 0.001), flight, holders)
    assert cores[A].is_coordinator(0.001) and cores[B].coordinator(0.001) == ("a", 1)
    now = cores[A].next_deadline()
    route(A, cores[A].tick(now), flight, holders)
    assert [type(m) for _, _, m in flight] == [el.Ask, el.Ask]
    now += 0.01
    route(A, step_down(cores[A], now), flight, holders)
    end = now + horizon

    seen, successors = set(), set()
    stack = [(cores, tuple(flight), now, True, holders, ())]
    while stack:
        cores, flight, now, dup, holders, path = stack.pop()
        key = (now, dup, tuple(sorted(map(repr, flight))),
               tuple(_core_key(cores[x]) for x in (A, B, C)))  # fmt: skip
        if key in seen:
            continue
        seen.add(key)
        moves = [("deliver", i) for i in range(len(flight))]
        moves += [("duplicate", i) for i in range(len(flight)) if dup]
        due = min(d for d in (c.next_deadline() for c in cores.values()) if d is not None)
        if max(due, now) <= end:
            moves.append(("tick", None))
        for kind, i in moves:
            cs = {x: _clone(c) for x, c in cores.items()}
            hs, fl = dict(holders), list(flight)
            t = now
            if kind == "tick":
                t = max(due, now)
                problem = None
                for address, c in cs.items():
                    d = c.next_deadline()
                    if d is not None and d <= t:
                        problem = problem or route(address, c.tick(t), fl, hs)
                step = f"tick {t:.3f}"
            else:
                to, src, msg = fl[i] if kind == "duplicate" else fl.pop(i)
                problem = route(to, cs[to].handle(src, msg, t), fl, hs)
                step = f"{kind} {type(msg).__name__}{tuple(vars_of(msg))} {src[6]}->{to[6]}"
            here = (*path, step)
            holding = [x for x, c in cs.items() if c.is_coordinator(t)]
            if len(holding) > 1:
                problem = f"{holding} all coordinator at {t:.3f}"
            if problem:
                return len(seen), f"{problem} after: " + "; ".join(here), successors
            successors.update(holder for term, holder in hs.items() if term > 1)
            for c in cs.values():
                c.validate()
            stack.append((cs, tuple(fl), t, dup and kind != "duplicate", hs, here))
    return len(seen), None, successors


def _clone(c: el.Election) -> el.Election:
    """A copy to go on from (cheaper than deepcopy, which made the search
    slow): what the core changes in place is copied, the rest shared; the
    rng (MidRandom) draws nothing after start-up, the story is only told."""
    new = copy.copy(c)
    new._rounds = copy.copy(c._rounds)
    new._rounds._open = {rid: dataclasses.replace(r, grants=set(r.grants), denies=set(r.denies))
                         for rid, r in c._rounds._open.items()}  # fmt: skip
    new._vouching = copy.copy(c._vouching)
    new._vouching._reports = dict(c._vouching._reports)
    new._book = copy.copy(c._book)
    new._outbox = list(c._outbox)
    return new


def vars_of(msg):
    return [getattr(msg, f) for f in msg.__dataclass_fields__ if f != "name"]


def _core_key(c: el.Election) -> tuple:
    rounds = tuple(sorted((rid, r.term, r.sent, r.renewal, tuple(sorted(r.grants)),
                           tuple(sorted(r.denies))) for rid, r in c._rounds._open.items()))  # fmt: skip
    book = c._book
    return (c.state, c.term, c._high, c._asked, book.promised, book.holder, book.round,
            book.until, c._belief, c._lease_term, c._lease_end, c._renew_at, rounds,
            c._rounds.candidacy, c._stand_at, c._attempt, c._bump, c._resigned, c._stopping,
            c._rounds.next_id)  # fmt: skip


def test_every_order_and_loss_of_a_hand_over_keeps_one_coordinator():
    states, problem, successors = explore_hand_over(lambda c, now: c.step_down(now))
    assert problem is None, problem
    assert states > 10_000 and successors == {B}  # B, first in the back-off order, won


def test_the_explorer_finds_a_resign_sent_by_a_coordinator_that_goes_on_acting():
    def resign_only(c, now):
        return [el.Broadcast(el.Resign(c._lease_term), also=(B, C))]

    _, problem, _ = explore_hand_over(resign_only)
    assert problem is not None and "all coordinator" in problem
