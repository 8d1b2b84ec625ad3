"""hived.node.exchange without processes: owners serve ranges, worker nodes pull them.

Each node here is a real `Exchange` on a real owner's book (`Owner`) and a
real `BlobStore`; its collaborators are fakes: a pool that runs what it is
given when the test says so, a sink that delivers to the book as the node
does and records what would reach clients, and a mesh whose messages go
through the wire encoding and wait in one queue until the test delivers
them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import pytest

from hived.mesh.matchmaking import HeldTell, Nothing, Pull, RangeDrop, RangeLost, RangeMsg
from hived.net.background import Background
from hived.node.blobs import BlobStore
from hived.node.exchange import Exchange
from hived.node.scheduling import Assignment, JobKey, Needs, Owner
from hived.node.taskoutput import Piece
from hived.protocol.serialization import function_digest
from hived.protocol.wire import Message, decode, encode

HEARTBEAT = 0.02
BLOB = b"a pickled function"
FN = function_digest(BLOB)
CLIENT = b"client-1"


class Network:
    """Messages between the fake meshes, in the order sent, until delivered."""

    def __init__(self) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.queue: list[tuple[str, str, list[Any]]] = []
        self.down: set[tuple[str, str]] = set()  # (from, to) links that refuse
        self.sent: list[tuple[str, str, Message]] = []

    def deliver(self) -> None:
        """Deliver every message, and those they prompt, until none is left."""
        while self.queue:
            sender, to, frames = self.queue.pop(0)
            msg, payload = decode(frames)
            self.nodes[to].exchange.handle(sender, msg, payload)

    def of_type(self, kind: type[Message]) -> list[Message]:
        return [msg for _, _, msg in self.sent if isinstance(msg, kind)]


class FakeMesh:
    def __init__(self, network: Network, advertise: str, coordinator: str) -> None:
        self.network, self.advertise, self.coordinator = network, advertise, coordinator
        self.redialled: list[str] = []

    def send(self, address: str, msg: Message, payload: Any = ()) -> bool:
        if (self.advertise, address) in self.network.down:
            return False
        self.network.sent.append((self.advertise, address, msg))
        self.network.queue.append((self.advertise, address, encode(msg, list(payload))))
        return True

    def redial(self, address: str) -> None:
        self.redialled.append(address)

    def coordinator_address(self) -> str | None:
        return self.coordinator

    def is_coordinator(self) -> bool:
        return self.coordinator == self.advertise

    def term(self) -> int:
        return 1

    def accept_term(self, term: int) -> bool:
        return True

    def members_alive(self) -> list[str]:
        return [a for a in self.network.nodes if a != self.advertise]


class FakePool:
    """Slots that run what the exchange hands out when the test says so."""

    def __init__(self, exchange: Exchange, cpus: int) -> None:
        self.exchange, self.cpus = exchange, cpus
        self.running: list[Assignment] = []
        self.kicks = 0
        self.aborted: list[tuple[set[int], str]] = []

    def kick(self) -> None:
        self.kicks += 1

    def free_slots(self) -> tuple[int, int]:
        return self.cpus - len(self.running), 0

    def abort(self, aids: set[int], reason: str) -> None:
        self.aborted.append((aids, reason))

    def take(self) -> Assignment | None:
        """An idle worker asks for work, as the pool's kick does."""
        a = self.exchange.assign(lambda needs: True)
        if a is not None:
            self.running.append(a)
        return a

    def finish(self, a: Assignment, failures: int = 0) -> None:
        """The worker ran `a` to its end: its output, then DONE."""
        self.running.remove(a)
        self.exchange.on_output(self.exchange.job_tag(a.job), Piece(1, f"ran {a.start}\n"), 4242)
        self.exchange.on_done(a.id, a.start, a.stop, 0.5, failures, [b"results"])

    def die(self, a: Assignment, crashed_at: int | None) -> None:
        self.running.remove(a)
        self.exchange.on_lost(a.id, crashed_at, "worker pid 4242 died")


class RecordingSink:
    """Delivers to the book as the node does, and records what clients would get."""

    def __init__(self, book: Owner) -> None:
        self.book = book
        self.results: list[tuple[JobKey, int, int]] = []
        self.failed: list[tuple[JobKey, int]] = []
        self.output: list[tuple[JobKey | None, str, str]] = []
        self.tasks_ended = 0
        self._tags: dict[int, JobKey] = {}

    def on_done(self, aid: int, start: int, stop: int, elapsed: float, failures: int,
                frames: list[Any]) -> None:
        key = self.book.assignment(aid)
        if key is not None and self.book.completed(aid, start, stop, final=True, raised=failures):
            self.results.append((key, start, stop))

    def on_fail(self, aid: int, text: str) -> None:
        key = self.book.assignment(aid)
        if key is not None and self.book.refused(aid) is not None:
            self.failed.append((key, aid))

    def on_lost(self, aid: int, crashed_at: int | None, why: str) -> None:
        key = self.book.assignment(aid)
        if key is not None:
            self.failed.extend((key, f.index) for f in self.book.lost(aid, crashed_at))

    def on_output(self, tag: int, piece: Piece, source: str) -> None:
        self.output.append((self._tags.get(tag), piece.text, source))

    def tag(self, key: JobKey) -> int:
        tag = 100 + len(self._tags)
        self._tags[tag] = key
        return tag

    def task_ended(self) -> None:
        self.tasks_ended += 1


