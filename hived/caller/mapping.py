"""One `map` call, as the caller sees it: a window of chunks out, results back in order.

Theory of operation
-------------------
`MapStream` reads the caller's iterables lazily and keeps a bounded window of
chunks in flight: it sends a chunk whenever one comes back, so an endless
generator works and memory stays flat. Results arrive per range of a chunk
(a crashed range is split and retried item by item), land in their chunk's
slots, and are yielded in input order (or as chunks complete, with
`ordered=False`). Each slot is filled once: a duplicate range is ignored, so
delivery is exactly-once even if the node sent something twice.

A pickling problem fails only the item at fault: a chunk that will not
pickle here is sent item by item (the unpicklable items fail at once), and a
range that failed for pickling elsewhere (an argument did not unpickle in the
worker, a result did not unpickle here) is sent again item by item, as
chunks with negative numbers that map back to the original slots. So the job
stays open (CloseJob) until the last result is in.

When the client moves to another node (`hived.caller.failover`), the stream hears
`Moved` in its caller's thread and sends its job and every chunk not yet
complete on the new link: a chunk keeps its inputs until its last slot is
filled, so what was not delivered can always go again, and what two nodes
both answer fills each slot once.

Chunk size (`chunksize=None`) adapts (`ChunkSizer`): the first chunks are
probes of one item, one per slot; every result reports the seconds its
worker spent, and the next chunks hold about `TARGET_CHUNK_SECONDS` of work,
at most what multiprocessing's map would use for a sized input (a quarter
of the items per slot) and one item each when an item takes
`LONG_TASK_SECONDS` or more: long tasks are never batched, trivial ones go
in multiprocessing's chunks from the second round trip on.
"""

from __future__ import annotations

import itertools
import math
import operator
import queue
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hived.caller.failover import Moved, Reconnecting
from hived.caller.progress import Progress
from hived.errors import (
    SERIALIZATION,
    UNKNOWN_BLOB,
    HiveError,
    RemoteError,
    RemoteProtocolError,
    SerializationError,
    TaskTimeout,
    error_type,
)
from hived.node.scheduling import MAX_CHUNK_ITEMS
from hived.node.worker import TaskError
from hived.protocol import serialization
from hived.protocol.control import AddChunk, CancelJob, CloseJob, ItemsFailed, JobRefused, Result
from hived.protocol.wire import Message, encode

TARGET_CHUNK_SECONDS = 0.02  # of worker time per chunk, once items are measured
LONG_TASK_SECONDS = 0.01  # items this long go one per chunk
WINDOW_BUFFER = 4  # finished chunks held for ordered output, in windows
MAX_UNSIZED_CHUNK = 4096  # cap when the input's length is unknown
_EMPTY = object()

def check_range(msg: Result | ItemsFailed, count: int) -> None:
    """Raise RemoteProtocolError unless `msg` can be about items of a chunk of `count`."""
    what = type(msg).TYPE.decode()
    if not 0 <= msg.start < msg.stop <= count:
        raise RemoteProtocolError(
            f"the node sent a {what} for items [{msg.start}, {msg.stop}) of a chunk of {count}; "
            f"expected 0 <= start < stop <= {count}"
        )
    if isinstance(msg, Result):
        if not (math.isfinite(msg.elapsed) and msg.elapsed >= 0):
            raise RemoteProtocolError(
                f"the node sent a {what} with elapsed={msg.elapsed}; expected seconds >= 0"
            )
        if not 0 <= msg.failures <= msg.stop - msg.start:
            raise RemoteProtocolError(
                f"the node sent a {what} with failures={msg.failures} for "
                f"{msg.stop - msg.start} items; expected 0 to {msg.stop - msg.start}"
            )


def load_values(payload: list[Any], count: int, what: str) -> list[Any]:
    """The `count` values a RESULT's payload holds (SerializationError if it
    does not unpickle, RemoteProtocolError if it holds something else)."""
    values = serialization.loads(payload, what)
    if type(values) is not list or len(values) != count:
        got = f"{len(values)} values" if type(values) is list else f"a {type(values).__name__}"
        raise RemoteProtocolError(f"the node sent {got} as {what}; expected a list of {count}")
    return values


