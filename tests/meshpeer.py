"""A mesh peer driven by hand: a key holder on a test host that speaks the
mesh protocol message by message, for tests that need a peer to do exactly
one thing (hold a range and never report it, say) that no real daemon does.

It joins like a daemon (HELLO, then a BEAT every `beat` seconds from its own
thread, so the daemon keeps it alive) and otherwise only sends what the test
tells it to; everything the daemon sends it lands in `inbox`, decoded.
Real ZeroMQ sockets with the cluster key (CURVE), in the host's namespace.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import zmq

import hived.mesh.core  # noqa: F401 - with matchmaking, every mesh message type decodes
from hived import __version__
from hived.mesh.gossip import Beat, PeerHello
from hived.net.security import ClusterKey
from hived.protocol.wire import Message, decode, encode


class MeshPeer:
    def __init__(self, host: Any, port: int, key: ClusterKey, name: str, target: str, *,
                 beat: float, cpus: int = 1) -> None:
        self.name, self.address, self.target = name, f"tcp://{host.addr}:{port}", target
        self.cpus = cpus
        self.inbox: queue.Queue[tuple[Message, list[Any]]] = queue.Queue()
        self._lock = threading.Lock()  # the DEALER is shared by the test and the beat thread
        self._stop = threading.Event()
        with host.enter():  # ZeroMQ's I/O thread, and so every socket, lives in the host
            self.ctx = zmq.Context()
            self.router = self.ctx.socket(zmq.ROUTER)
            key.server(self.router)
            self.router.linger = 0
            self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # as a daemon's: a re-dial takes over
            self.router.bind(self.address)
            self.dealer = self.ctx.socket(zmq.DEALER)
            key.client(self.dealer)
            self.dealer.linger = 0
            self.dealer.identity = self.address.encode()
            self.dealer.connect(target)
        self.send(PeerHello(name, self.address, __version__, 1, cpus, 0, cpus, 0.0, "alive", 0, 0,
                        True, [], [], []))
        self._threads = [threading.Thread(target=self._beat, args=(beat,), daemon=True),
                         threading.Thread(target=self._read, daemon=True)]
        for t in self._threads:
            t.start()

    def send(self, msg: Message, payload: list[Any] | tuple = ()) -> None:
        with self._lock:
            self.dealer.send_multipart(encode(msg, payload))

    def expect(self, kind: type[Message], timeout: float) -> tuple[Message, list[Any]]:
        """The next message of this kind from the daemon (others are skipped)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg, payload = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(msg, kind):
                return msg, payload
        raise AssertionError(f"no {kind.__name__} from {self.target} within {timeout}s")

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self.router.close()
        self.dealer.close()
        self.ctx.term()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.send(Beat(self.name, 1, self.cpus, 0.0, "alive", 0, 0, [], [], []))

    def _read(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        while not self._stop.is_set():
            if poller.poll(50):
                frames = self.router.recv_multipart(copy=False)
                self.inbox.put(decode(frames[1:]))
