"""A worker process: runs tasks the node sends it, one range at a time.

Started by the node's pool as `python -c 'from hived.node.worker import main; main()'` (a fresh interpreter,
never a fork of the event loop) with one end of a socketpair
(hived.node.workerlink), it loops: receive RUN, run each item, send DONE,
and exits when the pool closes its end. It imports as little as it can, so
it starts fast; the user's function and data are unpickled only here.

Before each item the worker writes (assignment, item) into a small shared
file, its *black box*. If the process dies in the middle of an item
(segfault, OOM kill, os._exit), the node reads the black box to learn which
item killed it: that item alone is charged a try, and its neighbours run
again untouched.

The worker's fds 1 and 2 are pipes the pool reads (hived.node.taskoutput): what
a task writes there, from Python or not, reaches the caller. sys.stdout is
made line-buffered, as on a terminal, so printed lines travel as they are
printed, and both streams are flushed before DONE. `logging` records go to
the pool on a third pipe, by a handler on the root logger.

Native thread pools (OpenMP, BLAS, numexpr, numba) get as many threads as
the task has CPUs, through the variables in THREAD_LIMITS, as joblib's
workers do: without them every worker of a node starts one thread per CPU
and the node runs workers x CPUs threads. A variable the worker inherited
(set for the embedded caller, or for the daemon) is the user's choice and
is left alone. Libraries read these when they load, so they are set at
start (one CPU) and again before a range whose task asks for other CPUs.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from typing import Any

from hived.node.taskoutput import RecordPipe
from hived.node.workerlink import FrameReader, recv_blocking, send_blocking
from hived.protocol import serialization
from hived.protocol.fields import BETWEEN, SOMEWHERE
from hived.protocol.wire import Message, decode, encode, message

BLACK_BOX = struct.Struct("<qq")  # assignment id, item index (or BETWEEN, SOMEWHERE)
# A chunk is (nargs, items): nargs 1 means each item is the one argument, n > 1
# a tuple of n arguments, KEYWORDS an (args, kwargs) pair as `submit` makes.
KEYWORDS = -1
# Set by an embedded node's pool: the caller's multiprocessing authkey (hex).
AUTHKEY_VARIABLE = "HIVED_AUTHKEY"
# The thread-count variables joblib's workers get (its MAX_NUM_THREADS_VARS).
THREAD_LIMITS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


@message(b"W.READY")
class Ready(Message):
    worker: int
    pid: int


@message(b"W.RUN")
class Run(Message):
    assignment: int
    fn: bytes  # hash of the function blob
    has_blob: bool  # the blob is the first payload frame (the worker lacks it)
    start: int
    stop: int
    precise: bool  # record each item in the black box (this range crashed before)
    cpus: int  # the task's CPUs: its native thread pools' size


@message(b"W.DONE")
class Done(Message):
    assignment: int
    start: int
    stop: int
    elapsed: float  # seconds spent running the items
    rss: int  # resident memory after the range, bytes
    failures: int  # how many items raised (the caller skips a scan when none did)


@message(b"W.FAIL")
class Fail(Message):
    """The range could not even start: the function or its arguments did not unpickle."""

    assignment: int
    message: str


@message(b"W.EXIT")
class Exit(Message):
    pass


class TaskError:
    """Stands in a result list for an item whose function raised.

    Holds the exception and the remote traceback text; the client re-raises
    it at the item's place. Where the exception (or a result) could not be
    pickled, `exc` is None and `problem` says what the caller gets instead:
    a SerializationError.
    """

    __slots__ = ("exc", "text", "where", "problem")

    def __init__(self, exc: BaseException | None, text: str, where: str, problem: str = ""):
        self.exc, self.text, self.where, self.problem = exc, text, where, problem

    def __reduce__(self):
        return (TaskError, (self.exc, self.text, self.where, self.problem))


class _Unloadable(Exception):
    """Stands in `Worker.functions` for a function blob that did not unpickle."""


class ThreadLimits:
    """Sets THREAD_LIMITS to a task's CPUs, except those the worker inherited."""

    def __init__(self, environ: Any) -> None:
        self.environ = environ
        self.ours = [name for name in THREAD_LIMITS if name not in environ]
        self.cpus = 0

    def apply(self, cpus: int) -> None:
        if cpus != self.cpus:  # the common case, every range alike: nothing to do
            self.cpus = cpus
            for name in self.ours:
                self.environ[name] = str(cpus)


