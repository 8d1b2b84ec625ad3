"""A node's routing without processes: a client's job through the node, the
exchange and a fake pool, and back to the client.

The node, its exchange, blob store, owner's book and control server are
real (the client is linked in-process, as the embedded one is); only the
pool is a fake, whose workers run what the exchange hands them when the
test says so. A node alone: no mesh.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hived import __version__
from hived.errors import STOPPED
from hived.net.background import Background
from hived.node.exchange import Exchange
from hived.node.node import Node, NodeSettings
from hived.node.scheduling import Assignment
from hived.node.taskoutput import Piece
from hived.protocol.control import (
    AddChunk,
    Bye,
    CancelJob,
    CloseJob,
    ControlServer,
    Hello,
    JobRefused,
    OpenJob,
    Output,
    Result,
    Welcome,
)
from hived.protocol.serialization import function_digest
from hived.protocol.wire import Message, decode, encode

BLOB = b"a pickled function"
FN = function_digest(BLOB)


class FakePool:
    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self.running: list[Assignment] = []
        self.aborted: list[set[int]] = []
        self.holding = False
        self.kicks = 0
        self.stopped = False

    @property
    def slots_busy(self) -> int:
        return len(self.running)

    def kick(self) -> None:
        self.kicks += 1

    def free_slots(self) -> tuple[int, int]:
        return 2 - len(self.running), 0

    def abort(self, aids: set[int], reason: str) -> None:
        self.aborted.append(aids)

    async def stop(self) -> None:
        self.stopped = True

    def take(self) -> Assignment | None:
        a = self.exchange.assign(lambda needs: True)
        if a is not None:
            self.running.append(a)
        return a

    def finish(self, a: Assignment) -> None:
        self.running.remove(a)
        self.exchange.on_output(self.exchange.job_tag(a.job), Piece(1, "hello\n"), 42)
        self.exchange.on_done(a.id, a.start, a.stop, 0.1, 0, [b"results"])


class Client:
    def __init__(self, node: Node, cid: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.got = loop, []
        self._send = node.attach(cid, lambda frames: self.got.append(decode(frames)[0]))

    def send(self, msg: Message, payload: list[Any] | None = None) -> None:
        self._send(encode(msg, payload or []))
        self.loop.run_until_complete(asyncio.sleep(0))

    def of_type(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.got if isinstance(m, kind)]


@pytest.fixture
def node(loop: asyncio.AbstractEventLoop) -> tuple[Node, FakePool]:
    """A node wired as `Node.start` wires it, its pool a fake (a node alone)."""
    node = Node(NodeSettings(name="n", cpus=2))
    node.loop, node.background = loop, Background(loop)
    node.exchange = Exchange(
        node.owner, node.blobs, node, node.background, name=node.name, heartbeat=1.0,
        dead_after=10.0, draining=lambda: node.draining, job_rows=node.job_rows,
    )
    pool = FakePool(node.exchange)
    node.exchange.attach(pool, None)
    node.pool = pool  # type: ignore[assignment]  # the fake has what the node uses of a Pool
    node.control = ControlServer(loop, node._on_client_message)
    return node, pool


def hello(node: Node, cid: bytes, loop) -> Client:
    client = Client(node, cid, loop)
    client.send(Hello("test pid 1", __version__))
    assert client.of_type(Welcome)
    return client


def test_a_jobs_items_run_and_their_results_and_output_reach_its_client(node, loop):
    node, pool = node
    client = hello(node, b"c1", loop)
    client.send(OpenJob(1, FN, True, 1, 0, 0, "f"), [BLOB])
    client.send(AddChunk(1, 0, 3), [b"args"])
    assert pool.kicks
    a = pool.take()
    assert a is not None and a.frames == [b"args"] and node.blobs[a.fn] == BLOB
    pool.finish(a)
    (result,) = client.of_type(Result)
    assert (result.job, result.chunk, result.start, result.stop) == (1, 0, 0, 3)
    (out,) = client.of_type(Output)
    assert out.text == "hello\n" and out.source == "n pid=42"
    client.send(CloseJob(1))
    assert not node.owner.jobs and node.jobs_finished == 1


def test_a_job_naming_a_blob_the_node_lacks_is_refused(node, loop):
    node, pool = node
    client = hello(node, b"c1", loop)
    client.send(OpenJob(1, FN, False, 1, 0, 0, "f"))
    (refused,) = client.of_type(JobRefused)
    assert "does not have the job's function" in refused.text


def test_the_blob_goes_with_the_last_client_that_used_it(node, loop):
    node, pool = node
    first, second = hello(node, b"c1", loop), hello(node, b"c2", loop)
    first.send(OpenJob(1, FN, True, 1, 0, 0, "f"), [BLOB])
    second.send(OpenJob(1, FN, False, 1, 0, 0, "f"))  # it is held: no need to send it
    assert not second.of_type(JobRefused)
    first.send(Bye())
    assert FN in node.blobs
    second.send(Bye())
    assert FN not in node.blobs and not node.owner.jobs


def test_a_client_gone_stops_its_running_tasks_and_drops_their_output(node, loop):
    node, pool = node
    client = hello(node, b"c1", loop)
    client.send(OpenJob(1, FN, True, 1, 0, 0, "f"), [BLOB])
    client.send(AddChunk(1, 0, 1), [b"args"])
    a = pool.take()
    assert a is not None
    client.send(Bye())
    assert pool.aborted == [{a.id}]
    pool.finish(a)  # late: the book forgot the job, nothing reaches the client
    assert not client.of_type(Result) and not client.of_type(Output)


def test_close_refuses_the_jobs_left_and_ends_the_nodes_timers(node, loop):
    node, pool = node
    client = hello(node, b"c1", loop)
    for job in (1, 2):
        client.send(OpenJob(job, FN, job == 1, 1, 0, 0, "f"), [BLOB] if job == 1 else [])
        client.send(AddChunk(job, 0, 1), [b"args"])
        assert pool.take() is not None
    client.send(CancelJob(1))  # its running task may finish within the grace
    assert len(node.background) == 1 and pool.aborted == []
    loop.run_until_complete(node.close())
    assert len(node.background) == 0 and pool.stopped and node.stopped.is_set()
    (refused,) = client.of_type(JobRefused)
    assert (refused.job, refused.kind) == (2, STOPPED)
    loop.run_until_complete(asyncio.sleep(0.01))
    assert pool.aborted == []  # the grace's timer went with the node
