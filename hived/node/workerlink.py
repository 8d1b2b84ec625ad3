"""The link between the pool and one worker: a Unix socketpair carrying messages.

Why not a ZeroMQ socket: every ZeroMQ message crosses its sender's and its
receiver's I/O threads, so a RUN and its DONE wake four threads more than
the pool and the worker themselves. Those wake-ups are on the path of every
task, and on a virtual machine each costs tens of microseconds. The pool
spawns each worker with one end of its own socketpair (like the worker's
output pipes), so nothing else can connect to it, and the end of the pair
tells each side the other is gone: the worker exits when its node does.

A message is a list of frames, sent as a header (`<I` the count of frames,
then a `<Q` length per frame) and the frames' bytes back to back. Large frames
are received into memory of their own, so a numpy argument's buffer is
written once by the kernel and unpickled in place.

`FrameReader` is the sans-IO half (bytes in, messages out); `send_blocking`
and `recv_blocking` are the worker's side, `Link` is the pool's: asyncio
reader and writer callbacks, never blocking the loop.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the worker imports this module: it stays light
    import asyncio

log = logging.getLogger(__name__)

COUNT = struct.Struct("<I")
MAX_FRAMES = 4096  # a message's frames; more is a broken stream, not a message
SCRATCH = 256 * 1024  # read buffer; a frame over half of it gets memory of its own
IOV_BATCH = 512  # buffers per sendmsg, under the kernel's IOV_MAX (1024)
BURST = 64  # reads per readable callback, so one worker cannot starve the loop


class BrokenStream(Exception):
    """The bytes from the other end are not messages: the stream cannot be trusted.
    `messages` holds those completed before the bytes that broke it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.messages: list[list[Any]] = []


def _buffer(frame: Any) -> memoryview:
    view = memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def buffers(frames: Sequence[Any]) -> list[memoryview]:
    """What to write for one message: its header, then each frame's bytes."""
    views = [_buffer(f) for f in frames]
    head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return [memoryview(head), *views]


def _consume(views: list[memoryview], sent: int) -> list[memoryview]:
    """`views` less their first `sent` bytes."""
    for i, view in enumerate(views):
        if sent < view.nbytes:
            return [view[sent:], *views[i + 1:]] if sent else views[i:]
        sent -= view.nbytes
    return []


class FrameReader:
    """Messages out of a byte stream (sans-IO): read into `space()`, then tell
    `wrote(n)`, which returns the messages completed, each a list of frames."""

    def __init__(self) -> None:
        self._scratch = bytearray(SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0  # the unparsed bytes in the scratch buffer
        self._lengths: tuple[int, ...] | None = None  # of the message being read
        self._frames: list[Any] = []
        self._large: bytearray | None = None  # a large frame being read into place
        self._large_filled = 0

    def space(self) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._large_filled:]
        if self._end == SCRATCH:  # unparsed bytes move to the front
            self._view[: self._end - self._start] = self._view[self._start : self._end]
            self._start, self._end = 0, self._end - self._start
        return self._view[self._end :]

    def wrote(self, n: int) -> list[list[Any]]:
        if self._large is not None:
            self._large_filled += n
        else:
            self._end += n
        out: list[list[Any]] = []
        try:
            self._parse(out)
        except BrokenStream as exc:
            exc.messages = out
            raise
        if self._start == self._end:
            self._start = self._end = 0
        return out

    def _parse(self, out: list[list[Any]]) -> None:
        while self._step():
            if self._lengths is not None and len(self._frames) == len(self._lengths):
                out.append(self._frames)
                self._frames, self._lengths = [], None

    def _step(self) -> bool:
        """Parse what the buffered bytes allow; False when more must be read."""
        if self._large is not None:
            if self._large_filled < len(self._large):
                return False
            self._frames.append(self._large)
            self._large = None
            return True
        available = self._end - self._start
        if self._lengths is None:
            if available < COUNT.size:
                return False
            (count,) = COUNT.unpack_from(self._scratch, self._start)
            if not 1 <= count <= MAX_FRAMES:
                raise BrokenStream(f"a message of {count} frames; expected 1 to {MAX_FRAMES}")
            size = COUNT.size + 8 * count
            if available < size:
                return False
            self._lengths = struct.unpack_from(f"<{count}Q", self._scratch, self._start + COUNT.size)
            self._start += size
            return True
        length = self._lengths[len(self._frames)]
        if available >= length:
            self._frames.append(bytes(self._view[self._start : self._start + length]))
            self._start += length
            return True
        if length > SCRATCH // 2:  # read the rest straight into the frame's own memory
            self._large = bytearray(length)
            self._large[:available] = self._view[self._start : self._end]
            self._large_filled = available
            self._start = self._end = 0
            return True
        return False


