"""The owner's book of jobs: which items are queued, running, delivered.

Theory of operation
-------------------
A client submits a *job* (one function, its options) and streams *chunks* of
items into it; a chunk's items travel as one opaque payload that only workers
unpickle. The owner hands out *assignments*: a range [start, stop) of one
chunk, to be run by one worker. Results come back per range.

    client ──chunk──▶ queue ──assign──▶ running ──completed──▶ delivered
                        ▲                  │
                        └──── lost ────────┘  (requeue, split, count tries)

Invariants (checked by `validate`, which the tests call after every step):
- every item of a chunk is in exactly one of: a queued range, a running
  assignment's range, or delivered (result or failure sent to the client);
- an item is delivered at most once: a late or duplicate result for items
  already delivered is dropped here (the client dedups too, by item);
- an item that has crashed its worker more than `retries` times is failed
  alone: when a worker dies, the worker's own record of the item it was
  running (`crashed_at`) splits the range into before / culprit / after, and
  only the culprit's count of tries goes up;
- an item runs at most `retries + 1` times, the runs that found it
  included: a crash the fast path could not place is charged, with the next,
  to the item the recorded rerun dies at, and a job with `retries=0` records
  from its first run, since it has no run to spare for the search.

Jobs share workers fairly: `assign` walks jobs round-robin, so two jobs with
queued work each get about half of the assignments.

This module imports no sockets and reads no clock; the node feeds it events.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hived.errors import InternalError, LocalProtocolError
from hived.protocol.fields import SOMEWHERE

JobKey = tuple[bytes, int]  # (client id, job number within that client)
# The most items one chunk may hold: the book keeps a byte per item of a
# chunk, so a client's count is bounded before it is believed.
MAX_CHUNK_ITEMS = 1 << 24


@dataclass(frozen=True, slots=True)
class Needs:
    """What one task of a job occupies on a worker node."""

    cpus: int = 1
    gpus: int = 0


@dataclass(slots=True)
class Chunk:
    number: int
    count: int
    frames: list[Any]
    delivered: bytearray
    tries: dict[int, int] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return self.delivered.count(0)


@dataclass(slots=True)
class Range:
    chunk: Chunk
    start: int
    stop: int
    precise: bool = False  # the worker records each item it starts
    # It crashed once already, at an item the fast path did not record: the
    # item it dies at next is charged that run too.
    suspect: bool = False


@dataclass(slots=True)
class Job:
    key: JobKey
    fn: bytes
    needs: Needs
    retries: int
    opened_at: float
    queue: deque[Range] = field(default_factory=deque)
    chunks: dict[int, Chunk] = field(default_factory=dict)
    running: set[int] = field(default_factory=set)
    closed: bool = False
    items_total: int = 0
    items_done: int = 0  # delivered, returning or raising
    items_raised: int = 0  # of those done, how many the function raised in
    items_failed: int = 0  # delivered as hived's error: crashed, would not unpickle

    @property
    def items_queued(self) -> int:
        return sum(r.stop - r.start for r in self.queue)

    @property
    def finished(self) -> bool:
        return self.closed and not self.chunks


@dataclass(frozen=True, slots=True)
class Assignment:
    id: int
    job: JobKey
    fn: bytes
    chunk: int
    start: int
    stop: int
    frames: list[Any]
    needs: Needs
    precise: bool = False


@dataclass(frozen=True, slots=True)
class Delivery:
    """Results for [start, stop) of a chunk may go to the client."""

    job: JobKey
    chunk: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Failure:
    """Item `index` of a chunk failed for good; tell the client why."""

    job: JobKey
    chunk: int
    index: int
    tries: int


class Owner:
    """Jobs submitted to this node, and the assignments out on workers."""

    def __init__(self, first_assignment: int = 1) -> None:
        self.jobs: dict[JobKey, Job] = {}
        self._running: dict[int, tuple[Job, Range]] = {}
        # The shell starts each process's ids at a random point: a worker still
        # running a range of this node's previous process reports an id that
        # must not name one of ours (it would settle our items with its results).
        self._ids = itertools.count(first_assignment)
        self._turn: deque[JobKey] = deque()  # round-robin order of jobs
        # Totals over every job this book held (the node's metrics): items
        # delivered as an error, by why, and items retried: queued again after a loss.
        self.items_raised = 0  # the function raised: its exception is the result
        self.items_crashed = 0  # crashed their worker on every try
        self.items_refused = 0  # their function or arguments would not unpickle
        self.items_retried = 0

    # -- the client's side ---------------------------------------------------

    def open_job(self, key: JobKey, fn: bytes, needs: Needs, retries: int, now: float) -> Job:
        if key in self.jobs:
            raise LocalProtocolError(f"job {key[1]} of this client is already open")
        job = Job(key, fn, needs, retries, now)
        self.jobs[key] = job
        self._turn.append(key)
        return job

    def add_chunk(self, key: JobKey, number: int, count: int, frames: list[Any]) -> None:
        job = self._job(key)
        if job.closed:
            raise LocalProtocolError(f"job {key[1]} is closed; no chunk may be added")
        if number in job.chunks:
            raise LocalProtocolError(f"job {key[1]}: chunk {number} is a repeat")
        if not 1 <= count <= MAX_CHUNK_ITEMS:
            raise LocalProtocolError(
                f"job {key[1]}: chunk {number} has {count} items; expected 1 to {MAX_CHUNK_ITEMS}"
            )
        chunk = Chunk(number, count, frames, bytearray(count))
        job.chunks[number] = chunk
        job.queue.append(self._untried(job, chunk, 0, count))
        job.items_total += count

    def close_job(self, key: JobKey) -> Job | None:
        """No more chunks will come; returns the job if that finishes it."""
        job = self._job(key)
        job.closed = True
        return self._retire_if_finished(job)

    def cancel_job(self, key: JobKey) -> list[int]:
        """Forget the job; returns the ids of its assignments still running."""
        job = self.jobs.pop(key, None)
        if job is None:
            return []
        self._turn.remove(key)
        for aid in job.running:
            del self._running[aid]
        return sorted(job.running)

    # -- the workers' side ---------------------------------------------------

    def assign(self, fits: Any = None) -> Assignment | None:
        """Hand the next range of the next job in turn whose needs `fits(needs)`."""
        for _ in range(len(self._turn)):
            key = self._turn[0]
            self._turn.rotate(-1)
            job = self.jobs[key]
            if not job.queue or (fits is not None and not fits(job.needs)):
                continue
            rng = job.queue.popleft()
            aid = next(self._ids)
            self._running[aid] = (job, rng)
            job.running.add(aid)
            return Assignment(
                aid, key, job.fn, rng.chunk.number, rng.start, rng.stop, rng.chunk.frames,
                job.needs, rng.precise,
            )
        return None

    def completed(
        self, aid: int, start: int, stop: int, final: bool, raised: int = 0
    ) -> Delivery | None:
        """A worker returned results for [start, stop) of assignment `aid`,
        `raised` of them exceptions the function raised.

        Returns what to deliver, or None for a duplicate or a cancelled job.
        `final` marks the assignment's last message.
        """
        entry = self._running.get(aid)
        if entry is None:
            return None
        job, rng = entry
        if not (rng.start <= start < stop <= rng.stop):
            raise InternalError(
                f"assignment {aid} covers [{rng.start}, {rng.stop}), not [{start}, {stop})"
            )
        if final:
            del self._running[aid]
            job.running.discard(aid)
        fresh = self._settle(job, rng.chunk, start, stop)
        if not fresh:
            self._retire_if_finished(job)
            return None
        job.items_done += fresh
        job.items_raised += raised
        self.items_raised += raised
        self._retire_chunk_if_done(job, rng.chunk)
        return Delivery(job.key, rng.chunk.number, start, stop)

    def refused(self, aid: int) -> Delivery | None:
        """The worker could not start assignment `aid` (its function or arguments
        did not unpickle): its items fail for good, since no retry can help."""
        entry = self._running.pop(aid, None)
        if entry is None:
            return None
        job, rng = entry
        job.running.discard(aid)
        fresh = self._settle(job, rng.chunk, rng.start, rng.stop)
        job.items_failed += fresh
        self.items_refused += fresh
        self._retire_chunk_if_done(job, rng.chunk)
        self._retire_if_finished(job)
        return Delivery(job.key, rng.chunk.number, rng.start, rng.stop) if fresh else None

    @staticmethod
    def _settle(job: Job, chunk: Chunk, start: int, stop: int) -> int:
        """Mark [start, stop) delivered; returns how many were not already."""
        if chunk.number not in job.chunks:
            return 0
        fresh = chunk.delivered[start:stop].count(0)
        chunk.delivered[start:stop] = b"\x01" * (stop - start)
        return fresh

    def lost(self, aid: int, crashed_at: int | None) -> list[Failure]:
        """Assignment `aid` will never report again (its worker or node is gone).

        `crashed_at` is the item the dead worker was running, when known: it
        alone is charged a try; the rest of the range is requeued as it was.
        SOMEWHERE means the worker died in this range but did not record
        each item (the fast path): the range runs again recording each item,
        and the item it dies at is charged both runs; if it dies there
        outside any item, every item in it is.
        None means the node is gone, through no fault of these items.
        """
        entry = self._running.pop(aid, None)
        if entry is None:
            return []
        job, rng = entry
        job.running.discard(aid)
        undelivered = [i for i in range(rng.start, rng.stop) if not rng.chunk.delivered[i]]
        failures = self._requeue(job, rng, undelivered, crashed_at) if undelivered else []
        self.items_retried += len(undelivered) - len(failures)  # the rest run again
        return failures

    def _requeue(
        self, job: Job, rng: Range, undelivered: list[int], crashed_at: int | None
    ) -> list[Failure]:
        """Queue the lost range's undelivered items again, but for those whose
        last try this was: they are returned, failed."""
        chunk = rng.chunk
        if crashed_at is None or (crashed_at != SOMEWHERE and not rng.start <= crashed_at < rng.stop):
            # The node is gone, not necessarily because of these items.
            job.queue.appendleft(Range(chunk, rng.start, rng.stop, rng.precise))
            return []
        if crashed_at == SOMEWHERE and not rng.precise:
            job.queue.appendleft(Range(chunk, rng.start, rng.stop, precise=True, suspect=True))
            return []
        runs = 2 if rng.suspect else 1  # this crash, and the unplaced one before it
        if crashed_at == SOMEWHERE:
            failures = []
            for i in reversed(undelivered):  # each item alone, each charged
                failures += self._charge(job, chunk, i, runs, [])
            self._retire_chunk_if_done(job, chunk)
            return failures[::-1]
        pieces = [
            self._untried(job, chunk, rng.start, crashed_at),
            self._untried(job, chunk, crashed_at + 1, rng.stop),
        ]
        failures = self._charge(job, chunk, crashed_at, runs, pieces)
        self._retire_chunk_if_done(job, chunk)
        return failures

    @staticmethod
    def _untried(job: Job, chunk: Chunk, start: int, stop: int) -> Range:
        """Items no crash is charged to: the fast path, unless the job has no
        retry to spend finding the item a fast-path crash happened at."""
        return Range(chunk, start, stop, precise=job.retries == 0)

    def _charge(
        self, job: Job, chunk: Chunk, index: int, runs: int, around: list[Range]
    ) -> list[Failure]:
        """`runs` more tries against item `index`; requeue it between `around`
        (the rest of its range), unless that was its last try."""
        pieces = list(around)
        failures = []
        tries = chunk.tries.get(index, 0) + runs
        chunk.tries[index] = tries
        if tries > job.retries:
            chunk.delivered[index] = 1
            job.items_failed += 1
            self.items_crashed += 1
            failures.append(Failure(job.key, chunk.number, index, tries))
        else:
            pieces.insert(1 if pieces else 0, Range(chunk, index, index + 1, precise=True))
        for piece in reversed(pieces):
            if piece.start < piece.stop:
                job.queue.appendleft(piece)
        return failures

    def assignment(self, aid: int) -> JobKey | None:
        entry = self._running.get(aid)
        return entry[0].key if entry else None

    # -- bookkeeping ---------------------------------------------------------

    def queued_items(self) -> tuple[int, int]:
        """Items queued for CPU slots, and for GPU slots."""
        cpu = gpu = 0
        for job in self.jobs.values():
            if job.needs.gpus:
                gpu += job.items_queued
            else:
                cpu += job.items_queued
        return cpu, gpu

    def _job(self, key: JobKey) -> Job:
        job = self.jobs.get(key)
        if job is None:
            raise LocalProtocolError(f"job {key[1]} is not open")
        return job

    def _retire_chunk_if_done(self, job: Job, chunk: Chunk) -> None:
        if chunk.number in job.chunks and 0 not in chunk.delivered:  # memchr, not a loop
            # Queued ranges of a fully delivered chunk are dead weight.
            job.queue = deque(r for r in job.queue if r.chunk is not chunk)
            del job.chunks[chunk.number]
            self._retire_if_finished(job)

    def _retire_if_finished(self, job: Job) -> Job | None:
        if job.finished and not job.running and job.key in self.jobs:
            del self.jobs[job.key]
            self._turn.remove(job.key)
            return job
        return None

    def validate(self) -> None:
        """Check the invariants in the module docstring (for tests)."""
        for job in self.jobs.values():
            for chunk in job.chunks.values():
                cover = bytearray(chunk.delivered)
                ranges = [r for r in job.queue if r.chunk is chunk] + [
                    rng for j, rng in self._running.values() if j is job and rng.chunk is chunk
                ]
                for rng in ranges:
                    for i in range(rng.start, rng.stop):
                        if not chunk.delivered[i]:
                            if cover[i] > 1:
                                raise InternalError(f"item {i} of chunk {chunk.number} twice")
                            cover[i] += 2
                missing = [i for i, c in enumerate(cover) if c == 0]
                if missing:
                    raise InternalError(
                        f"items {missing[:5]} of chunk {chunk.number} are nowhere"
                    )