def lacks_function_again() -> RemoteProtocolError:
    """What a node that says it lacks a job's function after it was sent is told."""
    return RemoteProtocolError(
        "the node said again that it lacks the job's function, which was sent to it; "
        "it is not behaving as hived does"
    )


def raise_for(value: Any) -> Any:
    """The value itself, or raise what a TaskError stands for."""
    if type(value) is not TaskError:
        return value
    cause = None
    if value.text:
        cause = RemoteError(f"remote traceback (on {value.where}):\n{value.text.rstrip()}")
    if value.exc is not None:
        raise value.exc from cause
    raise SerializationError(value.problem) from cause


def heuristic_chunksize(total: int, slots: int) -> int:
    """multiprocessing.Pool.map's chunksize for `total` items on `slots` workers:
    four chunks per worker, rounded up."""
    chunks, extra = divmod(total, 4 * slots)
    return max(1, chunks + (1 if extra else 0))


class ChunkSizer:
    """How many items the next chunk of a map holds (sans-IO: fed each result's
    item count and worker seconds).

    A fixed `chunksize` is used as given. Otherwise the first chunks are
    probes of one item each, one per slot, and no more go out until one
    reports: a long task is never batched before its duration is known.
    Then chunks hold about TARGET_CHUNK_SECONDS of the measured work, at most
    multiprocessing's heuristic for a sized input (MAX_UNSIZED_CHUNK for
    one of unknown length), and one item each while an item takes
    LONG_TASK_SECONDS or more.
    """

    def __init__(self, fixed: int | None, slots: int, total: int | None) -> None:
        self.fixed = min(fixed, MAX_CHUNK_ITEMS) if fixed else None
        self.slots = max(slots, 1)
        self.cap = min(heuristic_chunksize(total, self.slots), MAX_CHUNK_ITEMS) if total \
            else MAX_UNSIZED_CHUNK
        self.items = 0
        self.seconds = 0.0

    @property
    def probing(self) -> bool:
        """No result has said yet what an item costs."""
        return not self.fixed and not self.items

    def learn(self, count: int, elapsed: float) -> None:
        self.items += count
        self.seconds += elapsed

    def next_size(self) -> int:
        if self.fixed:
            return self.fixed
        if not self.items:
            return 1
        per_item = self.seconds / self.items
        if per_item >= LONG_TASK_SECONDS:
            return 1
        if per_item <= 0:
            return self.cap
        return max(1, min(self.cap, int(TARGET_CHUNK_SECONDS / per_item)))


@dataclass
class ChunkSlots:
    count: int
    frames: list[Any]
    items: list[Any]  # the arguments, kept to send items again one by one
    first: int  # the input position of item 0, for error messages
    values: list[Any] = field(default_factory=list)
    filled: bytearray = field(default_factory=bytearray)
    missing: int = 0
    failed: bool = False  # some slot holds a failure: yield item by item, raising there

    def __post_init__(self) -> None:
        self.values = [_EMPTY] * self.count
        self.filled = bytearray(self.count)
        self.missing = self.count