# -- the worker's side: blocking -------------------------------------------------


def send_blocking(sock: socket.socket, frames: Sequence[Any]) -> None:
    views = buffers(frames)
    while views:
        views = _consume(views, sock.sendmsg(views[:IOV_BATCH]))


def recv_blocking(sock: socket.socket, reader: FrameReader, ready: deque[list[Any]]) -> list[Any] | None:
    """The next message, or None once the other end is closed."""
    while not ready:
        n = sock.recv_into(reader.space())
        if n == 0:
            return None
        ready.extend(reader.wrote(n))
    return ready.popleft()


# -- the pool's side: on the asyncio loop ------------------------------------------


class Link:
    """The pool's end of one worker's socketpair: once started, `on_message(frames)`
    for each message received, and `on_broken(why)` if the bytes are not
    messages; `send` queues what the socket cannot take yet."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop, self.sock = loop, sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.reader = FrameReader()
        self.unsent: list[memoryview] = []
        self.on_message: Callable[[list[Any]], None] = lambda frames: None
        self.on_broken: Callable[[str], None] = lambda why: None
        self.closed = False

    def start(self, on_message: Callable[[list[Any]], None], on_broken: Callable[[str], None]) -> None:
        self.on_message, self.on_broken = on_message, on_broken
        self.loop.add_reader(self.fd, self.receive)

    def send(self, frames: Sequence[Any]) -> bool:
        """Send without blocking; False if the worker is gone."""
        if self.closed:
            return False
        if self.unsent:  # behind what is already waiting
            self.unsent.extend(buffers(frames))
            return True
        try:
            self.unsent = self._write(buffers(frames))
        except OSError as exc:  # the worker is gone: its exit is handled by the pool
            log.debug("send to a worker dropped: %s", exc)
            return False
        if self.unsent:
            self.loop.add_writer(self.fd, self._writable)
        return True

    def _write(self, views: list[memoryview]) -> list[memoryview]:
        """Write what the socket takes now; returns the rest."""
        while views:
            try:
                sent = self.sock.sendmsg(views[:IOV_BATCH])
            except BlockingIOError:
                return views
            views = _consume(views, sent)
        return views

    def _writable(self) -> None:
        try:
            self.unsent = self._write(self.unsent)
        except OSError as exc:
            log.debug("send to a worker dropped: %s", exc)
            self.unsent = []
        if not self.unsent:
            self.loop.remove_writer(self.fd)

    def receive(self, to_the_end: bool = False) -> None:
        """Handle what the worker sent. `to_the_end`: the worker is gone, so
        take all it wrote before it died."""
        for _ in itertools.count() if to_the_end else range(BURST):
            if self.closed:
                return
            space = self.reader.space()
            try:
                n = self.sock.recv_into(space)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:  # the worker is gone: its pidfd says so to the pool
                self.loop.remove_reader(self.fd)
                return
            broken = None
            try:
                messages = self.reader.wrote(n)
            except BrokenStream as exc:  # what came before the bad bytes still counts
                broken, messages = exc, exc.messages
            for frames in messages:
                try:
                    self.on_message(frames)
                except Exception:  # a handler's bug must not stop the link
                    log.exception("error handling a message from a worker")
            if broken is not None:
                self.close()
                self.on_broken(str(broken))
                return
            if n < len(space) and not to_the_end:  # read dry: wait for the next readable
                return

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            if self.unsent:
                self.loop.remove_writer(self.fd)
            self.sock.close()
