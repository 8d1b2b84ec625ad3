"""The mesh core's wiring and the driver's order, alone and on the simulated network."""

from __future__ import annotations

import errno
import random

import pytest
from hostile import mesh_messages
from hypothesis import given, settings
from hypothesis import strategies as st
from sim_strategies import SIM_SETTINGS

from hived.mesh import election as el
from hived.mesh import gossip
from hived.mesh import membership as mb
from hived.mesh.core import MeshCore, MeshDriver
from hived.mesh.gossip import NodeInfo
from hived.testing.simnet import SimNet

HEARTBEAT, DEAD, LEASE = 0.2, 1.5, 1.0  # the timings of the real-host mesh tests
TIMING = {"heartbeat": HEARTBEAT, "dead_after": DEAD, "lease": LEASE}
HEAL_BOUND = 2 * LEASE + HEARTBEAT  # DESIGN: one coordinator for all after a heal


def addr(name: str) -> str:
    return f"tcp://{name}:7700"


class RecordingDriver(MeshDriver):
    """The real driver over primitives that record, with a disk that can fail."""

    def __init__(self, core: MeshCore) -> None:
        self.core = core
        self.done: list[object] = []
        self.disk_full = False
        self.failures: list[tuple[OSError, int]] = []

    def send(self, address, msg):
        self.done.append(mb.Send(address, msg))

    def connect(self, address):
        self.done.append(mb.Connect(address))

    def disconnect(self, address):
        self.done.append(mb.Disconnect(address))

    def write_state(self, term, promised):
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.done.append(el.Persist(term, promised))

    def state_not_written(self, action, exc, dropped):
        self.failures.append((exc, dropped))

    def event(self, event):
        self.done.append(event)


def voter_core(name: str, voters: list[str], now: float = 0.0) -> MeshCore:
    info = NodeInfo(name, addr(name), "0.1.0", 1, 0, 1, incarnation=1)
    return MeshCore(info, voters, now, random.Random(0), **TIMING)


def test_a_failed_persist_drops_the_rest_of_its_batch_and_no_vote_is_promised():
    core = voter_core("v", [addr("v"), addr("a"), addr("b")])
    driver = RecordingDriver(core)
    driver.disk_full = True
    ask = el.Ask(1, 7, "a")
    now = LEASE + 0.1  # past the start-up quarantine
    actions = core.handle(addr("a"), ask, now)
    assert [type(a) for a in actions] == [el.Persist, mb.Send]  # the promise, then the GRANT
    driver.run(actions, now)
    (exc, dropped), = driver.failures
    assert exc.errno == errno.ENOSPC and dropped == 1
    assert not any(isinstance(a, mb.Send) for a in driver.done), "the GRANT left"
    # while nothing can be written, every ask is refused
    driver.done.clear()
    driver.run(core.handle(addr("b"), el.Ask(2, 8, "b"), now + 0.01), now + 0.01)
    assert [type(a.msg) for a in driver.done if isinstance(a, mb.Send)] == [el.Deny]
    # the write is tried again a quarter lease on, and once it succeeds votes resume
    driver.disk_full = False
    retry = core.election.next_deadline()
    assert now < retry <= now + LEASE / 4 + 1e-9
    driver.done.clear()
    driver.run(core.tick(retry), retry)
    assert el.Persist(0, 1) in driver.done and not driver.failures[1:]
    later = now + LEASE + 0.2  # the first (never sent) grant to a has run out
    driver.done.clear()
    driver.run(core.handle(addr("b"), el.Ask(3, 9, "b"), later), later)
    assert driver.done[0] == el.Persist(0, 3)
    assert [type(a.msg) for a in driver.done if isinstance(a, mb.Send)] == [el.Grant]


def test_heartbeats_carry_the_term_after_every_batch():
    core = voter_core("n", [addr("n"), addr("x"), addr("y")])
    leader = el.Leader(5, "x", addr("x"), LEASE)
    core.handle(addr("x"), leader, 0.1)
    assert core.membership.members()[0].term == 5  # what our BEATs and HELLOs say


def test_a_resign_goes_to_every_live_member_and_to_every_voter_even_one_thought_dead():
    net = SimNet.cluster(4, voters=3, seed=2, **TIMING)
    assert net.run_for(5.0, stop=lambda: net.agreed() is not None and net.converged())
    old = net.nodes[net.agreed()[0]]
    voter = net._by_address[next(v for v in old.voters if v != old.address)]
    net.partition([voter.name])
    assert net.run_for(2 * DEAD, stop=lambda: voter.address not in old.membership.live_addresses())
    assert old.election.is_coordinator(old.local(net.now))  # two voters of three renew it
    now = old.local(net.now)
    resigns = [a.to for a in old.core.step_down(now)
               if isinstance(a, mb.Send) and isinstance(a.msg, el.Resign)]  # fmt: skip
    others = {n.address for n in net.nodes.values() if n is not old}
    assert sorted(resigns) == sorted(others)  # each once