class FakeNode:
    def __init__(self, network: Network, address: str, coordinator: str, loop: asyncio.AbstractEventLoop,
                 cpus: int = 2) -> None:
        self.address, self.draining = address, False
        self.book = Owner(first_assignment=1000 if address.endswith("1:1") else 5000)
        self.blobs = BlobStore()
        self.sink = RecordingSink(self.book)
        self.background = Background(loop)
        self.exchange = Exchange(
            self.book, self.blobs, self.sink, self.background, name=address[6:],
            heartbeat=HEARTBEAT, dead_after=10 * HEARTBEAT,
            draining=lambda: self.draining, job_rows=lambda: [{"id": self.address}],
        )
        self.mesh = FakeMesh(network, address, coordinator)
        self.pool = FakePool(self.exchange, cpus)
        self.exchange.attach(self.pool, self.mesh)
        network.nodes[address] = self

    def open_job(self, items: int, chunk: int = 0, key: JobKey = (CLIENT, 1)) -> JobKey:
        if key not in self.book.jobs:
            self.blobs.add(FN, BLOB)
            self.blobs.use(FN)
            self.book.open_job(key, FN, Needs(1, 0), retries=2, now=0.0)
        self.book.add_chunk(key, chunk, items, [b"args"])
        return key


A, B, C = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1", "tcp://10.0.0.3:1"


@pytest.fixture
def network() -> Network:
    return Network()


@pytest.fixture
def make(network: Network, loop: asyncio.AbstractEventLoop) -> Callable[..., FakeNode]:
    def make(address: str, cpus: int = 2) -> FakeNode:
        return FakeNode(network, address, A, loop, cpus)

    return make


def pull(network: Network, owner: FakeNode, worker: FakeNode) -> None:
    """The owner offers to the coordinator (itself), the idle worker asks it
    for work and pulls from the owner it is pointed to."""
    owner.exchange.offer()
    worker.exchange.idle()
    network.deliver()


def test_a_pulled_range_runs_on_the_worker_node_and_its_result_reaches_the_owner(network, make):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(10)
    pull(network, owner, worker)
    (rng,) = network.of_type(RangeMsg)
    assert rng.has_blob and (rng.start, rng.stop) == (0, 10)
    assert worker.blobs[FN] == BLOB  # kept, for the next range of that function
    assert owner.exchange.out == {rng.assignment: B}

    a = worker.pool.take()
    assert a is not None and a.fn == FN and a.frames == [b"args"]
    worker.pool.finish(a)
    assert worker.sink.results == [] and worker.sink.tasks_ended == 1  # not the worker's job
    network.deliver()
    assert owner.sink.results == [(key, 0, 10)]
    assert owner.exchange.out == {} and worker.exchange.taken == {}
    # the output went to the owner, under the owner's tag of the job
    assert owner.sink.output == [(key, "ran 0\n", "10.0.0.2:1 pid=4242")]
    assert key not in owner.book.jobs or not owner.book.jobs[key].queue


def test_the_function_blob_goes_with_the_first_range_only(network, make):
    owner, worker = make(A), make(B, cpus=1)
    owner.open_job(1)
    pull(network, owner, worker)
    worker.pool.finish(worker.pool.take())
    network.deliver()
    owner.open_job(1, chunk=1)
    pull(network, owner, worker)
    assert [m.has_blob for m in network.of_type(RangeMsg)] == [True, False]
    assert worker.pool.take() is not None  # the blob it holds serves the second range


def test_the_owners_own_work_comes_first_and_its_reports_stay_off_the_mesh(network, make):
    node = make(A)
    key = node.open_job(3)
    a = node.pool.take()
    assert a is not None and a.job == key
    node.pool.finish(a)
    assert node.sink.results == [(key, 0, 3)]
    assert node.sink.output == [(key, "ran 0\n", "10.0.0.1:1 pid=4242")]
    assert node.sink.tasks_ended == 0 and network.sent == []


def test_an_owner_with_nothing_that_fits_says_so(network, make):
    owner = make(A)
    make(B)
    owner.exchange.handle(B, Pull(2, 0, []), [])
    network.deliver()
    assert network.of_type(Nothing) and not network.of_type(RangeMsg)


