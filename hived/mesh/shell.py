"""The mesh shell: one ROUTER inbox, one DEALER per peer, the cores' actions carried out.

Theory of operation
-------------------
Every node binds one ROUTER, its inbox, and dials one DEALER per peer, as
ZeroMQ's ZRE does. A DEALER presents our advertised address as its routing
identity, so what arrives in a peer's inbox names its sender; CURVE makes
that name trustworthy (only holders of the cluster key connect at all).

    peers' DEALERs ──▶ ROUTER inbox ──▶ M.* / E.* / S.* ──▶ MeshCore ──┐
                           │                 (membership + election) │ actions, in
       remote clients ─────┘ C.* ──▶ ControlServer                   ▼ order (MeshDriver)
         DEALER monitors ──▶ link up ──▶ MeshCore      Persist ──▶ data_dir, first
                                                       Send ──▶ our DEALERs
                                                       Connect / Disconnect
                                                       events ──▶ log, node

`MeshCore` (hived.mesh.core) decides everything and `MeshDriver.run` fixes
the order: a Persist that cannot be written drops the rest of its batch.
This module only supplies sends, sockets, the state file and one timer,
armed at the core's `next_deadline()` and re-armed after every message and
tick. Sends never block: a DEALER queues at most `SEND_QUEUE` messages and
only to a connected peer, so a slow or dead peer costs dropped heartbeats,
never a stalled node. A peer gone dead is re-dialled on a fresh DEALER
(see `redial`), and each DEALER's monitor tells the core when its link
comes up, so a healed partition is found within a connect attempt, not a
probe back-off.

Lease changes are logged with wall-clock times ("became coordinator, term N
at W (lease to W)", "no longer coordinator, term N (held to W)"), so the
intervals of every holder can be checked against each other across hosts
that share a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from hived import __version__
from hived.errors import NewerMinorType, OtherMajorVersion, RemoteProtocolError
from hived.mesh.core import Event, MeshCore, MeshDriver
from hived.mesh.election import TERM_STEP, BecameCoordinator, LostCoordinator, Persist
from hived.mesh.gossip import NodeInfo
from hived.mesh.matchmaking import MESSAGES as WORK_MESSAGES
from hived.mesh.membership import PeerJoined, PeerLeft, PeerStateChanged
from hived.mesh.seeds import EVENTS as SEED_EVENTS
from hived.mesh.seeds import SeedWatch
from hived.mesh.steering import MESSAGES as STEERING_MESSAGES
from hived.mesh.versions import PeerVersions
from hived.net.reactor import Channel
from hived.net.security import ClusterKey, ZapHandler
from hived.protocol.fields import MAX_TERM, is_peer_address
from hived.protocol.wire import (
    PROTOCOL_MAJOR,
    REFUSED,
    Message,
    decode,
    encode,
    known_at,
    refusal,
    refusal_reason,
    refused_by,
)

log = logging.getLogger(__name__)

SEND_QUEUE = 1000
# Messages of a member that the node acts on (the cores only count them as hearing from it).
NODE_MESSAGES = WORK_MESSAGES + STEERING_MESSAGES
# Message types nodes send each other; anything else in the inbox is a client's.
MESH_PREFIXES = (b"M.", b"E.", b"S.")
# (peer, message type) pairs whose protocol errors are counted, for the log
ERROR_KEYS = 1024


class Mesh(MeshDriver):
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
        on_peer_gone: Callable[[str, bool], None],  # (address, left: not merely dead)
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
        self.links: dict[str, Channel] = {}  # each DEALER's monitor: its link up, or failing
        self.replies: dict[str, Channel] = {}  # each DEALER itself: sends, and a REFUSED back
        self.seed_watch = SeedWatch(self.seeds, advertise)
        self.versions = PeerVersions()  # the protocol minor each peer speaks
        self.zap: ZapHandler | None = None
        self.zap_channel: Channel | None = None
        self.inbox: Channel | None = None
        self.monitor: Channel | None = None
        # `core` (MeshDriver's) is made by start(): it needs the bound port and
        # the recalled term. Until then the node reads nothing from the mesh.
        self.started = False
        self._timer: asyncio.TimerHandle | None = None
        self._errors: dict[tuple[str, str], int] = {}  # see _protocol_error
        self._held: int | None = None  # the term we hold the lease for
        self._lease_end = 0.0  # its end, on the loop's clock
        self._unwritten: str | None = None  # why the election state cannot be written
        # bytes received from peers, by message type (hivectl status --json shows them)
        self.bytes_in: dict[str, int] = {}
        self.bytes_out: dict[str, int] = {}  # bytes handed to peers' DEALERs, by message type
        self.elections_won = 0  # times this node became coordinator

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.key is not None:
            self.zap = ZapHandler(self.ctx, self.key)
            self.zap_channel = Channel(self.loop, self.zap.sock, self.zap.handle)
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer (or a re-dial) takes its name back
        if self.key is not None:
            self.key.server(sock)
        sock.bind(self.bind_address)
        if self.advertise.endswith(":0"):  # bound to any free port: say which
            port = sock.last_endpoint.decode().rsplit(":", 1)[1]
            self.advertise = self.advertise[: -len("0")] + port
            self.seed_watch = SeedWatch(self.seeds, self.advertise)
        self.inbox = inbox = Channel(self.loop, sock, lambda frames: self._on_inbox(inbox, frames))
        if self.key is not None:  # say so when a connection fails the handshake
            # (not NO_DETAIL: that is also a port probe closing early, `hivectl doctor`'s)
            events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            self.monitor = Channel(self.loop, sock.get_monitor_socket(events), self._on_monitor)
        now = self.loop.time()
        heartbeat, dead_after, lease = self.timing
        term, promised = self._recall()
        cpus, gpus = self.resources
        info = NodeInfo(
            self.name, self.advertise, __version__, cpus, gpus, cpus + gpus,
            # wall-clock milliseconds: a restart's incarnation is above its
            # predecessor's, so peers replace the old process at once
            incarnation=time.time_ns() // 1_000_000,
        )
        self.core = MeshCore(
            info, self.seeds, now, random.Random(), heartbeat=heartbeat,
            dead_after=dead_after, lease=lease, initial_term=term, initial_promised=promised,
        )  # fmt: skip
        self.started = True
        self._run(self.core.tick(now))
        log.info("mesh: %s at %s, seeds %s", self.name, self.advertise, self.seeds or "none")

    def step_down(self) -> None:
        """We are stopping: stand no more, and if we hold the lease hand it
        over now (the other nodes elect another within a round), not a lease
        after we are gone."""
        if not self.started:
            return
        now = self.loop.time()
        actions = self.core.step_down(now)
        for action in actions:
            if isinstance(action, LostCoordinator):
                log.info("stepping down as coordinator (term %d): stopping; the hive elects "
                         "another now", action.term)
        self._run(actions)

    def leave(self) -> None:
        """Tell the peers we go, so they drop us at once rather than after dead_after."""
        if self.started:
            self._run(self.core.leave(self.loop.time()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for address in list(self.dealers):
            self._close_dealer(address, linger=200)  # a moment for the LEAVE to go out
        if self.inbox is not None:
            self.inbox.close()
        if self.zap_channel is not None:
            self.zap_channel.close()
        if self.monitor is not None:
            self.monitor.close()

    # -- what the node reads and tells ------------------------------------------

    def coordinator(self) -> tuple[str, int] | None:
        return self.core.coordinator(self.loop.time())

    def coordinator_address(self) -> str | None:
        return self.core.coordinator_address(self.loop.time())

    def term(self) -> int:
        return self.core.election.term

    def accept_term(self, term: int) -> bool:
        """Fencing: False for a coordinator message from a term below the highest seen."""
        ok = self.core.accept_term(term)
        self._arm()  # a higher term may have made us step down
        return ok

    def is_coordinator(self) -> bool:
        return self.core.is_coordinator(self.loop.time())

    def update(self, *, load: float, slots_free: int, state: str, tasks_done: int) -> None:
        self.core.membership.update(
            load=load, slots_free=slots_free, state=state, tasks_done=tasks_done
        )

    def members(self) -> list[Any]:
        return self.core.membership.members()

    def name_of(self, address: str) -> str | None:
        """The member name of the peer at `address` (None: not a member)."""
        return self.core.membership.name_of(address)

    def members_alive(self) -> list[str]:
        """Addresses of the peers we hear from."""
        return self.core.membership.live_addresses()

    # -- the inbox ---------------------------------------------------------------

    def _on_inbox(self, inbox: Channel, frames: list[Any]) -> None:
        envelope = frames[1].bytes if len(frames) > 1 else b""
        word, _, rest = envelope.partition(b" ")
        if rest[:2] not in MESH_PREFIXES:
            self.on_client_frames(inbox, frames)
            return
        sender = frames[0].bytes.decode("utf-8", "replace")
        now = self.loop.time()
        kind = rest.partition(b"\n")[0][:16].decode("ascii", "replace")
        try:
            if not is_peer_address(sender):  # its DEALER's routing id: where it says it is
                raise RemoteProtocolError(
                    f"a mesh message from a connection named {sender[:64]!r}, "
                    "expected a peer's tcp://host:port"
                )
            try:
                msg, payload = decode(frames[1:])
            except OtherMajorVersion as exc:
                self.seed_watch.refused(sender, str(exc), now)
                if not rest.startswith(REFUSED + b"\n"):  # a refusal is never answered
                    # on the connection it came by: its sender learns it was refused
                    inbox.send([frames[0], *refusal()])
                raise
            except NewerMinorType as exc:  # a newer minor's type: ignored, not a fault
                self.versions.heard(sender, word)
                self.versions.ignored(sender, exc.type_name)
                return
            self.versions.heard(sender, word)
            # counted once decoded, so a peer cannot grow this table with made-up types
            self.bytes_in[kind] = self.bytes_in.get(kind, 0) + sum(len(f) for f in frames[1:])
            actions = self.core.handle(sender, msg, now)
        except RemoteProtocolError as exc:
            self._protocol_error(sender, kind, exc)
            self._arm()
            return
        self._run(actions)
        if isinstance(msg, NODE_MESSAGES) and self.core.membership.name_of(sender) is not None:
            self.on_work(sender, msg, payload)

    def _on_reply(self, address: str, frames: list[Any]) -> None:
        """What came back on our DEALER to `address`: only ever its REFUSED,
        when it read our messages as another major's."""
        theirs = refused_by(frames)
        if theirs is None or theirs[0] == PROTOCOL_MAJOR:
            self._protocol_error(address, "reply", RemoteProtocolError(
                "expected nothing back on our link to it but the REFUSED of another major"))
            return
        self.seed_watch.refused(address, refusal_reason(theirs), self.loop.time())

    def _on_monitor(self, frames: list[Any]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        self._protocol_error(
            "a connection",
            "handshake",
            RemoteProtocolError(
                f"failed the CURVE handshake ({_event_name(event['event'])}): "
                "not a holder of the cluster key, or not speaking CURVE"
            ),
        )

    def _protocol_error(self, sender: str, kind: str, exc: Exception) -> None:
        """One line for the first bad message of each kind from each peer, then
        one at its 10th, 100th, 1000th...: a hostile peer cannot flood the log,
        nor (the table is bounded) the memory."""
        key = (sender[:64], kind)
        count = self._errors.pop(key, 0) + 1
        self._errors[key] = count  # most recent last: the oldest is forgotten first
        if len(self._errors) > ERROR_KEYS:
            del self._errors[next(iter(self._errors))]
        if count == 1:
            log.warning("mesh: dropped a %s from %s: %s", kind, sender[:64], exc)
        elif str(count).rstrip("0") == "1":  # 10, 100, 1000, ...
            log.warning("mesh: dropped a %s from %s (%d so far): %s", kind, sender[:64], count, exc)

    # -- actions (MeshDriver) ------------------------------------------------------

    def _run(self, actions: list[Any]) -> None:
        """Carry out the core's actions, then re-arm the timer, whatever happens:
        a node whose timer is not armed stops sending heartbeats."""
        try:
            self.run(actions, self.loop.time())
        finally:
            self._arm()

    # An override that returns more: MeshDriver.run ignores what a send
    # returns; the node's work messages (with payloads) read whether it went.
    def send(  # type: ignore[override]
        self, address: str, msg: Message, payload: list[Any] | tuple[Any, ...] = ()
    ) -> bool:
        """Send to a peer without blocking; False if not connected or its queue is full."""
        if address == self.advertise:
            return False
        minor = self.versions.minor_for(address)  # each pair speaks the lower minor
        if not known_at(msg, minor):
            return False  # a type of a newer minor than the peer's
        frames = encode(msg, payload, minor)
        try:
            self._dealer(address)
        except zmq.ZMQError as exc:  # an address ZeroMQ cannot dial
            self._protocol_error(address, "dial", RemoteProtocolError(f"cannot dial it: {exc}"))
            return False
        # False: a full queue (a lost heartbeat, by design; callers of work messages handle it)
        if not self.replies[address].send(frames):
            return False
        kind = msg.TYPE.decode()
        self.bytes_out[kind] = self.bytes_out.get(kind, 0) + sum(len(f) for f in frames)
        return True

    def connect(self, address: str) -> None:
        try:
            self._dealer(address)
        except zmq.ZMQError as exc:
            self._protocol_error(address, "dial", RemoteProtocolError(f"cannot dial it: {exc}"))

    def disconnect(self, address: str) -> None:
        self._close_dealer(address)

    def write_state(self, term: int, promised: int) -> None:
        """Write the promise durably before any GRANT that depends on it leaves."""
        path = self._state_path()
        if path is None:
            return
        data_dir = os.path.dirname(path)
        os.makedirs(data_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".election-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"term": term, "promised": promised}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(data_dir, os.O_RDONLY)  # the rename itself, durable
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def state_not_written(self, action: Persist, exc: OSError, dropped: int) -> None:
        code = errno.errorcode.get(exc.errno) if exc.errno is not None else None
        why = f"{code or exc.errno}: {exc.strerror or exc}"
        if self._unwritten is None:  # once, until a write succeeds again
            log.error(
                "mesh: cannot write the election state to %s (%s); %d action(s) after it "
                "dropped, and this node promises no vote until a write succeeds",
                self._state_path(), why, dropped,
            )
        self._unwritten = why

    def state_written(self) -> None:
        if self._unwritten is not None:
            log.info("mesh: election state written to %s again", self._state_path())
            self._unwritten = None

    def event(self, event: Event) -> None:
        try:
            self._event(event)
        except Exception:  # the node's bookkeeping must not stop the mesh's
            log.exception("mesh: handling %s failed", type(event).__name__)

    def _event(self, action: Event) -> None:
        if isinstance(action, BecameCoordinator):
            now = self.loop.time()
            if action.term != self._held:  # renewals repeat BecameCoordinator: log changes only
                log.info("mesh: became coordinator, term %d at %.6f (lease to %.6f)",
                         action.term, _wall(now, now), _wall(action.until, now))
                self._held = action.term
                self.elections_won += 1
            self._lease_end = action.until
        elif isinstance(action, LostCoordinator):
            if self._held is not None:
                now = self.loop.time()
                log.info("mesh: no longer coordinator, term %d (held to %.6f)",
                         action.term, _wall(min(now, self._lease_end), now))
                self._held = None
        elif isinstance(action, PeerJoined):
            log.info("mesh: %s joined from %s", action.member.name, action.member.address)
        elif isinstance(action, PeerStateChanged):
            log.info("mesh: %s is %s (was %s)", action.name, action.new, action.old)
            if action.new in ("suspect", "dead"):  # quiet: its link may be stalled
                self.redial(action.address)
            if action.new == "dead":
                self.on_peer_gone(action.address, False)
        elif isinstance(action, PeerLeft):
            log.info("mesh: %s left (%s)", action.name, action.reason)
            self.on_peer_gone(action.address, True)

    # -- sockets ----------------------------------------------------------------------

    def _dealer(self, address: str) -> zmq.Socket:
        sock = self.dealers.get(address)
        if sock is None:
            heartbeat = self.timing[0]
            sock = self.ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.identity = self.advertise.encode()
            sock.sndhwm = SEND_QUEUE
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only for a connected peer
            # a dial that hangs (a cut link drops SYNs) is given up and tried
            # again soon, so a healed link is found within about a heartbeat
            sock.setsockopt(zmq.RECONNECT_IVL, max(10, int(heartbeat * 500)))
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, max(10, int(heartbeat * 1000)))
            sock.setsockopt(zmq.CONNECT_TIMEOUT, max(100, int(heartbeat * 2000)))
            if self.key is not None:
                self.key.client(sock)
            # watched before it dials: the first CONNECTED must not be missed,
            # or the retry after a refused handshake reads as "no connection"
            link = sock.get_monitor_socket(SEED_EVENTS)
            try:
                sock.connect(address)
            except zmq.ZMQError:
                sock.disable_monitor()
                link.close(linger=0)
                sock.close(linger=0)
                raise
            self.dealers[address] = sock
            self.links[address] = Channel(self.loop, link, functools.partial(self._link_event, address))
            self.replies[address] = Channel(self.loop, sock, functools.partial(self._on_reply, address))
        return sock

    def _close_dealer(self, address: str, linger: int = 0) -> None:
        sock = self.dealers.pop(address, None)
        if sock is None:  # never dialled, or closed: its link and reply go with it
            return
        link = self.links.pop(address, None)
        reply = self.replies.pop(address, None)
        if link is not None:
            sock.disable_monitor()
            link.close()
        if reply is not None:
            reply.close(linger)  # and the DEALER with it
        else:
            sock.close(linger=linger)

    def redial(self, address: str) -> None:
        """Replace the DEALER of a peer gone quiet (suspect, dead), or one that
        left an owner's HELD? unanswered, with a fresh one.

        A cut cable or a partition leaves the TCP connection established but
        stalled, and what was sent meanwhile waits in the kernel for
        retransmits whose back-off doubles: after a heal the link could stay
        dark for seconds, or for minutes where the peer never went dead (a
        short cut, or a bridge node vouching for it). What the old DEALER
        still held is dropped; the exchange's HELD? finds those ranges. A new connection starts with fresh SYNs at our own
        short connect timeout and reconnect interval, and its monitor says
        when it is up. (ZMTP heartbeats would notice a stalled link too, but
        libzmq can abort on them: "Assertion failed: !_io_error".)
        """
        if address in self.dealers:
            self._close_dealer(address)
            self._dealer(address)

    def _link_event(self, address: str, frames: list[Any]) -> None:
        if address not in self.dealers:
            return
        event = parse_monitor_message([f.bytes for f in frames])["event"]
        self.seed_watch.dealer_event(address, event)
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._run(self.core.link_up(address, self.loop.time()))

    def seeds_status(self) -> list[dict[str, Any]]:
        """Every seed: a live member, or why not (`hivectl status`, doctor, STATUS=)."""
        return self.seed_watch.rows(set(self.members_alive()))

    def refusing_peers(self) -> list[dict[str, Any]]:
        """Peers, not seeds, of another protocol major lately (`hivectl status`, doctor)."""
        return self.seed_watch.other_rows(set(self.members_alive()), self.loop.time())

    def _arm(self) -> None:
        due = self.core.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if due is not None:  # -inf: at once
            self._timer = self.loop.call_at(max(due, self.loop.time()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._run(self.core.tick(self.loop.time()))

    # -- the election's memory ---------------------------------------------------------

    def _state_path(self) -> str | None:
        return os.path.join(self.data_dir, "election.json") if self.data_dir else None

    def _recall(self) -> tuple[int, int]:
        path = self._state_path()
        return recall_state(path) if path is not None else (0, 0)


def recall_state(path: str) -> tuple[int, int]:
    """(term, promised) as `write_state` left them in `path`; (0, 0) if none.

    A value no election can go on from (at or near the end of the term range,
    as an older hived let a hostile peer write) is logged and forgotten:
    kept, it would fence every real term off for good, across restarts.
    """
    try:
        with open(path) as f:
            state = json.load(f)
        term, promised = state["term"], state["promised"]
    except FileNotFoundError:
        return 0, 0
    except (TypeError, OSError, ValueError, KeyError) as exc:
        log.error("mesh: cannot read the election state in %s (%s); starting from term 0",
                  path, exc)
        return 0, 0
    usable = MAX_TERM - TERM_STEP - 2
    if not all(type(v) is int and 0 <= v < usable for v in (term, promised)):
        log.error("mesh: the election state in %s (term %r, promised %r) is beyond any term an "
                  "election can reach (below %d); starting from term 0", path, term, promised,
                  usable)
        return 0, 0
    return term, promised


def _event_name(event: int) -> str:
    """A monitor event's name, lower-case (its number, should libzmq add one we do not know)."""
    return (zmq.Event(event).name or str(event)).lower()


def _wall(t: float, now: float) -> float:
    """The loop-clock time `t` on the wall clock (for logs checked across hosts)."""
    return time.time() - (now - t)