def test_a_majority_of_full_disks_elects_nobody_until_one_is_freed():
    net = SimNet.cluster(3, voters=3, seed=3, **TIMING)
    for name in ("n0", "n1"):
        net.nodes[name].disk_full = True
    net.run_for(4 * LEASE)
    assert net.coordinators() == [] and not net.holders
    net.nodes["n1"].disk_full = False
    assert net.run_for(4 * LEASE, stop=lambda: len(net.coordinators()) == 1)


@pytest.mark.parametrize("seed", range(10))
def test_a_restarted_node_learns_the_coordinator_within_one_heartbeat_of_rejoining(seed):
    net = SimNet.cluster(5, voters=3, seed=seed, **TIMING)
    assert net.run_for(5.0, stop=lambda: net.agreed() is not None and net.converged())
    coordinator = net.agreed()
    victim = next(n for n in ("n3", "n4") if n != coordinator[0])
    net.kill(victim)
    net.run_for(0.5)
    net.start(victim)
    node = net.nodes[victim]
    start = net.now
    joined = lambda: coordinator[0] in {m.name for m in node.membership.members()[1:]}  # noqa: E731
    assert net.run_for(2.0, stop=joined)
    rejoined = net.now
    assert net.run_for(HEARTBEAT, stop=lambda: net.views()[victim] is not None), (
        f"{victim} rejoined at {rejoined - start:.3f}s and knew no coordinator a heartbeat later"
    )
    assert net.views()[victim][0] == net.agreed()[0]


@pytest.mark.parametrize("seed", range(10))
def test_after_a_partition_heals_everyone_agrees_within_two_leases_and_a_heartbeat(seed):
    if True:
        net = SimNet.cluster(5, voters=3, seed=seed, **TIMING)
        assert net.run_for(5.0, stop=lambda: net.agreed() is not None and net.converged())
        name, _ = net.agreed()
        others = [n for n in net.nodes if n != name]
        net.partition([name, others[0]], others[1:])  # the coordinator in a minority
        net.run_for(3 * DEAD)
        net.heal()
        healed = net.now
        assert net.run_for(HEAL_BOUND, stop=lambda: net.agreed() is not None), (
            f"seed {seed}: no agreement {HEAL_BOUND}s after the heal: {net.views()}"
        )
        assert net.now - healed <= HEAL_BOUND


# -- a hostile member ----------------------------------------------------------

HONEST = [f"n{i}" for i in range(5)]
ATTACKER = addr("m")


def own_hello(term: int = 0) -> gossip.PeerHello:
    """The attacker's honest introduction, so it is a member and reaches every path."""
    return gossip.PeerHello("m", ATTACKER, "0.1.0", 1, 1, 0, 1, 0.0, "alive", term, 0, False,
                        [], [], [])  # fmt: skip


@settings(SIM_SETTINGS, max_examples=40)
@given(
    seed=st.integers(0, 2**16),
    batch=st.lists(
        st.tuples(st.integers(0, 4), mesh_messages([*HONEST, "m"], [addr(n) for n in [*HONEST, "m"]])),
        max_size=120,
    ),
)
def test_a_hostile_member_does_no_lasting_harm(seed, batch):
    """Whatever one key holder sends from its own connection, within 2 x lease
    + heartbeat of its last message every honest node sees every other alive,
    in its own incarnation, and all agree on an honest coordinator."""
    net = SimNet.cluster(5, voters=3, seed=seed, **TIMING)
    assert net.run_for(5.0, stop=lambda: net.agreed() is not None and net.converged())
    incarnations = {n: net.nodes[n].incarnation for n in HONEST}
    for name in HONEST:
        net.inject(ATTACKER, name, own_hello())
    taken = 0
    for to, (msg, _) in batch:
        taken += net.inject(ATTACKER, HONEST[to], msg)
        net.run_for(0.005)
    ended = net.now

    def healed() -> bool:
        agreed = net.agreed()
        return agreed is not None and agreed[0] in HONEST and net.converged(exact=True)

    assert net.run_for(HEAL_BOUND, stop=healed), (
        f"{HEAL_BOUND}s after the attack ({len(batch)} messages, {taken} taken): "
        f"{net.views()}\n" + "\n".join(net.log)
    )
    assert net.now - ended <= HEAL_BOUND
    assert {n: net.nodes[n].incarnation for n in HONEST} == incarnations
    for n in HONEST:
        assert net.nodes[n].election.term <= max(net.nodes[m].election.term for m in HONEST)
