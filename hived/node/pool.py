"""The local pool: long-lived worker processes and the slots they fill.

Theory of operation
-------------------
The pool starts one worker process per CPU slot and one per GPU (with
`CUDA_VISIBLE_DEVICES` set to that device), each a fresh interpreter running
`hived.node.worker`, linked to the pool by a socketpair of its own
(hived.node.workerlink). A worker is *idle* or runs exactly one assignment; whenever a worker becomes idle the
pool asks its source (the node) for an assignment that fits, so work is
pulled, never pushed. A `Launcher` starts the processes; the embedded hive
has it start them before the node exists, and the pool adopts them.

    source.assign(fits) ──RUN──▶ worker ──DONE/FAIL──▶ sink.on_*
                                   │ └─fd 1/2, records──▶ taskoutput ──▶ sink.on_output
                 pidfd readable ───┘──▶ black box ──▶ sink.on_lost(crashed_at)

A worker's death is noticed at once through its pidfd (Linux), not by a
timeout; its black box says which item it was running. The pool replaces
dead workers, and recycles workers after `max_tasks_per_worker` items or
when their resident memory passes `memory_limit`.

What a worker writes to its fds 1 and 2, and the `logging` records it
emits, belong to the task it runs at that moment (see hived.node.taskoutput),
each on a pipe of its own. A worker writes to its pipes before it sends
DONE (or dies), so the pool reads its pipes dry before it acts on either:
a task's last lines reach its caller before its results do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import hived
from hived.errors import InternalError
from hived.node import pooldir
from hived.node.lifecycle import (
    IDLE,
    RETIRING,
    STARTING,
    WorkerEvent,
    WorkerState,
    advance,
    pool_problems,
    worker_problems,
)
from hived.node.scheduling import Assignment, Needs
from hived.node.taskoutput import RECORDS, Lines, Piece, Records
from hived.node.worker import (
    AUTHKEY_VARIABLE,
    BLACK_BOX,
    Done,
    Exit,
    Fail,
    Ready,
    Run,
)
from hived.node.workerlink import Link
from hived.protocol.fields import BETWEEN, SOMEWHERE
from hived.protocol.wire import decode, encode

log = logging.getLogger(__name__)

WORKER_MAIN = "from hived.node.worker import main; main()"
PIPE_READ = 64 * 1024  # bytes read from a worker's stdout or stderr at a time
# How long `stop` waits for the workers to exit, and then for those it killed.
EXIT_WAIT = 5.0
# The most `stop` takes: what a daemon's stop needs past its drain_timeout.
STOP_MARGIN = 2 * EXIT_WAIT

# Signals, what they most likely mean for a Python task, for crash messages.
LIKELY_CAUSE = {
    signal.SIGKILL: "killed from outside: out of memory (the kernel's OOM killer) or kill -9",
    signal.SIGSEGV: "segmentation fault in native code (a C extension, ctypes, or a stack overflow)",
    signal.SIGBUS: "bus error in native code (a truncated memory-mapped file?)",
    signal.SIGABRT: "aborted by native code (a failed C assertion or abort())",
    signal.SIGFPE: "arithmetic fault in native code",
    signal.SIGTERM: "terminated from outside (SIGTERM)",
    signal.SIGILL: "illegal instruction in native code (a binary built for another CPU?)",
}


def output_pipes(proc: subprocess.Popen[bytes]) -> tuple[IO[bytes], IO[bytes]]:
    """A worker's stdout and stderr pipes (every worker is started with both)."""
    if proc.stdout is None or proc.stderr is None:
        raise InternalError(f"worker pid {proc.pid} was started without its output pipes")
    return proc.stdout, proc.stderr


def _fits_cpus(budget: int, needs: Needs) -> bool:
    """What a CPU worker may take with `budget` CPU slots free."""
    return needs.gpus == 0 and needs.cpus <= budget


def _fits_gpu(needs: Needs) -> bool:
    """What a GPU worker may take: a task of one GPU."""
    return needs.gpus == 1


class Source(Protocol):
    def assign(self, fits: Callable[[Needs], bool]) -> Assignment | None: ...


class Sink(Protocol):
    def on_done(
        self, aid: int, start: int, stop: int, elapsed: float, failures: int, frames: list[Any]
    ) -> None: ...
    def on_fail(self, aid: int, message: str) -> None: ...
    def on_lost(self, aid: int, crashed_at: int | None, why: str) -> None: ...
    def on_output(self, job: int, piece: Piece, pid: int) -> None: ...


