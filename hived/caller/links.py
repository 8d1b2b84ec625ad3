"""How a client reaches its node: a socket to a daemon, or an embedded node.

Both links offer the same two things: `send(*messages)` (each a list of
frames), callable from any thread and handing all its messages over at
once, and a callback `on_frames(frames)` that the link calls, on a thread of
its own, for every message from the node. Neither ever blocks the caller on
the network.

- `SocketLink`: a DEALER to the daemon's control socket, owned by one I/O
  thread (ZeroMQ sockets are not thread-safe). Callers append to an outbox
  and wake the thread through a pipe; the thread also sends the PING that
  tells the node this client is alive, and the node answers each one, so a
  node that answers no PING for `LINK_TIMEOUT` (killed, paused, cut off, or
  a socket that floods us but does not serve us) is reported to `on_lost`
  once instead of being waited on for ever. Until the node's WELCOME says
  otherwise (`watch`), that is after `LINK_TIMEOUT`. The socket is an ipc one only
  where nobody but its daemon could have put it (`socketdir`).
- `EmbeddedLink`: a whole `Node` on its own event-loop thread in this
  process, without a network socket. Frames cross between threads as Python
  lists, with no copy and no socket hop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from hived.config import DEFAULT_HEARTBEAT
from hived.errors import HiveError
from hived.net.reactor import EVENTS, POLLIN
from hived.net.socketdir import check_socket
from hived.protocol.control import EMBEDDED_CLIENT, LINK_TIMEOUT, Ping, Pong

if TYPE_CHECKING:  # the node is imported when an embedded link starts, after its workers
    from hived.node.node import Node, NodeSettings
from hived.net.frames import zero_copy
from hived.protocol.wire import encode

log = logging.getLogger(__name__)

OnFrames = Callable[[list[Any]], None]
PONG = encode(Pong())[0]
# Messages taken per pass of the link's loop: a node that floods us must not
# keep the thread from its pings and its watch on the node.
RECEIVE_BATCH = 256


class SocketLink:
    def __init__(
        self,
        address: str,
        on_frames: OnFrames,
        *,
        on_lost: Callable[[str], None] = lambda reason: None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        timeout: float = LINK_TIMEOUT,
        curve: Callable[[zmq.Socket], None] | None = None,
    ) -> None:
        self.address, self.on_frames, self.heartbeat = address, on_frames, heartbeat
        self.on_lost, self.timeout = on_lost, timeout
        if address.startswith("ipc://"):
            check_socket(address[len("ipc://") :])
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if curve is not None:
            curve(self.sock)
        self.sock.connect(address)
        self.outbox: collections.deque[list[Any]] = collections.deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closing = False
        self.lost = False  # the node is gone: no more pings to it
        self.last_pong: float | None = None  # when the node last answered a ping
        self.thread = threading.Thread(target=self._run, name="hived-link", daemon=True)
        self.thread.start()

    def send(self, *messages: list[Any]) -> None:
        self.outbox.extend(messages)
        os.write(self._wake_w, b"\0")

    def watch(self, heartbeat: float, timeout: float) -> None:
        """Ping every `heartbeat` and take the node as lost after `timeout`
        without an answer (what its WELCOME asks), from the next pass on."""
        self.heartbeat, self.timeout = heartbeat, timeout

    def _run(self) -> None:
        sock, poller = self.sock, zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        ping = encode(Ping())
        heard = time.monotonic()
        next_ping = heard + self.heartbeat  # after our HELLO, which the caller sends now
        try:
            while not self._closing:
                # The node hears from us at least every heartbeat, busy or not.
                now = time.monotonic()
                if now >= next_ping:
                    if not self.lost:
                        sock.send_multipart(ping)
                    next_ping = now + self.heartbeat
                if not self.lost and now - heard > self.timeout:
                    self.lost = True
                    self.on_lost(f"hived at {self.address} answered no ping for {self.timeout:g}s "
                                 "(killed, paused or cut off)")
                events = dict(poller.poll(int((next_ping - now) * 1000) + 1))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                while self.outbox:
                    frames = self.outbox.popleft()
                    sock.send_multipart(frames, copy=not zero_copy(frames))
                for _ in range(RECEIVE_BATCH):
                    if not sock.getsockopt(EVENTS) & POLLIN:  # type: ignore[operator]  # pyzmq types int options as int | bytes; EVENTS is an int
                        break
                    frames = sock.recv_multipart(copy=False)
                    if len(frames) == 1 and len(frames[0]) == len(PONG) and frames[0].bytes == PONG:
                        # only its answer to a ping says the node serves us
                        heard = self.last_pong = time.monotonic()
                        continue
                    try:
                        self.on_frames(frames)
                    except Exception:  # one bad message must not end the link
                        log.exception("error handling a message from %s", self.address)
        except Exception:
            log.exception("the link to %s failed", self.address)
            raise
        finally:
            sock.close(linger=0)
            self.ctx.term()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        os.write(self._wake_w, b"\0")
        if threading.current_thread() is not self.thread:
            self.thread.join(5)
            os.close(self._wake_r)
            os.close(self._wake_w)
            if not self.thread.is_alive():  # as EmbeddedLink.close
                self.on_frames, self.on_lost = _closed, _closed


class EmbeddedLink:
    """Runs a Node on a thread of its own and links this process's client to it."""

    # Made on the node's thread (`_serve`) before `_ready` is set; None if it
    # could not be made.
    node: Node | None = None

    def __init__(self, settings: NodeSettings, on_frames: OnFrames) -> None:
        self.on_frames = on_frames
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(
            target=self._run, args=(settings,), name="hived-embedded", daemon=True
        )
        self.thread.start()
        self._ready.wait()
        if self._error is not None or self.node is None:
            raise HiveError(f"the embedded hive did not start: {self._error}") from self._error
        self.send = self.node.attach(EMBEDDED_CLIENT, on_frames)

    def _run(self, settings: NodeSettings) -> None:
        loop = _new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(settings))
        finally:
            loop.close()

    async def _serve(self, settings: NodeSettings) -> None:
        try:
            if settings.launcher is not None:
                # The workers boot while the node is imported and built. They
                # start from this thread, which lives as long as the node: the
                # kernel's parent-death signal follows the thread that forked,
                # so workers started by a caller's short-lived thread died with it.
                settings.launcher.prelaunch(settings.cpus)
            from hived.node.node import Node

            self.node = Node(settings, zmq.Context())
            self.node.start()
        except BaseException as exc:
            if settings.launcher is not None:
                settings.launcher.abandon()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self.node.stopped.wait()

    def close(self) -> None:
        """Stop the node and its workers; returns once none is left."""
        loop = self.loop
        if loop is None or loop.is_closed() or self.node is None:
            return
        node, self.node = self.node, None
        try:
            asyncio.run_coroutine_threadsafe(node.close(), loop).result(30)
        except RuntimeError:  # the loop already stopped (interpreter exit)
            pass
        self.thread.join(30)
        node.ctx.term()
        # The node and the client refer to each other through these: without
        # them a closed client is freed at once, not at the next collection.
        self.send, self.on_frames = _closed, _closed


def _closed(*args: Any) -> None:
    """What a closed link does with what it is given: nothing."""


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
