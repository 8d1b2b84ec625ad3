"""The pool's link to a worker: framing fed arbitrary read sizes, and the
asyncio end on a real socketpair against a blocking peer."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hived.node import workerlink
from hived.node.workerlink import (
    BrokenStream,
    FrameReader,
    Link,
    buffers,
    recv_blocking,
    send_blocking,
)

frames = st.lists(st.binary(max_size=300), min_size=1, max_size=5)


def stream_of(messages: list[list[bytes]]) -> bytes:
    return b"".join(bytes(v) for m in messages for v in buffers(m))


def read_in_pieces(data: bytes, sizes: list[int]) -> list[list[bytes]]:
    """Feed `data` to a reader, each read at most the next of `sizes` bytes."""
    reader, out, at, turn = FrameReader(), [], 0, 0
    while at < len(data):
        space = reader.space()
        n = min(len(space), sizes[turn % len(sizes)], len(data) - at)
        turn += 1
        space[:n] = data[at : at + n]
        at += n
        out += reader.wrote(n)
    return [[bytes(f) for f in m] for m in out]


@settings(max_examples=300, deadline=None)
@given(st.lists(frames, min_size=1, max_size=6), st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_messages_come_out_whole_however_the_stream_is_cut(messages, sizes) -> None:
    assert read_in_pieces(stream_of(messages), sizes) == messages


def test_a_large_frame_is_read_into_memory_of_its_own() -> None:
    large = os.urandom(3 * workerlink.SCRATCH + 7)
    messages = [[b"head", large, b""], [b"next"]]
    reader, data, got = FrameReader(), stream_of(messages), []
    at = 0
    while at < len(data):
        space = reader.space()
        n = min(len(space), 65536, len(data) - at)
        space[:n] = data[at : at + n]
        at += n
        got += reader.wrote(n)
    assert [[bytes(f) for f in m] for m in got] == messages
    assert type(got[0][1]) is bytearray  # the kernel wrote it in place, no join


@pytest.mark.parametrize("count", [0, workerlink.MAX_FRAMES + 1, 0xFFFFFFFF])
def test_a_count_out_of_bounds_breaks_the_stream(count) -> None:
    reader = FrameReader()
    space = reader.space()
    space[:4] = count.to_bytes(4, "little")
    with pytest.raises(BrokenStream, match=f"a message of {count} frames; expected 1 to 4096"):
        reader.wrote(4)


def test_messages_before_the_bytes_that_break_the_stream_are_kept() -> None:
    reader = FrameReader()
    data = stream_of([[b"fine"]]) + b"\xff" * 16  # both in one read
    space = reader.space()
    space[: len(data)] = data
    with pytest.raises(BrokenStream) as info:
        reader.wrote(len(data))
    assert info.value.messages == [[b"fine"]]


def run_link(peer, check) -> None:
    """A Link on a fresh loop against `peer(sock)` in a thread; `check(link, got, broken)`
    runs on the loop and returns when the test is done."""
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=peer, args=(theirs,), daemon=True)

    async def main() -> None:
        got: list[list[bytes]] = []
        broken: list[str] = []
        link = Link(asyncio.get_running_loop(), ours)
        link.start(lambda m: got.append([bytes(f) for f in m]), broken.append)
        thread.start()
        try:
            await asyncio.wait_for(check(link, got, broken), 30)
        finally:
            link.close()

    asyncio.run(main())
    thread.join(30)
    assert not thread.is_alive()
    theirs.close()


async def until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.005)


def test_a_large_message_crosses_both_ways_without_blocking_the_loop() -> None:
    big = os.urandom(32 << 20)

    def peer(sock: socket.socket) -> None:  # the worker: echo each message, then close
        reader, ready = FrameReader(), deque()
        while (m := recv_blocking(sock, reader, ready)) is not None:
            send_blocking(sock, m)
        sock.shutdown(socket.SHUT_WR)

    async def check(link, got, broken) -> None:
        ticks = 0

        async def ticker() -> None:  # the loop keeps running while 32 MB move
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick = asyncio.ensure_future(ticker())
        assert link.send([b"small"]) and link.send([b"head", big]) and link.send([b"last", b""])
        await until(lambda: len(got) == 3)
        tick.cancel()
        assert got == [[b"small"], [b"head", big], [b"last", b""]]
        assert ticks > 1
        link.sock.shutdown(socket.SHUT_WR)  # the peer sees the end and returns

    run_link(peer, check)


def test_bytes_that_are_not_messages_break_the_link_once() -> None:
    def peer(sock: socket.socket) -> None:
        send_blocking(sock, [b"fine"])
        sock.sendall(b"\xff" * 16)  # a task scribbling on the link's fd

    async def check(link, got, broken) -> None:
        await until(lambda: broken)
        assert got == [[b"fine"]]
        assert broken == ["a message of 4294967295 frames; expected 1 to 4096"]
        assert link.closed and not link.send([b"more"])

    run_link(peer, check)


def test_sending_to_a_closed_peer_says_false() -> None:
    def peer(sock: socket.socket) -> None:
        sock.close()

    async def check(link, got, broken) -> None:
        await until(lambda: not link.send([b"x" * 1024]))
        assert got == [] and broken == []

    run_link(peer, check)