@dataclass(eq=False)
class WorkerProc:
    number: int
    device: str | None  # GPU id, None for a CPU worker
    proc: subprocess.Popen[bytes]
    box_path: str
    link: Link
    said_ready: bool = False
    running: Assignment | None = None
    blobs: set[bytes] = field(default_factory=set)
    items_done: int = 0
    state: WorkerState = STARTING  # moved only by `advance` (hived.node.lifecycle)
    kill_reason: str | None = None  # why the pool itself killed it
    routine: bool = False  # that kill was part of normal work (a stop, a cancel), not a fault
    pipes: dict[int, int] = field(default_factory=dict)  # read ends: fd 1, fd 2, RECORDS
    readers: dict[int, Lines | Records] = field(default_factory=dict)  # by the same keys

    @property
    def idle(self) -> bool:
        return self.state is IDLE

    @property
    def retiring(self) -> bool:
        return self.state is RETIRING

    def move(self, event: WorkerEvent) -> None:
        """Move by the lifecycle table, and check what it holds agrees (O(1))."""
        advance(self, event)
        problems = worker_problems(self)
        if problems:
            raise InternalError("; ".join(problems))


@dataclass(eq=False)
class Launched:
    """A worker process started, not yet watched by a pool."""

    number: int
    device: str | None
    proc: subprocess.Popen[bytes]
    box_path: str
    records: int  # the read end of its records pipe
    link: socket.socket  # the pool's end of its socketpair


