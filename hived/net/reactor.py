"""ZeroMQ sockets on the asyncio loop, one callback per message.

A ZeroMQ socket's FD is edge-triggered: it signals only when the socket's
state changes, and any send or receive may consume that edge. So after the FD
fires, and after every send, the socket must be drained while its EVENTS say
POLLIN. `Channel` does exactly that and nothing more; handlers are plain
functions called with the frames, without a Future per message, which keeps
the per-message cost to the decode and the handler itself (this is the hot
path of every task).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from hived.net.frames import zero_copy

log = logging.getLogger(__name__)

# At most this many messages per FD callback, so one busy socket cannot starve
# the loop's other callbacks and timers.
BURST = 256
# Plain ints: pyzmq's flag enums cost more per operation than the hot path can spare.
EVENTS, POLLIN, NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class Channel:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: zmq.Socket,
        on_frames: Callable[[list[Any]], None],
    ) -> None:
        self.loop, self.sock, self.on_frames = loop, sock, on_frames
        self._scheduled = False
        self._closed = False
        loop.add_reader(sock.FD, self._drain)
        # The FD only signals changes: look once now, in case something is
        # already waiting (it would never signal for that).
        self._schedule()

    def send(self, frames: Sequence[Any]) -> bool:
        """Send without blocking; False if the peer's queue is full or it is gone."""
        try:
            self.sock.send_multipart(frames, flags=NOBLOCK, copy=not zero_copy(frames))
            return True
        except (zmq.Again, zmq.error.ZMQError) as exc:
            log.debug("send dropped: %s", exc)
            return False
        finally:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(BURST):
            if self._closed or not sock.getsockopt(EVENTS) & POLLIN:  # type: ignore[operator]  # pyzmq types int options as int | bytes; EVENTS is an int
                return
            frames = sock.recv_multipart(NOBLOCK, copy=False)
            try:
                self.on_frames(frames)
            except Exception:  # a handler's bug must not stop the socket
                log.exception("error handling a message")
        self._schedule()  # more may be waiting: come back after other callbacks

    def close(self, linger: int = 0) -> None:
        """Stop reading and close the socket; what it still queues gets `linger` ms."""
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.sock.FD)
            self.sock.close(linger=linger)
