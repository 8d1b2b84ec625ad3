"""The mesh shell: one ROUTER inbox, one DEALER per peer, the cores' actions carried out.

Theory of operation
-------------------
Every node binds one ROUTER, its inbox, and dials one DEALER per peer, as
ZeroMQ's ZRE does. A DEALER presents our advertised address as its routing
identity, so what arrives in a peer's inbox names its sender; CURVE makes
that name trustworthy (only holders of the cluster key connect at all).

    peers' DEALERs ──▶ ROUTER inbox ──▶ M.* ──▶ Membership ─┐
                           │          └─ E.* ──▶ Election ───┤ actions
       remote clients ─────┘ C.* ──▶ ControlServer           ▼
                                                   Send / Broadcast ──▶ our DEALERs
                                                   Connect / Disconnect
                                                   Persist ──▶ data_dir
                                                   events ──▶ log, node

The two sans-IO cores decide everything; this module only turns their
actions into sends, sockets and timers. One timer is armed at the earliest
`next_deadline()` of the cores and re-armed after every message and tick.
Sends never block: a DEALER queues at most `SEND_QUEUE` messages and only to
a connected peer, so a slow or dead peer costs dropped heartbeats, never a
stalled node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from hived import __version__
from hived.election import MESSAGES as ELECTION_MESSAGES
from hived.election import (
    BecameCoordinator,
    Broadcast,
    Election,
    LostCoordinator,
    Persist,
)
from hived.errors import RemoteProtocolError
from hived.gossip import MESSAGES as MEMBERSHIP_MESSAGES
from hived.gossip import NodeInfo
from hived.matchmaking import MESSAGES as WORK_MESSAGES
from hived.membership import (
    Membership,
    PeerJoined,
    PeerLeft,
    PeerStateChanged,
    TermSeen,
)
from hived.reactor import NOBLOCK, Channel
from hived.sansio import Connect, Disconnect, Send
from hived.security import ClusterKey, ZapHandler
from hived.wire import Message, decode, encode, zero_copy

log = logging.getLogger(__name__)

SEND_QUEUE = 1000
# Message types nodes send each other; anything else in the inbox is a client's.
MESH_PREFIXES = (b"M.", b"E.", b"S.")
# At most this many protocol errors are logged per peer, then one in a thousand.
LOG_BURST = 20


class Mesh:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        ctx: zmq.Context,
        *,
        name: str,
        bind: str,
        advertise: str,
        seeds: list[str],
        heartbeat: float,
        dead_after: float,
        lease: float,
        key: ClusterKey | None,
        data_dir: str | None,
        cpus: int,
        gpus: int,
        on_client_frames: Callable[[Channel, list[Any]], None],
        on_work: Callable[[str, Message, list[Any]], None],
        on_peer_gone: Callable[[str], None],
    ) -> None:
        self.loop, self.ctx, self.key = loop, ctx, key
        self.name, self.bind_address, self.seeds = name, bind, list(seeds)
        self.advertise = advertise
        self.timing = (heartbeat, dead_after, lease)
        self.data_dir = data_dir
        self.resources = (cpus, gpus)
        self.on_client_frames = on_client_frames
        self.on_work, self.on_peer_gone = on_work, on_peer_gone
        self.dealers: dict[str, zmq.Socket] = {}
        self.zap: ZapHandler | None = None
        self.zap_channel: Channel | None = None
        self.inbox: Channel | None = None
        self.monitor: Channel | None = None
        self.membership: Membership | None = None
        self.election: Election | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._errors: dict[str, int] = {}
        self._held: int | None = None  # the term we hold the lease for
        # bytes received from peers, by message type (hivectl status --json shows them)
        self.bytes_in: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.key is not None:
            self.zap = ZapHandler(self.ctx, self.key)
            self.zap_channel = Channel(self.loop, self.zap.sock, self.zap.handle)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer takes its name back
        if self.key is not None:
            self.key.server(sock)
        sock.bind(self.bind_address)
        if self.advertise.endswith(":0"):  # bound to any free port: say which
            port = sock.last_endpoint.decode().rsplit(":", 1)[1]
            self.advertise = self.advertise[: -len("0")] + port
        self.inbox = Channel(self.loop, sock, self._on_inbox)
        if self.key is not None:  # say so when a connection fails the handshake
            # (not NO_DETAIL: that is also a port probe closing early, `hivectl doctor`'s)
            events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            self.monitor = Channel(self.loop, sock.get_monitor_socket(events), self._on_monitor)
        now = self.loop.time()
        heartbeat, dead_after, lease = self.timing
        term, promised = self._recall()
        rng = random.Random()
        cpus, gpus = self.resources
        info = NodeInfo(
            self.name, self.advertise, __version__, cpus, gpus, cpus + gpus,
            incarnation=int(now * 1000) ^ os.getpid() << 20,
        )
        self.membership = Membership(info, self.seeds, heartbeat, dead_after, now, rng)
        self.election = Election(
            self.name, self.advertise, self.seeds, now, rng,
            lease=lease, initial_term=term, initial_promised=promised,
        )
        self._run(self.membership.tick(now) + self.election.tick(now))
        log.info("mesh: %s at %s, seeds %s", self.name, self.advertise, self.seeds or "none")

    def leave(self) -> None:
        """Tell the peers we go, so they drop us at once rather than after dead_after."""
        if self.membership is not None:
            self._run(self.membership.leave(self.loop.time()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sock in self.dealers.values():
            sock.close(linger=200)  # a moment for the LEAVE to go out
        self.dealers.clear()
        if self.inbox is not None:
            self.inbox.close()
        if self.zap_channel is not None:
            self.zap_channel.close()
        if self.monitor is not None:
            self.monitor.close()

    # -- what the node reads and tells ------------------------------------------

    def coordinator(self) -> tuple[str, int] | None:
        return self.election.coordinator(self.loop.time())

    def coordinator_address(self) -> str | None:
        return self.election.coordinator_address(self.loop.time())

    def term(self) -> int:
        return self.election.term

    def accept_term(self, term: int) -> bool:
        """Fencing: False for a coordinator message from a term below the highest seen."""
        ok = self.election.accept_term(term)
        self._arm()  # a higher term may have made us step down
        return ok

    def is_coordinator(self) -> bool:
        return self.election.is_coordinator(self.loop.time())

    def update(self, *, load: float, slots_free: int, state: str, tasks_done: int) -> None:
        self.membership.update(load=load, slots_free=slots_free, state=state, tasks_done=tasks_done)

    def members(self) -> list[Any]:
        return self.membership.members()

    def members_alive(self) -> list[str]:
        """Addresses of the peers we hear from."""
        return self.membership.live_addresses()

    # -- the inbox ---------------------------------------------------------------

    def _on_inbox(self, frames: list[Any]) -> None:
        envelope = frames[1].bytes if len(frames) > 1 else b""
        type_name = envelope.partition(b" ")[2][:2]
        if type_name not in MESH_PREFIXES:
            self.on_client_frames(self.inbox, frames)
            return
        sender = frames[0].bytes.decode("utf-8", "replace")
        now = self.loop.time()
        kind = envelope.partition(b" ")[2].partition(b"\n")[0][:16].decode("ascii", "replace")
        self.bytes_in[kind] = self.bytes_in.get(kind, 0) + sum(len(f) for f in frames[1:])
        try:
            if not sender.startswith("tcp://"):
                raise RemoteProtocolError("a mesh message from a connection without a peer address")
            msg, payload = decode(frames[1:])
        except RemoteProtocolError as exc:
            self._protocol_error(sender, exc)
            return
        actions = self.membership.heard_from(sender, now)
        try:
            if isinstance(msg, MEMBERSHIP_MESSAGES):
                actions += self.membership.handle(sender, msg, now)
            elif isinstance(msg, ELECTION_MESSAGES):
                actions += self.election.handle(sender, msg, now)
        except RemoteProtocolError as exc:
            self._protocol_error(sender, exc)
        self._run(actions)
        if isinstance(msg, WORK_MESSAGES) and self.membership.name_of(sender) is not None:
            self.on_work(sender, msg, payload)

    def _on_monitor(self, frames: list[Any]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        self._protocol_error(
            "a connection",
            RemoteProtocolError(
                f"failed the CURVE handshake ({zmq.Event(event['event']).name.lower()}): "
                "not a holder of the cluster key, or not speaking CURVE"
            ),
        )

    def _protocol_error(self, sender: str, exc: Exception) -> None:
        count = self._errors[sender] = self._errors.get(sender, 0) + 1
        if count <= LOG_BURST or count % 1000 == 0:
            log.warning("mesh: dropped a message from %s (%d so far): %s", sender, count, exc)

    # -- actions -------------------------------------------------------------------

    def _run(self, actions: list[Any]) -> None:
        """Carry out the cores' actions, then re-arm the timer, whatever happens:
        a node whose timer is not armed stops sending heartbeats."""
        try:
            for action in actions:
                try:
                    self._carry_out(action)
                except Exception:  # one failed action must not cost the others
                    log.exception("mesh: carrying out %s failed", type(action).__name__)
        finally:
            self._arm()

    def _carry_out(self, action: Any) -> None:
        if isinstance(action, Send):
            self._send(action.to, action.msg)
        elif isinstance(action, Broadcast):
            for address in self.membership.live_addresses():
                self._send(address, action.msg)
        elif isinstance(action, Connect):
            self._dealer(action.address)
        elif isinstance(action, Disconnect):
            sock = self.dealers.pop(action.address, None)
            if sock is not None:
                sock.close(linger=0)
        elif isinstance(action, Persist):
            self._persist(action.term, action.promised)
        elif isinstance(action, TermSeen):
            self.election.accept_term(action.term)
        elif isinstance(action, BecameCoordinator | LostCoordinator):
            held = action.term if isinstance(action, BecameCoordinator) else None
            if held != self._held:  # renewals repeat BecameCoordinator: log changes only
                log.info("mesh: %s coordinator, term %d",
                         "became" if held else "no longer", action.term)
                self._held = held
            self.membership.set_term(action.term)
        elif isinstance(action, PeerJoined):
            log.info("mesh: %s joined from %s", action.member.name, action.member.address)
        elif isinstance(action, PeerStateChanged):
            log.info("mesh: %s is %s (was %s)", action.name, action.new, action.old)
            if action.new == "dead":
                self.on_peer_gone(action.address)
        elif isinstance(action, PeerLeft):
            log.info("mesh: %s left (%s)", action.name, action.reason)
            self.on_peer_gone(action.address)

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self.dealers.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.identity = self.advertise.encode()
            sock.sndhwm = SEND_QUEUE
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only for a connected peer
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if self.key is not None:
                self.key.client(sock)
            sock.connect(address)
            self.dealers[address] = sock
        return sock

    def _send(self, address: str, msg: Message) -> None:
        self.send(address, msg)

    def send(self, address: str, msg: Message, payload: list[Any] | tuple = ()) -> bool:
        """Send to a peer without blocking; False if not connected or its queue is full."""
        if address == self.advertise:
            return False
        frames = encode(msg, payload)
        try:
            self._dealer(address).send_multipart(frames, NOBLOCK, copy=not zero_copy(frames))
            return True
        except zmq.Again:
            return False  # a lost heartbeat, by design; work messages are retried by their owners

    def _arm(self) -> None:
        due = min(
            (d for d in (self.membership.next_deadline(), self.election.next_deadline()) if d is not None),
            default=None,
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is not None:  # -inf: at once
            self._timer = self.loop.call_at(max(due, self.loop.time()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.loop.time()
        self._run(self.membership.tick(now) + self.election.tick(now))

    # -- the election's memory ---------------------------------------------------------

    def _state_path(self) -> str | None:
        return os.path.join(self.data_dir, "election.json") if self.data_dir else None

    def _recall(self) -> tuple[int, int]:
        path = self._state_path()
        try:
            with open(path) as f:
                state = json.load(f)
            return int(state["term"]), int(state["promised"])
        except (TypeError, OSError, ValueError, KeyError):
            return 0, 0

    def _persist(self, term: int, promised: int) -> None:
        """Write the promise durably before any GRANT that depends on it leaves."""
        path = self._state_path()
        if path is None:
            return
        os.makedirs(self.data_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".election-")
        with os.fdopen(fd, "w") as f:
            json.dump({"term": term, "promised": promised}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
