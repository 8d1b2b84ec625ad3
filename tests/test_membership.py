"""The membership core, alone and on the simulated network (no event loop)."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sim_strategies import SIM_SETTINGS, fault_schedules

from hived.config import DEFAULT_DEAD_AFTER, DEFAULT_HEARTBEAT
from hived.errors import InternalError, RemoteProtocolError
from hived.mesh import membership as mb
from hived.mesh import peers
from hived.mesh.gossip import BEAT_VARIANTS, Beat, Leave, NodeInfo, PeerHello
from hived.protocol.wire import decode, encode
from hived.testing.simnet import Faults, SimNet

H, DEAD = DEFAULT_HEARTBEAT, DEFAULT_DEAD_AFTER
GRAIN = H / 4  # thresholds are checked on a quarter-heartbeat wheel


def addr(name: str) -> str:
    return f"tcp://{name}:7700"


def node(name: str, seeds=(), now: float = 0.0, inc: int = 1, **options) -> mb.Membership:
    info = NodeInfo(name, addr(name), "0.1.0", cpus=8, gpus=1, slots_free=8, incarnation=inc)
    return mb.Membership(info, [addr(s) for s in seeds], H, DEAD, now, random.Random(0), **options)


def hello(name: str, inc: int = 1, reply: bool = False, term: int = 0, gossip=(),
          at: str | None = None) -> PeerHello:
    names = [g[0] for g in gossip]
    return PeerHello(name, addr(at or name), "0.1.0", inc, 4, 0, 4, 0.5, "alive", term, 7, reply,
                 names, [addr(n) for n in names], [g[1] for g in gossip])  # fmt: skip


def beat(name: str, inc: int = 1, term: int = 0, state: str = "alive", gossip=()) -> Beat:
    names = [g[0] for g in gossip]
    return Beat(name, inc, 3, 0.25, state, term, 7, names, [addr(n) for n in names],
                [g[1] for g in gossip])  # fmt: skip


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def sends(actions, kind=mb.Message):
    return [a for a in of(actions, mb.Send) if isinstance(a.msg, kind)]


def run(m: mb.Membership, until: float, now: float = 0.0) -> list[tuple[float, object]]:
    """Tick `m` at each of its deadlines up to `until`; (time, action) pairs."""
    seen = []
    while True:
        due = m.next_deadline()
        if due is None or due > until:
            return seen
        now = max(now, due)
        seen += [(now, a) for a in m.tick(now)]


# -- one core ---------------------------------------------------------------


def test_hello_on_connect_makes_members_on_both_sides():
    a, b = node("a", seeds=["b"]), node("b")
    first = a.tick(0.0)
    assert first[0] == mb.Connect(addr("b"))
    (ask,) = sends(first, PeerHello)
    assert ask.to == addr("b") and ask.msg.reply and ask.msg.cpus == 8
    answer = b.handle(addr("a"), ask.msg, 0.01)
    (joined,) = of(answer, mb.PeerJoined)
    assert joined.member.name == "a" and joined.member.cpus == 8 and joined.member.gpus == 1
    assert mb.Connect(addr("a")) in answer
    (back,) = sends(answer, PeerHello)
    assert back.to == addr("a") and not back.msg.reply
    assert of(a.handle(addr("b"), back.msg, 0.02), mb.PeerJoined)
    assert [(v.name, v.state) for v in a.members()] == [("a", "alive"), ("b", "alive")]
    assert a.members()[1].last_heard == 0.02 and a.members()[0].last_heard is None


def test_a_tick_on_a_millisecond_clock_ends_and_arms_in_the_future():
    # uvloop's clock counts whole milliseconds: heard at 1.35 s and ticked at
    # 1.75 s, the age 1.75 - 1.35 is just under suspect_after (0.4 s) in
    # floating point while the deadline 1.35 + 0.4 is 1.75 itself. Comparing
    # ages and arming deadlines once re-armed the peer at "now" for ever.
    m = mb.Membership(NodeInfo("a", addr("a"), "0.1.0", 1, 0, 1, incarnation=1), [],
                      0.2, 1.5, 0.0, random.Random(0))  # fmt: skip
    m.handle(addr("b"), hello("b"), 1.35)
    actions = m.tick(1.75)
    assert of(actions, mb.PeerStateChanged) == [
        mb.PeerStateChanged("b", addr("b"), "alive", "suspect")
    ]
    assert m.next_deadline() > 1.75


@pytest.mark.parametrize("heartbeat", [0.2, 0.5, 1.0])
def test_every_tick_on_a_millisecond_clock_arms_its_peers_in_the_future(heartbeat):
    # every millisecond a peer may be heard at, over 10 s, each peer's life
    # ticked through as the shell's timer fires: on the next whole millisecond
    m = mb.Membership(NodeInfo("a", addr("a"), "0.1.0", 1, 0, 1, incarnation=1), [],
                      heartbeat, 7.5 * heartbeat, 0.0, random.Random(0))  # fmt: skip
    wedged = []
    for ms in range(1, 10_001):
        now = ms / 1000
        m.handle(addr("p"), hello("p", inc=ms), now)
        for _ in range(4):  # alive -> suspect -> dead -> probed
            now = max(now, math.ceil(m.next_deadline() * 1000) / 1000)
            m.tick(now)
            if m.next_deadline() <= now:
                wedged.append(ms)
                break
    assert not wedged, f"a tick left a peer armed at or before now, heard at {wedged[:5]} ms"


def test_heartbeats_are_one_small_beat_per_live_peer():
    def beats_of(n: int) -> list[mb.Send]:
        m = node("me")
        for i in range(n):
            m.handle(addr(f"p{i}"), hello(f"p{i}"), 0.0)
        return sends(m.tick(H), Beat)

    small, large = beats_of(10), beats_of(1000)
    assert len(small) == 10 and len(large) == 1000
    assert len({b.to for b in large}) == 1000
    assert all(len(b.msg.names) == 3 for b in large)
    size = max(sum(len(f) for f in encode(b.msg)) for b in large)
    # only the longer names ("p999" vs "p9", in 3 names and 3 addresses) add bytes
    assert size <= max(sum(len(f) for f in encode(b.msg)) for b in small) + 3 * 2 * 3
    assert size < 200
    gossiped = {name for b in large for name in b.msg.names}
    assert len(gossiped) == 3 * BEAT_VARIANTS  # a random slice per variant


def test_heartbeats_carry_load_slots_and_tasks_done():
    a, b = node("a"), node("b")
    a.handle(addr("b"), hello("b"), 0.0)
    b.handle(addr("a"), hello("a"), 0.0)
    b.update(load=1.5, slots_free=2, tasks_done=41)
    (beat_to_a,) = sends(b.tick(H), Beat)
    a.handle(addr("b"), beat_to_a.msg, H)
    view = a.member("b")
    assert (view.load, view.slots_free, view.tasks_done) == (1.5, 2, 41)


def test_any_message_counts_as_liveness():
    a = node("a")
    a.handle(addr("b"), hello("b"), 0.0)
    now = 0.0
    while now < 10.0:
        now += 0.9  # quieter than a heartbeat, but never silent for 2
        assert a.heard_from(addr("b"), now) == []
        a.tick(now)
    assert a.member("b").state == "alive"
    assert a.heard_from(addr("stranger"), now) == []


def test_a_quiet_peer_turns_suspect_then_dead_then_is_forgotten():
    a = node("a", forget_after=20.0)
    a.handle(addr("b"), hello("b"), 0.0)
    events = run(a, 40.0)
    changes = [(t, e.new) for t, e in events if isinstance(e, mb.PeerStateChanged)]
    (t_suspect, _), (t_dead, _) = changes
    assert [c[1] for c in changes] == ["suspect", "dead"]
    assert 2 * H <= t_suspect < 2 * H + GRAIN  # two heartbeats quiet
    assert DEAD <= t_dead < DEAD + GRAIN
    (left,) = [(t, e) for t, e in events if isinstance(e, mb.PeerLeft)]
    assert left[1].reason == "forgotten" and t_dead + 20.0 <= left[0] < t_dead + 20.0 + GRAIN
    assert (left[0], mb.Disconnect(addr("b"))) in events
    # while dead it was probed with HELLOs at growing intervals, capped
    probes = [t for t, e in events if isinstance(e, mb.Send) and isinstance(e.msg, PeerHello)]
    gaps = [b - a for a, b in pairwise(probes)]
    assert probes[0] == pytest.approx(t_dead + H, abs=GRAIN) and gaps == sorted(gaps)
    assert max(gaps) == pytest.approx(DEAD, abs=GRAIN)
    assert [v.name for v in a.members()] == ["a"]


def test_a_dead_peer_heard_again_is_alive_again():
    a = node("a")
    a.handle(addr("b"), hello("b"), 0.0)
    run(a, 5.0)
    assert a.member("b").state == "dead"
    (change,) = of(a.handle(addr("b"), beat("b"), 5.1), mb.PeerStateChanged)
    assert (change.old, change.new) == ("dead", "alive") and a.live_count == 1


def test_leave_removes_the_peer_at_once_and_stale_gossip_cannot_bring_it_back():
    a = node("a")
    a.handle(addr("b"), hello("b", inc=4), 0.0)
    a.handle(addr("c"), hello("c"), 0.0)
    out = a.handle(addr("b"), Leave("b", 4), 1.0)
    assert of(out, mb.PeerLeft) == [mb.PeerLeft("b", addr("b"), 4, "left")]
    assert mb.Disconnect(addr("b")) in out and a.member("b") is None
    assert a.handle(addr("c"), beat("c", gossip=[("b", 4)]), 1.1) == []
    # a new process under that name is welcome
    assert sends(a.handle(addr("c"), beat("c", gossip=[("b", 5)]), 1.2), PeerHello)


def test_a_higher_incarnation_supersedes_and_a_lower_one_is_ignored():
    a = node("a")
    a.handle(addr("b"), hello("b", inc=5), 0.0)
    assert a.handle(addr("b"), hello("b", inc=4, reply=True), 0.1) == []
    assert a.handle(addr("b"), beat("b", inc=4), 0.1) == []
    out = a.handle(addr("b"), hello("b", inc=6), 0.2)
    assert of(out, mb.PeerLeft) == [mb.PeerLeft("b", addr("b"), 5, "restarted")]
    assert of(out, mb.PeerJoined)[0].member.incarnation == 6


def test_gossip_about_a_stranger_dials_it_and_it_joins_when_it_answers():
    a = node("a")
    a.handle(addr("b"), hello("b"), 0.0)
    out = a.handle(addr("b"), beat("b", gossip=[("c", 2)]), 0.1)
    assert out[0] == mb.Connect(addr("c")) and sends(out, PeerHello)[0].msg.reply
    assert a.member("c") is None  # hearsay is not membership
    assert of(a.handle(addr("c"), hello("c", inc=2), 0.2), mb.PeerJoined)
    # hearsay that never answers is dropped
    a.handle(addr("b"), beat("b", gossip=[("ghost", 1)]), 0.3)
    run(a, 10.0, now=0.3)
    assert "ghost" not in {v.name for v in a.members()} and "ghost" not in a._peers.by_name


def test_unreachable_seeds_are_retried_with_back_off():
    a = node("a", seeds=["s", "a"])  # its own address among the seeds is skipped
    events = run(a, 60.0)
    dials = [t for t, e in events if e == mb.Connect(addr("s"))]
    assert addr("a") not in {e.address for _, e in events if isinstance(e, mb.Connect)}
    gaps = [b - a for a, b in pairwise(dials)]
    assert dials[0] == 0.0 and gaps[0] == pytest.approx(H, rel=0.21)
    assert max(gaps) <= DEAD * 1.21 and gaps[-1] >= DEAD * 0.79 and len(dials) < 30
    # once it answers (and while it stays alive) the retries stop
    a.handle(addr("s"), hello("s"), 60.0)
    later = run(a, 60.0 + DEAD - H, now=60.0)
    assert mb.Connect(addr("s")) not in [e for _, e in later]
    assert sends([e for _, e in later], Beat)


def test_terms_in_heartbeats_are_reported_once_and_never_go_back():
    a = node("a")
    a.handle(addr("b"), hello("b", term=2), 0.0)
    assert of(a.handle(addr("b"), beat("b", term=5), 0.1), mb.TermSeen) == [mb.TermSeen(addr("b"), 5)]
    assert of(a.handle(addr("b"), beat("b", term=5), 0.2), mb.TermSeen) == []
    assert of(a.handle(addr("b"), beat("b", term=3), 0.3), mb.TermSeen) == []
    assert a.member("b").term == 5
    a.set_term(7)
    assert sends(a.tick(H), Beat)[0].msg.term == 7 and a.members()[0].term == 7


def test_draining_shows_in_the_view():
    a, b = node("a"), node("b")
    a.handle(addr("b"), hello("b"), 0.0)
    b.handle(addr("a"), hello("a"), 0.0)
    b.update(state="draining", slots_free=0, load=3.5)
    (msg,) = sends(b.tick(H), Beat)
    out = a.handle(addr("b"), msg.msg, H)
    assert of(out, mb.PeerStateChanged) == [
        mb.PeerStateChanged("b", addr("b"), "alive", "draining")
    ]
    view = a.member("b")
    assert (view.state, view.slots_free, view.load) == ("draining", 0, 3.5)
    with pytest.raises(InternalError, match="alive or draining"):
        b.update(state="asleep")


@pytest.mark.parametrize(
    "msg, match",
    [
        (Beat("b", 1, 1, 0.0, "alive", 0, 0, ["x", "y"], [addr("x")], [1, 1]), "malformed"),
        (Beat("b", 1, 1, 0.0, "zombie", 0, 0, [], [], []), "alive or draining"),
        (Beat("", 1, 1, 0.0, "alive", 0, 0, [], [], []), "'name' should be a node name"),
        (Beat("b", 1, 1, math.nan, "alive", 0, 0, [], [], []), "finite load"),
        (Beat("b", 1, -1, 0.0, "alive", 0, 0, [], [], []), "'slots_free' should be a count"),
        (Beat("b", 2**62, 1, 0.0, "alive", 0, 0, [], [], []), "an incarnation from 0 to 2"),
        (Beat("b", 1, 1, 0.0, "alive", 2**62 - 1, 0, [], [], []), "a term from 0 to 2"),
        (Beat("b", 1, 1, 0.0, "alive", 0, 0, ["x"] * 65, ["y"] * 65, [1] * 65), "at most 64"),
        (Beat("b", 1, 1, 0.0, "alive", 0, 0, [""], ["y"], [1]), "'names' should be"),
        (Beat("b", 1, 1, 0.0, "alive", 0, 0, ["x"], ["tcp://*:1"], [1]), "'addresses' should be"),
        (Leave("", 1), "'name' should be a node name"),
    ],
)
def test_peer_nonsense_is_refused_where_it_is_decoded(msg, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(encode(msg))


def test_a_peer_claiming_our_name_is_refused():
    a = node("a")
    with pytest.raises(RemoteProtocolError, match="claims our name"):
        a.handle(addr("b"), hello("a", inc=9, at="b"), 0.0)
    a.validate()


def test_misuse_raises_local_protocol_error():
    record = peers.Peer("b", addr("b"), 3, 0.0)
    record.status = peers.DEAD
    with pytest.raises(InternalError, match=r"peer 'b' \(incarnation 3\): event quiet in state dead"):
        peers.next_status(record, peers.PeerEvent.QUIET)
    with pytest.raises(InternalError, match="not one of its messages"):
        node("a").handle(addr("b"), mb.Send("x", beat("b")), 0.0)  # type: ignore[arg-type]
    with pytest.raises(InternalError, match="heartbeat < suspect_after < dead_after"):
        mb.Membership(node("a").info, [], 1.0, 1.5, 0.0, random.Random())


def test_after_leave_the_core_is_quiet():
    a = node("a")
    a.handle(addr("b"), hello("b"), 0.0)
    assert a.leave(1.0) == [mb.Send(addr("b"), Leave("a", 1))]
    assert a.tick(2.0) == [] and a.handle(addr("b"), beat("b"), 2.0) == []
    assert a.next_deadline() is None and a.leave(3.0) == []


def test_the_story_is_bounded_and_numbered():
    a = node("a", story_size=8)
    for i in range(20):
        a.handle(addr(f"p{i}"), hello(f"p{i}"), float(i))
    events = a.story.events()
    assert len(events) == 8 and [e.id for e in events] == list(
        range(events[0].id, events[0].id + 8)
    )
    assert "story of membership of a" in a.story.format() and "p19" in a.story.format()


@pytest.mark.parametrize(
    "msg", [hello("a", gossip=[("b", 2)]), beat("a", term=3), Leave("a", 1)]
)
def test_messages_survive_the_wire(msg):
    assert decode(encode(msg))[0] == msg


# -- the simulated network ----------------------------------------------------


def test_a_node_that_knows_one_seed_learns_everyone():
    net = SimNet.cluster(30, voters=1, seed=4, codec=True)
    assert net.run_for(2.0, stop=net.converged)
    # and along a chain: each node knows only the one before it
    chain = SimNet(5)
    for i in range(12):
        chain.add_node(f"c{i}", [addr(f"c{i - 1}")] if i else [], voters=[addr("c0")])
    assert chain.run_for(3.0, stop=lambda: chain.converged(exact=True))


def test_a_seed_that_starts_late_is_found():
    net = SimNet(6)
    net.add_node("s", [], start=False)
    for name in ("a", "b", "c"):
        net.add_node(name, [addr("s")], voters=[addr("s")])
    net.run_for(20.0)
    net.start("s")
    assert net.run_for(DEAD * 1.2 + 1.0, stop=lambda: net.converged(exact=True))


def test_a_killed_node_is_marked_dead_and_rejoins_after_restart():
    net = SimNet.cluster(4, voters=3, seed=8, record=True)
    net.run_for(5.0)
    old = net.nodes["n3"].incarnation
    net.kill("n3")
    net.run_for(DEAD + 2 * H)
    assert {n.name: n.membership.member("n3").state for n in net.alive()} == {
        "n0": "dead", "n1": "dead", "n2": "dead",
    }  # fmt: skip
    net.restart("n3")
    assert net.run_for(DEAD * 1.2 + 1.0, stop=lambda: net.converged(exact=True))
    for n in net.alive():
        if n.name != "n3":
            assert n.membership.member("n3").incarnation > old
            left = [e for _, e in n.events if isinstance(e, mb.PeerLeft) and e.name == "n3"]
            assert [e.reason for e in left] == ["restarted"]


def test_a_node_restarted_faster_than_dead_after_replaces_its_old_self():
    net = SimNet.cluster(4, voters=3, seed=9)
    net.run_for(3.0)
    net.restart("n2")
    assert net.run_for(1.0, stop=lambda: net.converged(exact=True))
    assert {n.membership.member("n2").incarnation for n in net.alive()} == {
        net.nodes["n2"].incarnation
    }


def test_a_graceful_leave_is_seen_at_once():
    net = SimNet.cluster(5, voters=3, seed=10)
    net.run_for(3.0)
    net.leave("n4")
    net.run_for(0.1)
    assert all(n.membership.member("n4") is None for n in net.alive())
    net.run_for(10.0)  # gossip in flight does not bring it back
    assert all(n.membership.member("n4") is None for n in net.alive())


def test_a_healed_partition_finds_itself_again():
    net = SimNet.cluster(6, voters=3, seed=12)
    net.run_for(3.0)
    net.partition(["n0", "n1", "n2"], ["n3", "n4", "n5"])
    net.run_for(2 * DEAD)
    assert net.nodes["n0"].membership.member("n5").state == "dead"
    net.heal()
    assert net.run_for(DEAD * 1.2 + 1.0, stop=lambda: net.converged(exact=True))


MEMBERSHIP_OPS = fault_schedules(run_for=5.0, max_size=25, leave=True)
# a dead pair finds itself again within one capped probe interval (dead_after,
# +20% jitter for seeds), then HELLO round trips and the gossip of a few periods
CONVERGE_BOUND = DEAD * 1.2 + 4 * H + 1.0


@SIM_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(2, 7), ops=MEMBERSHIP_OPS)
def test_membership_converges_after_any_schedule(seed, size, ops):
    """Every core's invariants hold after every event (SimNet validates them);
    once the network is whole and clean, every live node sees every other
    live node alive within CONVERGE_BOUND."""
    net = SimNet.cluster(size, voters=min(size, 3), seed=seed)
    for op in ops:
        net.apply(op)
    net.heal()
    net.free_disks()
    net.faults = Faults()
    seeds = [f"n{i}" for i in range(min(size, 3))]
    if not any(net.nodes[name].alive for name in seeds):
        net.start(seeds[0])  # with every seed gone, nobody new could be found
    assert net.run_for(CONVERGE_BOUND, stop=lambda: net.converged(exact=True)), {
        n.name: [(v.name, v.state) for v in n.membership.members()] for n in net.alive()
    }


# -- hostile members ---------------------------------------------------------


def test_a_member_cannot_speak_for_another_nor_make_it_leave():
    """The issue's poisoning: HELLO naming n2, then LEAVE at 2**53 - 1, from m's connection."""
    a = node("a")
    a.handle(addr("n2"), hello("n2", inc=5), 0.0)
    a.handle(addr("m"), hello("m", inc=1), 0.0)
    with pytest.raises(RemoteProtocolError, match="speaks only for itself"):
        a.handle(addr("m"), hello("n2", inc=2**53 - 1), 0.1)  # n2's address, m's connection
    with pytest.raises(RemoteProtocolError, match="the live member at tcp://n2:7700 holds"):
        a.handle(addr("m"), hello("n2", inc=2**53 - 1, at="m"), 0.1)
    with pytest.raises(RemoteProtocolError, match="'m' is the member there"):
        a.handle(addr("m"), Leave("n2", 2**53 - 1), 0.2)
    with pytest.raises(RemoteProtocolError, match="'m' is the member there"):
        a.handle(addr("m"), beat("n2", inc=5), 0.2)
    assert a.member("n2").state == "alive" and a.member("n2").incarnation == 5
    a.validate()


def test_gossip_of_a_huge_incarnation_only_asks_the_member_itself():
    a = node("a")
    a.handle(addr("n2"), hello("n2", inc=5), 0.0)
    a.handle(addr("m"), hello("m", inc=1), 0.0)
    asked = []
    for i in range(20):  # a rumour every 50 ms for a second
        out = a.handle(addr("m"), beat("m", gossip=[("n2", 2**53 - 1)]), 0.05 * i)
        assert not of(out, mb.PeerLeft)
        asked += [s.to for s in sends(out, PeerHello)]
    assert asked == [addr("n2")] * 2  # at most once a heartbeat (0.5 s), and only n2 itself
    a.handle(addr("n2"), hello("n2", inc=5), 1.0)  # its own answer: still 5
    assert a.member("n2").incarnation == 5 and a.member("n2").state == "alive"
    a.validate()


def test_an_inflated_incarnation_does_not_outlive_its_process():
    a = node("a")
    a.handle(addr("b"), hello("b", inc=2**53 - 1), 0.0)
    assert a.handle(addr("b"), hello("b", inc=7), 0.1) == []  # a late HELLO, while it lives
    run(a, DEAD + 1.0)
    assert a.member("b").state == "dead"
    out = a.handle(addr("b"), hello("b", inc=7), DEAD + 1.1)  # a new process at b
    assert of(out, mb.PeerJoined) and a.member("b").incarnation == 7
    # a LEAVE of that process buries only its own incarnation
    a.handle(addr("b"), Leave("b", 7), DEAD + 1.2)
    a.handle(addr("x"), hello("x", gossip=[("b", 7)]), DEAD + 1.3)  # stale hearsay of it
    assert "b" not in a._peers.by_name
    assert of(a.handle(addr("b"), hello("b", inc=8), DEAD + 1.4), mb.PeerJoined)
    a.validate()


def test_a_flood_of_made_up_names_dials_a_bounded_number():
    a = node("a")
    a.handle(addr("m"), hello("m"), 0.0)
    dialled = set()
    for i in range(40):
        names = [(f"x{i}-{j}", 1) for j in range(64)]
        out = a.handle(addr("m"), beat("m", gossip=names), 0.001 * i)
        dialled |= {c.address for c in of(out, mb.Connect)}
    assert len(dialled) == mb.HEARSAY_LIMIT
    a.validate()