class Worker:
    def __init__(self, link: int, number: int, black_box: str, where: str):
        os.set_inheritable(link, False)  # the task's own children do not hold the pool's link
        self.sock = socket.socket(fileno=link)
        self.reader, self.ready = FrameReader(), deque[list[Any]]()
        self.number, self.where = number, where
        self.functions: dict[bytes, Any] = {}
        fd = os.open(black_box, os.O_RDWR)
        self.box = mmap.mmap(fd, BLACK_BOX.size)
        os.close(fd)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.statm = os.open("/proc/self/statm", os.O_RDONLY)
        self.threads = ThreadLimits(os.environ)
        self.threads.apply(1)

    def serve(self) -> None:
        self.send(encode(Ready(self.number, os.getpid())))
        if isinstance(sys.stdout, io.TextIOWrapper):  # a pipe: block-buffered otherwise
            sys.stdout.reconfigure(line_buffering=True)
        while True:
            frames = recv_blocking(self.sock, self.reader, self.ready)
            if frames is None:
                return  # the pool closed its end: the node is gone or done with us
            msg, payload = decode(frames)
            if isinstance(msg, Exit):
                return
            if isinstance(msg, Run):
                self.run(msg, payload)

    def run(self, msg: Run, payload: list[Any]) -> None:
        where = f"{self.where} pid {os.getpid()}"
        BLACK_BOX.pack_into(self.box, 0, msg.assignment, SOMEWHERE)
        self.threads.apply(msg.cpus)
        try:
            if msg.has_blob:
                blob, payload = payload[0], payload[1:]
                try:
                    fn = serialization.loads([blob], f"the function (on {where})")
                except Exception as exc:
                    # Kept: the node sends a worker each blob once, so later
                    # ranges of this job must fail with the same reason.
                    fn = _Unloadable(str(exc))
                self.functions[msg.fn] = fn
            fn = self.functions[msg.fn]
            if type(fn) is _Unloadable:
                raise _Unloadable(str(fn))  # a fresh one: no traceback piling up
            nargs, items = serialization.loads(payload, f"the arguments (on {where})")
        except Exception as exc:
            self.send(encode(Fail(msg.assignment, str(exc))))
            return
        call = _CALLS[nargs] if nargs in _CALLS else _CALLS[None]
        results: list[Any] = []
        began = time.perf_counter()
        if msg.precise:
            failures = self._run_recording(msg, fn, call, items, results, where)
        else:
            failures = _run_fast(fn, call, items[msg.start : msg.stop], results, where)
        elapsed = time.perf_counter() - began
        sys.stdout.flush()
        sys.stderr.flush()
        frames, spoiled = _pickle_results(results, where)
        failures += spoiled
        done = Done(msg.assignment, msg.start, msg.stop, elapsed, self._rss(), failures)
        self.send(encode(done, frames))
        BLACK_BOX.pack_into(self.box, 0, msg.assignment, BETWEEN)

    def _run_recording(self, msg: Run, fn: Any, call: Any, items: list[Any],
                       results: list[Any], where: str) -> int:
        """Run item by item, each recorded in the black box before it starts."""
        box, failures = self.box, 0
        for index in range(msg.start, msg.stop):
            BLACK_BOX.pack_into(box, 0, msg.assignment, index)
            try:
                results.append(call(fn, items[index]))
            except BaseException as exc:  # a task's own error, KeyboardInterrupt included
                results.append(_task_error(exc, where))
                failures += 1
        BLACK_BOX.pack_into(box, 0, msg.assignment, SOMEWHERE)
        return failures

    def send(self, frames: list[Any]) -> None:
        try:
            send_blocking(self.sock, frames)
        except OSError:  # the pool's end is closed: the node is gone
            os._exit(0)

    def _rss(self) -> int:
        return int(os.pread(self.statm, 128, 0).split()[1]) * self.page


