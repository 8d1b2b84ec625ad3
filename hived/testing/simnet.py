"""A simulated network that drives the mesh core with a manual clock.

Each simulated node runs what a real node runs: one `MeshCore` (membership
and election wired together, hived.mesh.core) carried out by a `MeshDriver`
(the same class the daemon's shell subclasses, so the order of actions and
the persist-before-send rule are the daemon's own):

    MeshDriver.run ──▶ Send ──▶ faults (partition, drop, dup, delay, reorder) ──▶ heap
                   ──▶ Persist ──▶ the node's "disk" (which can be made full)
    heap ──▶ DELIVER: core.handle       WAKE: core.tick (at its deadline)
         ──▶ LINK:    core.link_up      (a DEALER's link made again: after a
                                         heal, or a peer's restart)

Time is a real (simulated) clock `net.now`; each node reads its own monotonic
clock `offset + rate * now`, read in whole milliseconds as uvloop's is
(`clock_resolution`), with rates skewed within the drift bound so that
any two clocks' rates differ by a ratio of at most 1 - max_drift. A killed
node loses its cores and everything in flight to it; a restarted node gets
fresh cores (new incarnation, the persisted terms, the same clock); a
stopped one hands its lease over as the daemon does on SIGTERM and drains,
a member still, until it leaves or is killed. Every
random choice comes from one seeded `random.Random`, so a run is a pure
function of its seed and the operations applied.

With `check=True` (tests), after every event the net checks: no two nodes
believe `is_coordinator` at the same real instant, no node's term goes
backwards (across restarts too, but for what a full disk kept from being
written), no term has two holders, no GRANT or ASK
leaves before the promise it rests on is on disk, and each core's own
`validate()`. A failure raises `InvariantViolation` with the cores' stories.
"""

from __future__ import annotations

import errno
import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from hived.config import DEFAULT_DEAD_AFTER, DEFAULT_HEARTBEAT, DEFAULT_LEASE
from hived.errors import RemoteProtocolError
from hived.mesh import election as el
from hived.mesh import gossip
from hived.mesh import membership as mb
from hived.mesh.core import Event, MeshCore, MeshDriver
from hived.protocol.wire import Message, decode, encode

DELIVER, WAKE, LINK = 0, 1, 2


class InvariantViolation(AssertionError):
    pass


@dataclass
class Faults:
    """What the network does to each message (probabilities per message)."""

    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0  # chance of an extra delay of up to `reorder_delay`
    latency: tuple[float, float] = (0.0005, 0.005)
    reorder_delay: float = 0.3


class SimNode(MeshDriver):
    """One simulated process: its clock, its disk, and the driver of its core."""

    def __init__(self, net: SimNet, name: str, address: str, seeds: list[str],
                 voters: list[str], rate: float, offset: float, cpus: int = 4,
                 gpus: int = 0) -> None:  # fmt: skip
        self.net, self.name, self.address = net, name, address
        self.seeds = seeds
        self.voters = voters  # the shell uses the seeds; tests of gossip may differ
        self.rate, self.offset = rate, offset
        self.cpus, self.gpus = cpus, gpus
        self.alive = False
        self.epoch = 0
        self.incarnation = 0
        self.disk = (0, 0)  # what Persist wrote: (term, promised)
        self.disk_full = False
        self.unwritten = False  # a Persist failed since the last one that succeeded
        # self.core (MeshDriver's): a fresh MeshCore each time SimNet.start runs it
        self.dialled: set[str] = set()  # where this process has a DEALER
        self.wake_at = math.inf
        self.last_term = 0
        self.spins = 0
        self.events: list = []  # (real time, event) when recording

    @property
    def membership(self) -> mb.Membership:
        return self.core.membership

    @property
    def election(self) -> el.Election:
        return self.core.election

    def local(self, real: float) -> float:
        t = self.offset + self.rate * real
        res = self.net.clock_resolution
        return math.floor(t / res + 1e-6) * res if res else t

    # -- MeshDriver --------------------------------------------------------

    def send(self, address: str, msg: Message) -> None:
        if isinstance(msg, (el.Grant, el.Ask)) and msg.term > self.disk[1]:
            self.net._violation(
                f"{self.name} sent {type(msg).__name__} for term {msg.term} with "
                f"promised {self.disk[1]} on disk", [self])  # fmt: skip
        self.net._send(self, address, msg, self.net.now)

    def connect(self, address: str) -> None:
        self.dialled.add(address)

    def disconnect(self, address: str) -> None:
        self.dialled.discard(address)

    def write_state(self, term: int, promised: int) -> None:
        if self.disk_full:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.disk = (term, promised)

    def state_not_written(self, action: el.Persist, exc: OSError, dropped: int) -> None:
        self.unwritten = True

    def state_written(self) -> None:
        self.unwritten = False

    def event(self, event: Event) -> None:
        self.net._event(self, event)