def test_a_peer_gone_requeues_the_ranges_it_held(network, make):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(4)
    pull(network, owner, worker)
    assert owner.book.jobs[key].items_queued == 0
    kicks = owner.pool.kicks
    owner.exchange.node_gone(B, left=False)
    assert owner.exchange.out == {}
    assert owner.book.jobs[key].items_queued == 4  # back in the queue, to run elsewhere
    assert owner.pool.kicks > kicks
    a = owner.pool.take()  # the owner's own pool may run it now
    assert a is not None and (a.start, a.stop) == (0, 4)


def test_an_owner_gone_for_good_stops_what_was_pulled_from_it(network, make):
    owner, worker = make(A), make(B, cpus=1)
    owner.open_job(2)
    owner.open_job(2, key=(CLIENT, 2))
    pull(network, owner, worker)
    assert len(worker.exchange.taken) == 1 and len(worker.exchange.queue) == 1
    running = worker.pool.take()
    assert running is not None
    worker.exchange.node_gone(A, left=True)
    assert worker.exchange.queue == deque()  # the queued one is dropped
    assert worker.pool.aborted == [({running.id}, "its owner is gone")]


def test_a_report_the_link_refused_is_sent_again_every_heartbeat(network, make, loop):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(5)
    pull(network, owner, worker)
    network.down.add((B, A))
    worker.pool.finish(worker.pool.take())
    assert len(worker.exchange.unsent) == 1 and owner.sink.results == []
    # asked meanwhile what it holds, the worker counts the unsent report as held
    owner.exchange.ask_held()
    network.down.discard((B, A))
    network.deliver()
    (tell,) = network.of_type(HeldTell)
    assert tell.missing == []
    loop.run_until_complete(asyncio.sleep(3 * HEARTBEAT))
    network.deliver()
    assert worker.exchange.unsent == []
    assert owner.sink.results == [(key, 0, 5)]


def test_a_range_the_node_does_not_hold_is_requeued_when_it_says_so(network, make, loop):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(3)
    pull(network, owner, worker)
    worker.exchange.taken.clear()  # lost on the way, say: the worker never got it
    owner.exchange.ask_held()
    network.deliver()
    assert owner.exchange.out == {}
    assert owner.book.jobs[key].items_queued == 3


def test_a_crash_on_a_pulled_range_is_charged_by_its_owner(network, make):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(3)
    pull(network, owner, worker)
    worker.pool.die(worker.pool.take(), crashed_at=1)
    network.deliver()
    (lost,) = network.of_type(RangeLost)
    assert lost.crashed_at == 1
    job = owner.book.jobs[key]
    assert job.chunks[0].tries == {1: 1} and job.items_queued == 3  # run again, the culprit charged


def test_draining_hands_pulled_ranges_not_started_back(network, make):
    owner, worker = make(A), make(B, cpus=2)
    key = owner.open_job(1)
    owner.open_job(1, key=(CLIENT, 2))
    pull(network, owner, worker)
    assert len(worker.exchange.queue) == 2
    worker.draining = True
    worker.exchange.hand_back()
    network.deliver()
    assert worker.exchange.queue == deque() and worker.exchange.taken == {}
    assert [m.text for m in network.of_type(RangeLost)] == ["10.0.0.2:1 is draining"] * 2
    assert owner.book.jobs[key].items_queued == 1
    worker.exchange.idle()  # a draining node pulls nothing
    network.deliver()
    assert len(network.of_type(RangeMsg)) == 2


def test_a_job_ended_on_its_owner_stops_its_ranges_on_the_worker_node(network, make):
    owner, worker = make(A), make(B, cpus=1)
    key = owner.open_job(2)
    owner.open_job(2, key=(CLIENT, 2))
    pull(network, owner, worker)
    running = worker.pool.take()
    aids = owner.book.cancel_job(key) + owner.book.cancel_job((CLIENT, 2))
    owner.exchange.drop(set(aids))
    network.deliver()
    assert network.of_type(RangeDrop)
    assert worker.exchange.queue == deque()
    assert worker.pool.aborted == [({running.id}, "its owner dropped the job")]
    worker.pool.die(running, None)  # its worker reports it lost; the owner ignores that
    network.deliver()
    assert owner.sink.failed == []


def test_hivectl_jobs_gathers_every_live_nodes_rows(network, make, loop):
    owner = make(A)
    make(B), make(C)
    got: list[list[dict[str, Any]]] = []
    network.down.add((A, C))  # C never hears the question
    owner.exchange.gather_jobs(got.append)
    network.deliver()
    assert got == []  # waits for C, up to a heartbeat
    loop.run_until_complete(asyncio.sleep(3 * HEARTBEAT))
    assert got == [[{"id": A}, {"id": B}]]  # C's rows never came


def test_closing_the_background_cancels_the_resend_timer(network, make, loop):
    owner, worker = make(A), make(B, cpus=1)
    owner.open_job(1)
    pull(network, owner, worker)
    network.down.add((B, A))
    worker.pool.finish(worker.pool.take())
    assert len(worker.background) == 1  # the resend, in a heartbeat
    loop.run_until_complete(worker.background.aclose())
    assert len(worker.background) == 0