class MapStream:
    """Drives one job; iterate `results()` in the caller's thread."""

    def __init__(
        self,
        *,
        job: int,
        send: Callable[..., int | None],
        opener: Callable[[bool], list[Any]],
        forget: Callable[[int], None],
        iterables: tuple[Iterable[Any], ...],
        slots: int,
        chunksize: int | None,
        ordered: bool,
        timeout: float | None,
        progress: bool,
    ) -> None:
        self.job, self.send, self.opener, self.forget = job, send, opener, forget
        self.inbox: queue.SimpleQueue[tuple[Message | Moved | Reconnecting, list[Any]]] = queue.SimpleQueue()
        self.nargs = len(iterables)
        self.items = iter(iterables[0]) if self.nargs == 1 else zip(*iterables, strict=False)
        total = _length_hint(iterables)
        self.sizer = ChunkSizer(chunksize, slots, total)
        self.window = 2 * max(slots, 1) + 1
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.ordered = ordered
        self.progress = Progress(total) if progress else None
        self.chunks: dict[int, ChunkSlots] = {}
        self.sent = 0  # chunks numbered 0 to sent - 1 went out
        # An item sent again alone goes as a chunk with a negative number.
        self.alone = itertools.count(-1, -1)
        self.sent_alone = 0  # chunks numbered -1 to -sent_alone
        self.resent = False  # the function went again after the node said it lacked it
        self.parts: dict[int, tuple[int, int]] = {}  # its number: (chunk, index)
        self.read = 0  # items taken from the input so far
        self.next_out = 0
        self.exhausted = False
        self.finished = False
        self.refusal: HiveError | None = None
        self.link_epoch: int | None = None  # the link the job is open on (see Hive._send)

    def start(self) -> None:
        """Open the job and send the first window; call once the stream can
        receive (results may come back before this returns)."""
        self.link_epoch = self.fill_window(self.opener(False))

    # -- sending ---------------------------------------------------------------

    def fill_window(self, *first: list[Any]) -> int | None:
        """Read and send chunks until the window is full; one hand-over to the
        link. The link's epoch, or None if nothing went."""
        out = list(first)
        while not self.exhausted and self._room():
            items = list(itertools.islice(self.items, self.sizer.next_size()))
            if not items:
                # CloseJob waits for the last result: until then an item may
                # still have to be sent again alone (see _send_alone).
                self.exhausted = True
                break
            start, self.read = self.read, self.read + len(items)
            try:
                frames = serialization.dumps((self.nargs, items), "the arguments")
            except SerializationError:
                out.extend(self._add_one_by_one(items, start))
                continue
            number, self.sent = self.sent, self.sent + 1
            self.chunks[number] = ChunkSlots(len(items), frames, items, start)
            out.append(encode(AddChunk(self.job, number, len(items)), frames))
        return self.send(*out) if out else None

    def _room(self) -> bool:
        """Whether another chunk may go out: at most `window` chunks running,
        and at most WINDOW_BUFFER windows held in all (while the sizer probes,
        a chunk per slot). Finished chunks behind
        one that waits (its node died and it waits for dead_after) do not
        hold up the rest, yet memory stays bounded."""
        if len(self.chunks) >= WINDOW_BUFFER * self.window:
            return False
        running = sum(1 for chunk in self.chunks.values() if chunk.missing)
        return running < (self.sizer.slots if self.sizer.probing else self.window)

    def _add_one_by_one(self, items: list[Any], first: int) -> list[list[Any]]:
        """A chunk that will not pickle: each item a chunk of its own, so that
        only the items that cannot be pickled fail."""
        out = []
        for offset, item in enumerate(items):
            number, self.sent = self.sent, self.sent + 1
            what = f"the argument{'s' if self.nargs > 1 else ''} of item {first + offset}"
            try:
                frames = serialization.dumps((self.nargs, [item]), what)
            except SerializationError as exc:
                chunk = self.chunks[number] = ChunkSlots(1, [], [], first + offset)
                self._fill(chunk, 0, [_Failed(SerializationError, str(exc))], failures=1)
                continue
            self.chunks[number] = ChunkSlots(1, frames, [item], first + offset)
            out.append(encode(AddChunk(self.job, number, 1), frames))
        return out

    def _send_alone(self, number: int, chunk: ChunkSlots, start: int, stop: int) -> None:
        """Items [start, stop) failed together for a reason of pickling (an
        argument did not unpickle in the worker, or a result here): send each
        again alone, so the one at fault fails alone and the rest succeed."""
        out = []
        for i in range(start, stop):
            if chunk.filled[i]:
                continue
            alone = next(self.alone)
            self.sent_alone = -alone
            frames = serialization.dumps((self.nargs, [chunk.items[i]]), "the arguments")
            self.parts[alone] = (number, i)
            out.append(encode(AddChunk(self.job, alone, 1), frames))
        if out:
            self.send(*out)

    def resend_all(self) -> None:
        """The node lost our function, or we talk to another node: open the
        job again, with its function, and send every chunk not complete."""
        out = [self.opener(True)]
        for number, chunk in self.chunks.items():
            if chunk.missing and chunk.frames:
                out.append(encode(AddChunk(self.job, number, chunk.count), chunk.frames))
        self.parts.clear()
        self.link_epoch = self.send(*out)

    # -- receiving (the link's thread puts, the caller's thread takes) ----------

    def deliver(self, msg: Message | Moved | Reconnecting, payload: list[Any]) -> None:
        self.inbox.put((msg, payload))

    def _wait(self) -> None:
        remaining = None
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TaskTimeout(f"map: results did not arrive within timeout={self.timeout}s")
        try:
            msg, payload = self.inbox.get(timeout=remaining)
        except queue.Empty:
            raise TaskTimeout(
                f"map: results did not arrive within timeout={self.timeout}s"
            ) from None
        self._absorb(msg, payload)
        while True:  # take whatever else is already here
            try:
                msg, payload = self.inbox.get_nowait()
            except queue.Empty:
                break
            self._absorb(msg, payload)
        # Chunks that finished free room even while an earlier one holds up
        # the ordered output: keep the workers busy.
        self.fill_window()

    def _absorb(self, msg: Message | Moved | Reconnecting, payload: list[Any]) -> None:
        if isinstance(msg, (Result, ItemsFailed)):
            try:
                self._absorb_range(msg, payload)
            except RemoteProtocolError as exc:  # the node is not to be believed: fail the map
                self.refusal = exc
        elif isinstance(msg, Moved):
            if msg.epoch != self.link_epoch:  # else opened there already
                self.resend_all()
        elif isinstance(msg, Reconnecting):
            if self.progress:
                self.progress.note(f"reconnecting: {msg.reason}")
        elif isinstance(msg, JobRefused):
            if msg.kind != UNKNOWN_BLOB:
                self.refusal = error_type(msg.kind)(msg.text)
            elif self.resent:
                self.refusal = lacks_function_again()
            else:
                self.resent = True
                self.resend_all()

    def _absorb_range(self, msg: Result | ItemsFailed, payload: list[Any]) -> None:
        number = msg.chunk
        if not -self.sent_alone <= number < self.sent:
            raise RemoteProtocolError(
                f"the node sent a {type(msg).TYPE.decode()} for chunk {number}, which was never sent"
            )
        if number < 0:  # an item sent again alone
            check_range(msg, 1)
            number, start = self.parts.pop(number, (-1, 0))
            stop = start + 1
            chunk = self.chunks.get(number)
        else:
            chunk = self.chunks.get(number)
            if chunk is not None:
                check_range(msg, chunk.count)
            start, stop = msg.start, msg.stop
        if chunk is None:
            return  # delivered already: what came twice is ignored
        if isinstance(msg, Result):
            self.sizer.learn(stop - start, msg.elapsed)
            self._take_results(number, chunk, start, stop, payload, msg.failures)
        elif msg.kind == SERIALIZATION and stop - start > 1:
            self._send_alone(number, chunk, start, stop)
        else:
            error = error_type(msg.kind)
            failed = [_Failed(error, msg.text)] * (stop - start)
            self._fill(chunk, start, failed, failures=len(failed))

    def _take_results(
        self, number: int, chunk: ChunkSlots, start: int, stop: int, payload: list[Any],
        failures: int,
    ) -> None:
        what = f"the result of item {chunk.first + start}"
        try:
            values = load_values(payload, stop - start, what if stop - start == 1 else "results")
        except SerializationError as exc:
            if stop - start > 1:
                self._send_alone(number, chunk, start, stop)
                return
            values = [TaskError(None, "", "the caller", str(exc))]
            failures = 1
        self._fill(chunk, start, values, failures)

    def _fill(self, chunk: ChunkSlots, start: int, values: list[Any], failures: int) -> None:
        """Put values in their slots, each slot filled once whatever the node sent."""
        stop = start + len(values)
        chunk.failed = chunk.failed or failures > 0
        if chunk.filled.find(1, start, stop) < 0:  # the usual case: all new, at C speed
            chunk.values[start:stop] = values
            chunk.filled[start:stop] = b"\x01" * len(values)
            chunk.missing -= len(values)
        else:
            for offset, value in enumerate(values):
                i = start + offset
                if not chunk.filled[i]:
                    chunk.filled[i] = 1
                    chunk.values[i] = value
                    chunk.missing -= 1
        if not chunk.missing:  # nothing will be sent again: let the arguments go
            chunk.items, chunk.frames = [], []

    # -- the caller's iterator -------------------------------------------------

    def results(self) -> MapResults:
        """The caller's iterator over the results."""
        return MapResults(self._chunks())

    def _chunks(self) -> Generator[Iterable[Any], None, None]:
        """Each ready chunk's values, as an iterable for MapResults to chain."""
        try:
            while True:
                ready = self._ready_chunk()
                if ready is None:
                    if self.exhausted and not self.chunks:
                        self.send(encode(CloseJob(self.job)))
                        self.finished = True
                        return
                    if self.refusal is not None:
                        raise self.refusal
                    self._wait()
                    continue
                values, failed = ready.values, ready.failed
                del ready
                if self.progress:
                    self.progress.advance(len(values))
                self.fill_window()
                # Each value leaves the list as it is yielded: the caller
                # alone holds what it was given (as Executor.map promises).
                values.reverse()
                if not failed:
                    yield map(values.pop, itertools.repeat(-1, len(values)))
                else:  # raised here, the error ends the iteration as a generator's does
                    while values:
                        yield (_raise_failed(values.pop()),)
        finally:
            if self.progress:
                self.progress.close()
            if not self.finished:
                self.send(encode(CancelJob(self.job)))
            self.forget(self.job)

    def _ready_chunk(self) -> ChunkSlots | None:
        if self.ordered:
            chunk = self.chunks.get(self.next_out)
            if chunk is None or chunk.missing:
                return None
            del self.chunks[self.next_out]
            self.next_out += 1
            return chunk
        for number, chunk in self.chunks.items():
            if not chunk.missing:
                del self.chunks[number]
                return chunk
        return None