class Launcher:
    """Starts a pool's worker processes: its directory, its workers' address.

    Apart from the Pool so that workers can start before their pool does:
    the embedded hive starts them first and imports and builds its node
    while they boot (`prelaunch`). What a worker sends before its pool
    exists waits in its socketpair."""

    def __init__(self, node_name: str, gpus: list[str], authkey: bytes | None) -> None:
        self.node_name, self.gpus, self.authkey = node_name, list(gpus), authkey
        self.dir = pooldir.make()  # and removes dead nodes' leftovers
        self._numbers = iter(range(1, 1 << 62))
        self.early: list[Launched] = []  # started by prelaunch, for the pool to adopt

    def prelaunch(self, cpus: int) -> None:
        """Start a pool's first workers now: one per CPU slot and one per GPU."""
        for device in [None] * cpus + self.gpus:
            self.early.append(self.launch(device))

    def abandon(self) -> None:
        """No pool will adopt the early workers: kill them and remove the directory."""
        for launched in self.early:
            launched.proc.kill()
            launched.proc.wait()
            for pipe in output_pipes(launched.proc):
                pipe.close()
            os.close(launched.records)
            launched.link.close()
        self.early.clear()
        pooldir.remove(self.dir)

    def launch(self, device: str | None) -> Launched:
        number = next(self._numbers)
        box_path = os.path.join(self.dir, f"worker-{number}.box")
        with open(box_path, "wb") as f:
            f.write(BLACK_BOX.pack(0, BETWEEN))
        env = dict(os.environ)
        # Run the very hived this node runs, installed or not.
        root = os.path.dirname(os.path.dirname(os.path.abspath(hived.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        if self.authkey is not None:  # the environment: readable by this user alone
            env[AUTHKEY_VARIABLE] = self.authkey.hex()
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        elif self.gpus:  # the GPUs belong to the GPU workers; CPU tasks must not contend
            env["CUDA_VISIBLE_DEVICES"] = ""
        where = f"{self.node_name}" + (f" gpu {device}" if device is not None else "")
        records, records_end = os.pipe()
        link, link_end = socket.socketpair()
        # `-c`, not `-m hived.node.worker`: run as __main__, the worker's classes
        # (TaskError in results) would pickle as `__main__.TaskError`.
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_MAIN, str(link_end.fileno()), str(number), box_path,
                 where, str(os.getpid()), str(records_end)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C at the caller's terminal is not the task's
                close_fds=True,
                pass_fds=(records_end, link_end.fileno()),
            )
        except BaseException:
            os.close(records)
            link.close()
            raise
        finally:
            # The worker's now; ours would keep them open after it is gone.
            os.close(records_end)
            link_end.close()
        return Launched(number, device, proc, box_path, records, link)


class Pool:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        node_name: str,
        cpus: int,
        gpus: list[str],
        source: Source,
        sink: Sink,
        blobs: Mapping[bytes, bytes],
        job_tag: Callable[[Any], int],
        max_tasks_per_worker: int = 0,
        memory_limit: int | None = None,
        authkey: bytes | None = None,
        launcher: Launcher | None = None,
    ) -> None:
        self.loop, self.node_name = loop, node_name
        self.cpus, self.gpus = cpus, list(gpus)
        self.source, self.sink, self.blobs = source, sink, blobs
        self.job_tag = job_tag
        self.max_tasks_per_worker, self.memory_limit = max_tasks_per_worker, memory_limit
        self.launcher = launcher or Launcher(node_name, gpus, authkey)
        self.dir = self.launcher.dir
        self.workers: dict[int, WorkerProc] = {}
        self.closing = False
        self.holding = False  # draining: running tasks finish, no new one starts
        self.on_idle: Callable[[], None] | None = None  # called when idle workers found no work
        self.items_done = 0
        self.worker_crashes = 0  # workers that died other than by the pool's own hand
        self._all_exited = asyncio.Event()
        self.ready = asyncio.Event()  # every worker started so far has said READY

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        early, self.launcher.early = self.launcher.early, []
        for launched in early:
            self._adopt(launched)
        for _ in range(self.cpus - sum(1 for w in early if w.device is None)):
            self._spawn(None)
        for device in self.gpus[sum(1 for w in early if w.device is not None):]:
            self._spawn(device)

    def _spawn(self, device: str | None) -> None:
        self._adopt(self.launcher.launch(device))

    def _adopt(self, launched: Launched) -> None:
        """Watch a started worker's pipes and exit on this pool's loop."""
        proc, records = launched.proc, launched.records
        worker = WorkerProc(launched.number, launched.device, proc, launched.box_path,
                            Link(self.loop, launched.link))
        worker.link.start(functools.partial(self._on_frames, worker),
                          functools.partial(self._on_broken_link, worker))
        self.workers[launched.number] = worker
        now = self.loop.time()
        stdout, stderr = output_pipes(proc)
        for stream, fd, reader in ((1, stdout.fileno(), Lines(1, now)),
                                   (2, stderr.fileno(), Lines(2, now)),
                                   (RECORDS, records, Records(now))):
            os.set_blocking(fd, False)
            worker.pipes[stream], worker.readers[stream] = fd, reader
            self.loop.add_reader(fd, self._read_pipe, worker, stream)
        pidfd = os.pidfd_open(proc.pid)
        self.loop.add_reader(pidfd, self._on_exit, worker, pidfd)

    def _on_exit(self, worker: WorkerProc, pidfd: int) -> None:
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        code = worker.proc.wait()
        self._drain(worker)  # its last words (a fatal error's message) are its task's
        self.workers.pop(worker.number, None)  # nothing more is assigned to it
        worker.link.receive(to_the_end=True)  # a DONE it sent before it died still counts
        worker.link.close()
        retiring = worker.retiring
        for fd in worker.pipes.values():
            self.loop.remove_reader(fd)
        for pipe in output_pipes(worker.proc):
            pipe.close()
        os.close(worker.pipes[RECORDS])
        worker.pipes.clear()
        crashed_at = self._read_box(worker)[1] if worker.running is not None else None
        try:  # only once read: the black box says which item killed the worker
            os.unlink(worker.box_path)
        except OSError:
            pass
        if not (worker.routine or retiring or self.closing):
            self.worker_crashes += 1
        if worker.running is not None:
            why = self._describe_death(worker, code, crashed_at)
            # A library keeps routine events below WARNING: a stop or a
            # cancel happens on every normal exit of a caller that left a map.
            log.log(logging.INFO if worker.routine else logging.WARNING, "%s", why)
            aid, worker.running = worker.running.id, None
            worker.move(WorkerEvent.EXITED)
            self.sink.on_lost(aid, crashed_at, why)
        else:
            worker.move(WorkerEvent.EXITED)
            if not retiring and not self.closing:
                log.warning("worker pid %d exited with code %s while idle", worker.proc.pid, code)
        if self.closing:
            if not self.workers:
                self._all_exited.set()
        elif not retiring:  # a retiring worker's successor is already up
            self._spawn(worker.device)
            self.kick()

    def _read_box(self, worker: WorkerProc) -> tuple[int, int | None]:
        """The item the dead worker was running: an index, SOMEWHERE in its
        range, or None when it was not running that range's items at all."""
        try:
            with open(worker.box_path, "rb") as f:
                aid, index = BLACK_BOX.unpack(f.read(BLACK_BOX.size))
        except (OSError, ValueError):
            return 0, None
        running = worker.running
        if running is None or aid != running.id or index == BETWEEN:
            return aid, None
        if index == SOMEWHERE and running.stop - running.start == 1:
            return aid, running.start  # a range of one item: that item, no search needed
        return aid, index

    def _describe_death(self, worker: WorkerProc, code: int, index: int | None) -> str:
        running = worker.running
        if index == SOMEWHERE and running is not None:
            item = f" while running items {running.start}-{running.stop - 1} of a chunk"
        else:
            item = f" while running item {index} of a chunk" if index is not None else ""
        head = f"worker pid {worker.proc.pid} on {self.node_name}"
        if worker.kill_reason:
            return f"{head} was stopped{item}: {worker.kill_reason}"
        if code < 0:
            sig = signal.Signals(-code)
            cause = LIKELY_CAUSE.get(sig, "killed by a signal")
            return f"{head} died from {sig.name}({code}){item}: {cause}"
        return (
            f"{head} exited with code {code}{item}: the task ended the process "
            "(os._exit, or sys.exit from native code)"
        )

    async def stop(self, timeout: float = EXIT_WAIT) -> None:
        """Ask every worker to exit, wait up to `timeout`, then kill what is left."""
        self.closing = True
        if not self.workers:
            self._all_exited.set()
        for worker in list(self.workers.values()):
            if worker.said_ready and worker.running is None:
                worker.link.send(encode(Exit()))
            else:  # still starting, or busy with a task: it cannot hear us
                self._kill(worker, "the pool is stopping", routine=True)  # not "out of memory"
        # Exits arrive through the pidfd callbacks, which set the event.
        try:
            await asyncio.wait_for(self._all_exited.wait(), timeout)
        except asyncio.TimeoutError:
            for worker in list(self.workers.values()):
                self._kill(worker, "the pool is stopping", routine=True)
            await asyncio.wait_for(self._all_exited.wait(), EXIT_WAIT)
        pooldir.remove(self.dir)

    def validate(self) -> None:
        """Check the pool's invariants (hived.node.lifecycle.pool_problems);
        raise InternalError naming each that does not hold."""
        problems = pool_problems(self.workers, self.cpus, len(self.gpus), self.closing)
        if problems:
            raise InternalError(f"pool of {self.node_name} broke invariants: {'; '.join(problems)}")

    # -- slots -----------------------------------------------------------------

    @property
    def cpu_slots_busy(self) -> int:
        return sum(
            w.running.needs.cpus for w in self.workers.values() if w.running and w.device is None
        )

    @property
    def gpu_slots_busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.running and w.device is not None)

    @property
    def slots_busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.running is not None)

    @property
    def slots_total(self) -> int:
        return self.cpus + len(self.gpus)

    def kick(self) -> None:
        """Fill every idle worker with an assignment that fits it."""
        if self.closing or self.holding:
            return
        free_cpus = self.cpus - self.cpu_slots_busy
        starved = False  # an idle worker found nothing: the source may look elsewhere
        for worker in list(self.workers.values()):
            if not worker.idle:
                continue
            if worker.device is None:
                if free_cpus <= 0:
                    continue
                fits: Callable[[Needs], bool] = functools.partial(_fits_cpus, free_cpus)
            else:
                fits = _fits_gpu
            assignment = self.source.assign(fits)
            if assignment is None:
                starved = True
                continue
            self._run(worker, assignment)
            if worker.device is None:
                free_cpus -= assignment.needs.cpus
        if starved and self.on_idle is not None:
            self.on_idle()

    def free_slots(self) -> tuple[int, int]:
        """Free CPU slots and idle GPU workers: what this node can take on now."""
        cpus = max(self.cpus - self.cpu_slots_busy, 0)
        gpus = sum(1 for w in self.workers.values() if w.device is not None and w.idle)
        return cpus, gpus

    def _run(self, worker: WorkerProc, a: Assignment) -> None:
        worker.running = a
        worker.move(WorkerEvent.ASSIGNED)
        has_blob = a.fn not in worker.blobs
        payload = [self.blobs[a.fn], *a.frames] if has_blob else a.frames
        run = Run(a.id, a.fn, has_blob, a.start, a.stop, a.precise, a.needs.cpus)
        if worker.link.send(encode(run, payload)):
            worker.blobs.add(a.fn)
        # else: the worker is gone; its pidfd callback hands the assignment back

    def abort(self, aids: set[int], reason: str) -> None:
        """Stop the workers running these assignments (their job was cancelled)."""
        for worker in self.workers.values():
            if worker.running is not None and worker.running.id in aids:
                self._kill(worker, reason, routine=True)

    def check_memory(self) -> None:
        """Replace workers whose resident memory passed the limit (runs each second)."""
        if not self.memory_limit:
            return
        import psutil

        for worker in list(self.workers.values()):
            if worker.retiring:  # on its way out, its successor already started
                continue
            try:
                rss = psutil.Process(worker.proc.pid).memory_info().rss
            except psutil.Error:
                continue
            if rss > self.memory_limit:
                if worker.running is not None:
                    reason = (
                        f"its resident memory {rss >> 20} MiB passed memory_limit "
                        f"{self.memory_limit >> 20} MiB"
                    )
                    self._kill(worker, reason, routine=False)
                else:
                    self._retire(worker)

    def _kill(self, worker: WorkerProc, reason: str, *, routine: bool) -> None:
        """Kill a worker on purpose; `reason` is what its task's error says."""
        worker.kill_reason, worker.routine = reason, routine
        worker.proc.kill()

    def _retire(self, worker: WorkerProc) -> None:
        """Let an idle worker exit and start its successor now."""
        worker.move(WorkerEvent.RETIRE)
        worker.link.send(encode(Exit()))
        self._spawn(worker.device)

    # -- messages from workers -------------------------------------------------

    def _on_frames(self, worker: WorkerProc, frames: list[Any]) -> None:
        try:
            msg, payload = decode(frames)
        except Exception as exc:
            log.warning("dropping a malformed message from worker pid %d: %s", worker.proc.pid, exc)
            return
        if isinstance(msg, Ready):
            if not worker.said_ready and (msg.worker, msg.pid) == (worker.number, worker.proc.pid):
                worker.said_ready = True
                worker.move(WorkerEvent.READY)
                if all(w.said_ready for w in self.workers.values()):
                    self.ready.set()
                self.kick()
            return
        if not worker.said_ready:
            return
        if isinstance(msg, Done):
            self._drain(worker)
            self._finished(worker, msg.assignment)
            worker.items_done += msg.stop - msg.start
            self.items_done += msg.stop - msg.start
            self._maybe_recycle(worker, msg.rss)
            self.sink.on_done(msg.assignment, msg.start, msg.stop, msg.elapsed, msg.failures, payload)
            self.kick()
        elif isinstance(msg, Fail):
            self._drain(worker)
            self._finished(worker, msg.assignment)
            self.sink.on_fail(msg.assignment, msg.message)
            self.kick()

    def _on_broken_link(self, worker: WorkerProc, why: str) -> None:
        """What came from the worker is not messages (its task wrote to the
        link's fd?): nothing more from it can be trusted."""
        log.warning("worker pid %d broke its link to the pool: %s", worker.proc.pid, why)
        self._kill(worker, f"its link to the pool broke: {why}", routine=False)

    # -- what workers write to fds 1 and 2 -------------------------------------

    def _read_pipe(self, worker: WorkerProc, stream: int) -> None:
        fd = worker.pipes[stream]
        try:
            data = os.read(fd, PIPE_READ)
        except BlockingIOError:
            return
        if not data:  # every writer closed it: the worker and its children are gone
            self.loop.remove_reader(fd)
            return
        self._emit(worker, worker.readers[stream].feed(data, self.loop.time()))

    def _drain(self, worker: WorkerProc) -> None:
        """Read what the worker wrote before it finished, and pass on what is held."""
        for stream, fd in worker.pipes.items():
            reader, now = worker.readers[stream], self.loop.time()
            while True:
                try:
                    data = os.read(fd, PIPE_READ)
                except BlockingIOError:
                    break
                if not data:
                    break
                self._emit(worker, reader.feed(data, now))
            self._emit(worker, reader.flush())

    def _emit(self, worker: WorkerProc, pieces: list[Piece]) -> None:
        for piece in pieces:
            if worker.running is not None:
                self.sink.on_output(self.job_tag(worker.running.job), piece, worker.proc.pid)
            elif not worker.said_ready:  # before READY: the worker's own start failing, not a task
                log.warning("worker pid %d: %s", worker.proc.pid, piece.text.rstrip("\n"))
            else:
                # A past task's child writing on: the user's, so not for our log.
                log.debug("dropped %d characters a worker pid %d child wrote between tasks",
                          len(piece.text), worker.proc.pid)

    def _finished(self, worker: WorkerProc, aid: int) -> None:
        if worker.running is not None and worker.running.id == aid:
            worker.running = None
            worker.move(WorkerEvent.FINISHED)

    def _maybe_recycle(self, worker: WorkerProc, rss: int) -> None:
        worn = self.max_tasks_per_worker and worker.items_done >= self.max_tasks_per_worker
        heavy = self.memory_limit and rss > self.memory_limit
        if worn or heavy:
            self._retire(worker)