def _run_fast(fn: Any, call: Any, items: list[Any], results: list[Any], where: str) -> int:
    """Run items without recording each one: the common case, several times
    cheaper per item. A crash here is placed on the range, not an item, and
    the range then runs again recording each item."""
    failures = 0
    todo = iter(items)
    append = results.append
    while True:
        try:
            if call is _one:
                for item in todo:
                    append(fn(item))
            else:
                for item in todo:
                    append(call(fn, item))
            return failures
        except BaseException as exc:  # a task's own error: record it, go on with the next
            append(_task_error(exc, where))
            failures += 1


def _one(fn: Any, item: Any) -> Any:
    return fn(item)


_CALLS = {
    1: _one,
    KEYWORDS: lambda fn, item: fn(*item[0], **item[1]),
    None: lambda fn, item: fn(*item),
}


def _task_error(exc: BaseException, where: str) -> TaskError:
    return TaskError(exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), where)


def _pickle_results(results: list[Any], where: str) -> tuple[list[Any], int]:
    """Frames for the results, and how many results became errors because
    they would not pickle (each such item fails alone)."""
    try:
        return serialization.dumps_result(results, "results"), 0
    except BaseException:  # sys.exit in a __reduce__, say: found again item by item below
        pass
    spoiled = 0
    for i, value in enumerate(results):
        try:
            serialization.dumps_result(value, "a result")
        except Exception as exc:
            inner = exc.__cause__ or exc  # what the pickler raised, not our wrapper
            why = f"(on {where}): {type(inner).__name__}: {inner}"
            if isinstance(value, TaskError):  # keep the error's text, drop the object
                raised = f"{type(value.exc).__qualname__}: {value.exc}"
                problem = f"the task raised {raised}, which could not be pickled {why}"
                results[i] = TaskError(None, value.text, where, problem)
            else:
                spoiled += 1
                # No index: the worker knows positions in a chunk, not in
                # the caller's input; the error is raised at the item's place.
                problem = f"the task's result could not be pickled {why}"
                results[i] = TaskError(None, "", where, problem)
        except BaseException as exc:
            # What ProcessPoolExecutor does too: an exception other than an
            # Exception (SystemExit) raised while pickling the result is the
            # task's outcome, rather than the end of the worker.
            spoiled += 1
            results[i] = _task_error(exc, where)
    return serialization.dumps_result(results, "results"), spoiled


def _set_up_process(parent: int) -> None:
    """Never outlive the node: the kernel kills us when it dies (Linux), and
    if it died before we got here, we go at once. `serve` also ends when the
    pool's end of the link closes.

    And C's stdout, block-buffered on a pipe, is made line-buffered as on a
    terminal, so a C library's printf reaches the caller line by line
    rather than when the worker exits."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t]
        libc.setvbuf(ctypes.c_void_p.in_dll(libc, "stdout"), None, 1, 0)  # 1: _IOLBF
    except (OSError, AttributeError, ValueError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _forward_logging(fd: int) -> None:
    """A task's `logging` records go to the pool's record pipe, not the
    worker's stderr; the task's own children do not inherit the pipe."""
    os.set_inheritable(fd, False)
    logging.getLogger().addHandler(RecordPipe(fd))


def _take_authkey() -> None:
    """Adopt the caller's multiprocessing authkey, if the pool passed one, and
    keep it out of the environment the tasks' own children inherit."""
    key = os.environ.pop(AUTHKEY_VARIABLE, None)
    if key is not None:
        import multiprocessing.process

        multiprocessing.process.current_process().authkey = bytes.fromhex(key)


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    link, number, black_box, where, parent = int(args[0]), int(args[1]), args[2], args[3], int(args[4])
    _set_up_process(parent)
    _forward_logging(int(args[5]))
    _take_authkey()
    Worker(link, number, black_box, where).serve()


if __name__ == "__main__":
    main()