class MapResults:
    """The iterator `map` returns.

    A generator would cost a frame resumption per item, most of a trivial
    task's time in the caller; here the stream's generator runs once per
    chunk and the items come out of C iterators: `for` and `list()` iterate
    the chain that `__iter__` hands them. `next()` and `close()` work as on
    a generator.
    """

    __slots__ = ("_chunks", "_values")

    def __init__(self, chunks: Generator[Iterable[Any], None, None]) -> None:
        self._chunks = chunks
        self._values = itertools.chain.from_iterable(chunks)

    def __iter__(self) -> Iterator[Any]:
        return self._values

    def __next__(self) -> Any:
        return next(self._values)

    def close(self) -> None:
        """Stop the map: what is still running is cancelled."""
        self._chunks.close()


class _Failed:
    """A slot that hived (not the task) failed: raised as a fresh exception each time."""

    __slots__ = ("error", "text")

    def __init__(self, error: type[HiveError], text: str) -> None:
        self.error, self.text = error, text


def _raise_failed(value: Any) -> Any:
    if type(value) is _Failed:
        raise value.error(value.text)
    return raise_for(value)


def _length_hint(iterables: tuple[Iterable[Any], ...]) -> int | None:
    hints = [operator.length_hint(it, -1) for it in iterables]
    if any(h < 0 for h in hints) or not hints:
        return None
    return min(hints) or None