class SimNet:
    def __init__(
        self,
        seed: int = 0,
        *,
        heartbeat: float = DEFAULT_HEARTBEAT,
        dead_after: float = DEFAULT_DEAD_AFTER,
        lease: float = DEFAULT_LEASE,
        max_drift: float = 0.01,
        min_margin: float = 0.01,
        skew: bool = True,
        check: bool = True,
        codec: bool = False,
        record: bool = False,
        faults: Faults | None = None,
        membership_options: dict | None = None,
        clock_resolution: float = 0.001,
    ) -> None:
        self.rng = random.Random(seed)
        self.clock_resolution = clock_resolution
        self.heartbeat, self.dead_after, self.lease = heartbeat, dead_after, lease
        self.max_drift, self.min_margin = max_drift, min_margin
        self.skew, self.check, self.codec, self.record = skew, check, codec, record
        self.faults = faults or Faults()
        self.membership_options = membership_options or {}
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self._by_address: dict[str, SimNode] = {}
        self._heap: list[tuple] = []
        self._seq = 0
        self._groups: dict[str, int] | None = None  # None: no partition
        self.holders: dict[int, str] = {}  # term -> the node that held it
        self.elections: list[tuple[float, str, int]] = []  # (real time, name, term) won
        self.log: deque[str] = deque(maxlen=200)
        self.delivered = 0
        # traffic meter: (node name, message type) -> count / bytes
        self.meter_on = False
        self.meter_bytes_for: set[str] = set()
        self.sent: Counter[tuple[str, bytes]] = Counter()
        self.sent_bytes: Counter[tuple[str, bytes]] = Counter()

    # -- building ----------------------------------------------------------

    @classmethod
    def cluster(cls, n: int, voters: int = 3, seed: int = 0, **options) -> SimNet:
        """n nodes n0..n{n-1}; the first `voters` are the seeds everyone knows."""
        net = cls(seed, **options)
        seeds = [net.address_of(f"n{i}") for i in range(min(voters, n))]
        for i in range(n):
            net.add_node(f"n{i}", seeds)
        return net

    @staticmethod
    def address_of(name: str) -> str:
        return f"tcp://{name}:7700"

    def add_node(
        self,
        name: str,
        seeds: list[str],
        *,
        voters: list[str] | None = None,
        start: bool = True,
        **resources,
    ) -> SimNode:
        half = self.max_drift / 2
        rate = 1.0 + self.rng.uniform(-half, half) if self.skew else 1.0
        voters = list(seeds if voters is None else voters)
        node = SimNode(self, name, self.address_of(name), list(seeds), voters, rate,
                       self.rng.uniform(0, 100), **resources)  # fmt: skip
        self.nodes[name] = node
        self._by_address[node.address] = node
        if start:
            self.start(name)
        return node

    def start(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive:
            raise ValueError(f"{name} is already running")
        node.alive = True
        node.epoch += 1
        node.wake_at = math.inf
        now = node.local(self.now)
        node.incarnation = max(node.incarnation + 1, int(now * 1000))
        rng = random.Random(self.rng.getrandbits(64))
        info = gossip.NodeInfo(name, node.address, "0.1.0", node.cpus, node.gpus, node.cpus,
                               incarnation=node.incarnation)  # fmt: skip
        node.dialled = set()
        if node.unwritten:  # what it knew and could not write is rightly forgotten
            node.last_term, node.unwritten = node.disk[0], False
        node.core = MeshCore(
            info, node.seeds, now, rng, heartbeat=self.heartbeat, dead_after=self.dead_after,
            lease=self.lease, voters=node.voters, max_drift=self.max_drift,
            min_margin=self.min_margin, initial_term=node.disk[0],
            initial_promised=node.disk[1], membership_options=self.membership_options,
        )  # fmt: skip
        self.log.append(f"{self.now:.4f} start {name} inc {node.incarnation}")
        self._schedule_wake(node)
        # the peers' DEALERs to this address reconnect to the new process
        self._links_up((other, node) for other in self.alive() if node.address in other.dialled)

    def kill(self, name: str) -> None:
        node = self.nodes[name]
        if node.alive:
            node.alive = False
            node.epoch += 1
            self.log.append(f"{self.now:.4f} kill {name}")

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start(name)

    def stop(self, name: str) -> None:
        """SIGTERM, as the daemon takes it: the node hands the lease over
        (Election.step_down) and drains, a member still, until a later
        `leave`, `kill` or `restart` ends the process."""
        node = self.nodes[name]
        if node.alive:
            now = node.local(self.now)
            node.run(node.core.step_down(now), now)
            self._schedule_wake(node)
            self.log.append(f"{self.now:.4f} stop {name}")

    def leave(self, name: str) -> None:
        """A graceful stop: LEAVE to every peer, then the process ends."""
        node = self.nodes[name]
        if node.alive:
            node.run(node.core.leave(node.local(self.now)), node.local(self.now))
            self.kill(name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the nodes into groups; nodes in no group form one more group."""
        where = {name: len(groups) for name in self.nodes}
        for i, group in enumerate(groups):
            for name in group:
                where[name] = i
        self._groups = where
        self.log.append(f"{self.now:.4f} partition {[sorted(g) for g in groups]}")

    def apply(self, op: tuple) -> None:
        """Carry out one step of a schedule (tests/sim_strategies.py: `fault_schedules`),
        then run 50 ms."""
        names = list(self.nodes)
        kind = op[0]
        if kind == "run":
            self.run_for(op[1])
        elif kind in ("kill", "restart", "leave", "stop"):
            getattr(self, kind)(names[op[1] % len(names)])
        elif kind == "partition":
            groups: dict[int, list[str]] = {}
            for name, group in zip(names, op[1], strict=False):
                groups.setdefault(group, []).append(name)
            self.partition(*groups.values())
        elif kind == "heal":
            self.heal()
        elif kind == "disk":  # a node's disk fills up, or has room again
            node = self.nodes[names[op[1] % len(names)]]
            node.disk_full = op[2]
            self.log.append(f"{self.now:.4f} disk of {node.name} {'full' if op[2] else 'freed'}")
        else:
            self.faults = Faults(drop=op[1], dup=op[2], reorder=op[3])
        self.run_for(0.05)

    def inject(self, sender: str, to: str, msg: Message) -> bool:
        """What a key holder at address `sender` sends node `to`, now: decoded as
        the daemon's shell decodes it, and dropped, as the shell drops it, if
        refused (a RemoteProtocolError). True if the node took it."""
        node = self.nodes[to]
        if not node.alive:
            return False
        now = node.local(self.now)
        try:
            actions = node.core.handle(sender, decode(encode(msg))[0], now)
        except RemoteProtocolError:
            return False
        node.run(actions, now)
        self._schedule_wake(node)
        if self.check:
            self.check_invariants(node)
        return True

    def heal(self) -> None:
        groups, self._groups = self._groups, None
        self.log.append(f"{self.now:.4f} heal")
        if groups is not None:  # every DEALER across the cut makes its link again
            by_address = self._by_address
            self._links_up(
                (n, by_address[a]) for n in self.alive() for a in sorted(n.dialled)
                if a in by_address and groups[by_address[a].name] != groups[n.name]
            )  # fmt: skip

    def free_disks(self) -> None:
        for node in self.nodes.values():
            node.disk_full = False

    def _links_up(self, pairs: Iterable[tuple[SimNode, SimNode]]) -> None:
        """`node`'s link to `peer` comes up after a connect's round trip."""
        lo, hi = self.faults.latency
        for node, peer in pairs:
            self._seq += 1
            delay = 2 * (lo + (hi - lo) * self.rng.random())
            heapq.heappush(
                self._heap, (self.now + delay, self._seq, LINK, node, node.epoch, peer, None)
            )

    def connected(self, a: str, b: str) -> bool:
        return self._groups is None or self._groups.get(a) == self._groups.get(b)

    # -- running -----------------------------------------------------------

    def run_for(self, dt: float, stop: Callable[[], bool] | None = None) -> bool:
        return self.run_until(self.now + dt, stop)

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Process events up to real time `until`; True if `stop()` became true."""
        heap = self._heap
        pop = heapq.heappop
        deliver, wake, check = self._deliver, self._wake, self.check
        while heap and heap[0][0] <= until:
            t, _, kind, node, epoch, src, msg = pop(heap)
            if node.epoch != epoch:
                continue  # sent to (or scheduled for) a process that has died
            self.now = t
            if kind == DELIVER:
                deliver(node, src, msg, t)
            elif kind == LINK:
                if not src.alive or not self.connected(node.name, src.name):
                    continue
                now = node.local(t)
                node.run(node.core.link_up(src.address, now), now)
                self._schedule_wake(node)
            elif t == node.wake_at:
                wake(node, t)
            else:
                continue
            if check:
                self.check_invariants(node)
            if stop is not None and stop():
                return True
        self.now = max(self.now, until)
        return stop is not None and stop()

    def _deliver(self, node: SimNode, src: SimNode, msg: Message, real: float) -> None:
        if self._groups is not None and self._groups[src.name] != self._groups[node.name]:
            return  # the cable was cut while it was in flight
        self.delivered += 1
        now = node.local(real)
        node.run(node.core.handle(src.address, msg, now), now)
        self._schedule_wake(node)

    def _wake(self, node: SimNode, real: float) -> None:
        node.wake_at = math.inf
        now = node.local(real)
        node.run(node.core.tick(now), now)
        self._schedule_wake(node, ticked=real)

    def _schedule_wake(self, node: SimNode, ticked: float | None = None) -> None:
        due = node.core.next_deadline()
        if due is None:
            return
        res = self.clock_resolution
        if res and due > -math.inf:  # the first clock reading at or after `due`
            tick = math.ceil(due / res - 1e-6)
            due = (tick + (tick * res < due)) * res
        real = (due - node.offset) / node.rate + 1e-7
        if real <= self.now:
            real = self.now
            if ticked is not None:
                node.spins += 1
                if node.spins > 1000:
                    raise InvariantViolation(f"{node.name} asks for a tick at {due} forever")
        elif ticked is not None:
            node.spins = 0
        if real < node.wake_at:
            node.wake_at = real
            self._seq += 1
            heapq.heappush(self._heap, (real, self._seq, WAKE, node, node.epoch, None, None))

    def _event(self, node: SimNode, a: Event) -> None:
        real = self.now
        if type(a) is el.BecameCoordinator:
            holder = self.holders.setdefault(a.term, node.name)
            if holder != node.name:
                self._violation(f"term {a.term} held by {holder} and {node.name}", [node])
            if not self.elections or self.elections[-1][1:] != (node.name, a.term):
                self.elections.append((real, node.name, a.term))
                self.log.append(f"{real:.4f} {node.name} coordinator term {a.term}")
        elif self.record:
            node.events.append((real, a))

    def _send(self, node: SimNode, to: str, msg: Message, real: float) -> None:
        if self.meter_on:
            self.sent[node.name, msg.TYPE] += 1
            if node.name in self.meter_bytes_for:
                self.sent_bytes[node.name, msg.TYPE] += sum(len(f) for f in encode(msg))
        dst = self._by_address.get(to)
        if dst is None or not dst.alive:
            return
        if self._groups is not None and self._groups[node.name] != self._groups[dst.name]:
            return
        f, rng = self.faults, self.rng
        if f.drop and rng.random() < f.drop:
            return
        if self.codec:
            msg = decode(encode(msg))[0]  # every message must survive the wire
        lo, hi = f.latency
        for _ in range(2 if f.dup and rng.random() < f.dup else 1):
            delay = lo + (hi - lo) * rng.random()
            if f.reorder and rng.random() < f.reorder:
                delay += f.reorder_delay * rng.random()
            self._seq += 1
            heapq.heappush(
                self._heap, (real + delay, self._seq, DELIVER, dst, dst.epoch, node, msg)
            )

    # -- looking -----------------------------------------------------------

    def alive(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def coordinators(self) -> list[str]:
        """Nodes that believe, right now, that they hold the lease."""
        return [n.name for n in self.alive() if n.election.is_coordinator(n.local(self.now))]

    def views(self) -> dict[str, tuple[str, int] | None]:
        return {n.name: n.election.coordinator(n.local(self.now)) for n in self.alive()}

    def agreed(self, names: Iterable[str] | None = None) -> tuple[str, int] | None:
        """The coordinator every named (default: every live) node believes in, if one."""
        nodes = self.alive() if names is None else [self.nodes[n] for n in names]
        views = {n.election.coordinator(n.local(self.now)) for n in nodes}
        if len(views) == 1:
            (view,) = views
            if view is not None and len(self.coordinators()) == 1:
                return view
        return None

    def converged(self, exact: bool = False) -> bool:
        """Every live node sees every other live node alive (membership).
        Without `exact`, by counting live members (fast; right when no node
        was killed); with it, by looking up each one's current incarnation."""
        live = self.alive()
        if not exact:
            return all(n.membership.live_count >= len(live) - 1 for n in live)
        for n in live:
            for other in live:
                if other is not n:
                    view = n.membership.member(other.name)
                    if view is None or view.state not in ("alive", "draining"):
                        return False
                    if view.incarnation != other.incarnation:
                        return False
        return True

    # -- invariants --------------------------------------------------------

    def check_invariants(self, node: SimNode | None = None) -> None:
        believers = []
        for n in self.nodes.values():
            if n.alive and n.election.state == el.COORDINATOR:
                if n.election.is_coordinator(n.local(self.now)):
                    believers.append(n)
        if len(believers) > 1:
            names = [n.name for n in believers]
            self._violation(f"{names} all believe they are coordinator", believers)
        for n in [node] if node is not None else self.alive():
            if not n.alive:
                continue
            term = n.election.term
            if term < n.last_term:
                self._violation(f"{n.name}'s term went back from {n.last_term} to {term}", [n])
            n.last_term = term
            try:
                n.membership.validate()
                n.election.validate()
            except Exception as exc:
                self._violation(str(exc), [n])

    def _violation(self, what: str, nodes: list[SimNode]) -> None:
        parts = [f"at t={self.now:.4f}: {what}", "net log:", *self.log]
        for n in nodes:
            parts.append(n.election.story.format(40))
        raise InvariantViolation("\n".join(parts))

