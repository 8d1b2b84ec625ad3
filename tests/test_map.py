"""`Hive.map` as a user drives it, on an embedded hive (and one real daemon).

Ordering, chunking, the bounded read-ahead of an endless input, flat memory,
progress and printed output, timeouts, Ctrl-C and break (each cancels the
job on the node), argument checks, large arrays, and worker recycling.

The embedded node is reached as `hive.link.node` to see its owner's book of
jobs; chunks sent are counted by wrapping `hive.link.send`. Nothing here
asserts on timing beyond generous deadlines.
"""

from __future__ import annotations

import collections
import fcntl
import gc
import itertools
import logging
import os
import pty
import re
import signal
import struct
import sys
import termios
import threading
import time
import tracemalloc
import weakref
from collections.abc import Iterator

import psutil
import pytest
from tasks import nap, nap_then

import hived
import hived.caller.progress
from hived.caller.mapping import (
    LONG_TASK_SECONDS,
    MAX_UNSIZED_CHUNK,
    TARGET_CHUNK_SECONDS,
    WINDOW_BUFFER,
    ChunkSizer,
    heuristic_chunksize,
)
from hived.errors import InternalError
from hived.protocol.control import AddChunk
from hived.protocol.wire import decode
from hived.testing.embedded import on_node_loop, pool_valid
from hived.testing.waiting import wait_for

# -- task functions ---------------------------------------------------------------------


def square(x):
    return x * x


def shout(x):
    print(f"line {x}", file=sys.stderr)
    return x




def kilobyte(i):
    return bytes(1024)


def chatty(x):
    print(f"hello {x}")
    print(f"complaint {x}", file=sys.stderr)
    return x


def pid_of(_):
    return os.getpid()


def nap_then_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def reverse(a):
    return a[::-1].copy()


# -- helpers ----------------------------------------------------------------------------


def count_chunks(hive, monkeypatch) -> list[int]:
    """The item count of every chunk the client sends from now on."""
    counts: list[int] = []
    real = hive.link.send

    def send(*messages):
        for frames in messages:
            msg, _ = decode(frames)
            if isinstance(msg, AddChunk):
                counts.append(msg.count)
        real(*messages)

    monkeypatch.setattr(hive.link, "send", send)
    return counts


def jobs_of(hive) -> dict:
    return hive.link.node.owner.jobs


def wait_no_jobs(hive) -> None:
    wait_for(lambda: not jobs_of(hive), 30, what="the node to drop the job")


def worker_pids() -> set[int]:
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "hived.node.worker" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def wait_workers_ready(hive) -> None:
    pool = hive.link.node.pool
    wait_for(
        lambda: len(pool.workers) == hive.slots
        and all(w.said_ready for w in list(pool.workers.values())),
        30,
        what="every worker to be ready",
    )
    wait_for(lambda: pool_valid(hive), 30, what="the pool's invariants", ignore=InternalError)


# -- order and chunks -------------------------------------------------------------------


def test_unordered_map_yields_every_result_in_completion_order(hive):
    wait_workers_ready(hive)
    items = [(2.0, "slow")] + [(0.0, i) for i in range(1, 8)]
    got = list(hive.map(nap_then, items, ordered=False))
    assert collections.Counter(got) == collections.Counter(["slow", *range(1, 8)])
    assert got[-1] == "slow"


def test_explicit_chunksize_is_used(hive, monkeypatch):
    counts = count_chunks(hive, monkeypatch)
    assert list(hive.map(square, range(100), chunksize=7)) == [x * x for x in range(100)]
    assert counts == [7] * 14 + [2]


def test_chunk_sizer():
    # A fixed size is a fixed size, and no probing.
    sizer = ChunkSizer(7, slots=2, total=100)
    assert sizer.next_size() == 7 and not sizer.probing
    # Before any result: one-item probes.
    sizer = ChunkSizer(None, slots=2, total=20_000)
    assert sizer.probing and sizer.next_size() == 1
    # Tiny tasks: straight to multiprocessing's heuristic, four chunks per slot.
    sizer.learn(1, 2e-6)
    assert not sizer.probing
    assert sizer.next_size() == 2500 == heuristic_chunksize(20_000, 2)
    # ... rounded up as multiprocessing rounds it.
    sizer = ChunkSizer(None, slots=2, total=20_001)
    sizer.learn(2, 0.0)
    assert sizer.next_size() == 2501 == heuristic_chunksize(20_001, 2)
    # Tasks of a tenth of TARGET_CHUNK_SECONDS (a bit more) each: ten to a chunk.
    sizer = ChunkSizer(None, slots=2, total=20_000)
    sizer.learn(4, 4 * TARGET_CHUNK_SECONDS / 10.5)
    assert sizer.next_size() == 10
    # Long tasks are never batched, from LONG_TASK_SECONDS on.
    for seconds in (LONG_TASK_SECONDS, 0.5, 60.0):
        sizer = ChunkSizer(None, slots=2, total=20_000)
        sizer.learn(3, 3 * seconds)
        assert sizer.next_size() == 1
    # One slow item among fast ones: the mean of what was measured.
    sizer = ChunkSizer(None, slots=2, total=20_000)
    sizer.learn(1, 1.0)
    sizer.learn(2500, 0.001)
    assert sizer.next_size() == int(TARGET_CHUNK_SECONDS / (1.001 / 2501))
    # Unknown length (a generator): a fixed cap, so what is read ahead stays bounded.
    sizer = ChunkSizer(None, slots=2, total=None)
    assert sizer.next_size() == 1
    sizer.learn(100, 0.0)
    assert sizer.next_size() == MAX_UNSIZED_CHUNK
    # A short input is spread over the slots, a chunk per slot at least.
    sizer = ChunkSizer(None, slots=2, total=6)
    sizer.learn(3, 0.0)
    assert sizer.next_size() == 1


def test_long_tasks_go_one_per_chunk_over_both_workers(monkeypatch):
    h = hived.connect("embedded", cpus=2)
    try:
        wait_workers_ready(h)
        counts = count_chunks(h, monkeypatch)
        pids = list(h.map(nap_then_pid, [LONG_TASK_SECONDS * 3] * 12))
        assert counts == [1] * 12  # the probes, and every chunk after them
        assert len(set(pids)) == 2
    finally:
        h.shutdown()


def test_a_sized_map_of_tiny_tasks_goes_in_multiprocessing_chunks(hive, monkeypatch):
    # The workers' own timings would make the sizes depend on this machine's
    # load (a probe preempted looks long): each item reports a microsecond.
    learn = ChunkSizer.learn
    monkeypatch.setattr(ChunkSizer, "learn", lambda self, count, elapsed: learn(self, count, count * 1e-6))
    counts = count_chunks(hive, monkeypatch)
    assert list(hive.map(square, list(range(20_000)))) == [x * x for x in range(20_000)]
    probes = counts[: hive.slots]
    assert probes == [1] * hive.slots
    rest = counts[hive.slots :]
    assert set(rest[:-1]) == {heuristic_chunksize(20_000, hive.slots)}  # the last holds what is left
    assert sum(counts) == 20_000


def test_unsized_map_batches_twenty_thousand_tiny_tasks(hive, monkeypatch):
    counts = count_chunks(hive, monkeypatch)
    assert list(hive.map(square, range(20_000))) == [x * x for x in range(20_000)]
    assert sum(counts) == 20_000
    assert len(counts) < 2_000  # batched: an item per chunk would be 20,000 chunks


def test_several_iterables(hive):
    assert list(hive.map(pow, range(5), itertools.repeat(2))) == [0, 1, 4, 9, 16]
    assert list(hive.map(pow, [2, 3], [3, 2], [100, 100])) == [8, 9]


# -- endless inputs ------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [10, None])
def test_break_out_of_an_endless_map_cancels_it(hive, chunksize):
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    got = []
    for value in hive.map(square, endless(), chunksize=chunksize):
        got.append(value)
        if len(got) == 500:
            break
    pulled_at_break = pulled
    assert got == [x * x for x in range(500)]
    wait_no_jobs(hive)
    assert pulled == pulled_at_break  # nothing read once the caller left
    # Read ahead by at most the chunks the stream may hold (WINDOW_BUFFER
    # windows of 2 * slots + 1, finished ones waiting their turn included)
    # and the chunk being yielded: how far depends on how fast results come.
    held = WINDOW_BUFFER * (2 * hive.slots + 1) + 1
    assert pulled <= 500 + held * (chunksize or MAX_UNSIZED_CHUNK)
    assert list(hive.map(square, range(3))) == [0, 1, 4]  # the hive goes on


def test_memory_stays_flat_over_a_long_endless_map(hive):
    results = hive.map(kilobyte, itertools.count(), chunksize=100)
    for _ in range(20_000):  # warm up: the window is full, caches are made
        next(results)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(180_000):
            assert len(next(results)) == 1024
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        results.close()
    # Keeping 180,000 results of 1 KiB would take 180 MiB; the window holds
    # a few hundred.
    assert peak - before < 16 << 20, f"peak grew by {(peak - before) >> 20} MiB"
    wait_no_jobs(hive)


# -- what the caller sees -----------------------------------------------------------------


class Terminal:
    """sys.stderr on a pseudo-terminal of 100 columns; `screen()` is what it shows."""

    END = "<end of screen>"

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.file = open(slave, "w", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self.got = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)  # a full pty would block writes
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the slave side closed
                return
            if not chunk:
                return
            self.got += chunk

    def close(self) -> None:
        self.file.close()
        self.reader.join(10)
        os.close(self.master)

    def screen(self) -> list[str]:
        """The lines as a terminal shows them: `\\r` returns, ESC[K erases to the end."""
        # A mark written after everything else: once the reader has it, it
        # has all that came before (a newline alone may be a task's line,
        # the bar's last state still on its way).
        self.file.write(self.END)
        self.file.flush()
        wait_for(lambda: self.got.endswith(self.END.encode()), 10, what="all the terminal was sent")
        text = self.got.decode()[: -len(self.END)].replace("\r\n", "\n")  # the pty's CR before LF
        lines = []
        for raw in text.split("\n")[:-1]:
            row: list[str] = []
            at = 0
            for piece in re.split(r"(\r|\x1b\[K)", raw):
                if piece == "\r":
                    at = 0
                elif piece == "\x1b[K":
                    del row[at:]
                else:
                    row[at : at + len(piece)] = piece
                    at += len(piece)
            lines.append("".join(row).rstrip())
        return [line for line in lines if line]


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    """A Terminal; the test sets sys.stderr to it (in its body: pytest sets
    sys.stderr again between a fixture's setup and the test)."""
    term = Terminal()
    yield term
    term.close()


@pytest.mark.parametrize("tqdm", ["tqdm", "without tqdm"])
def test_no_bar_is_drawn_into_what_is_not_a_terminal(hive, capsys, monkeypatch, tqdm):
    if tqdm == "tqdm":
        pytest.importorskip("tqdm.auto")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if not installed
    assert list(hive.map(square, range(50), progress=True)) == [x * x for x in range(50)]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("tqdm", ["tqdm", "without tqdm"])
def test_a_bar_in_a_terminal_with_task_output_above_it(hive, terminal, monkeypatch, tqdm):
    if tqdm == "tqdm":
        pytest.importorskip("tqdm.auto")
    else:
        monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setattr(sys, "stderr", terminal.file)
    assert list(hive.map(shout, range(40), progress=True)) == list(range(40))
    lines = terminal.screen()
    # Every line a task printed is a line of its own, the bar's last state below them.
    assert sorted(line for line in lines if line.startswith("line ")) == sorted(f"line {i}" for i in range(40))
    assert all(line.startswith(("line ", "hived")) for line in lines), lines
    (bar,) = [line for line in lines if line.startswith("hived")]
    assert lines[-1] == bar and "40/40" in bar, lines
    if tqdm == "tqdm":
        assert bar.startswith("hived: 100%"), bar
    else:
        assert bar.startswith("hived [" + "#" * 30 + "] 40/40") and " eta 0:00" in bar, bar


def test_the_fallback_bar_shows_an_eta_while_it_runs(terminal):
    clock = [100.0]
    bar = hived.caller.progress.TextBar(1000, terminal.file, clock=lambda: clock[0])
    clock[0] = 110.0
    bar.update(100)  # 10/s: 900 to go, 90 s
    bar.close()
    assert terminal.screen() == ["hived [###---------------------------] 100/1000 10/s eta 1:30"]


@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_what_a_task_prints_reaches_the_caller(where, request, capfd):
    """Through a daemon each line names its node and worker pid; an embedded
    hive's workers are this process's children (as a ProcessPoolExecutor's
    are), and their lines come as they wrote them."""
    address = "embedded" if where == "embedded" else request.getfixturevalue("daemon").address
    with hived.connect(address) as hive:
        assert list(hive.map(chatty, range(3))) == [0, 1, 2]
        out, err = "", ""

        def all_lines_in() -> bool:
            nonlocal out, err
            o, e = capfd.readouterr()
            out, err = out + o, err + e
            return all(f"hello {i}" in out and f"complaint {i}" in err for i in range(3))

        wait_for(all_lines_in, 30, what="the tasks' output")
        node = re.escape(hive.node_name)
    for i in range(3):
        if where == "embedded":
            assert re.search(rf"^hello {i}$", out, re.M), out
            assert re.search(rf"^complaint {i}$", err, re.M), err
        else:
            assert re.search(rf"^\({node} pid=\d+\) hello {i}$", out, re.M), out
            assert re.search(rf"^\({node} pid=\d+\) complaint {i}$", err, re.M), err


# -- stopping early -------------------------------------------------------------------------


def test_timeout_raises_task_timeout_and_cancels_the_job(hive):
    wait_workers_ready(hive)
    before = worker_pids()
    with pytest.raises(hived.TaskTimeout, match="timeout=0.5"):
        list(hive.map(nap, [60] * hive.slots, timeout=0.5))
    wait_no_jobs(hive)
    # The workers still sleeping are stopped (after a grace) and replaced.
    wait_for(
        lambda: len(worker_pids()) == hive.slots and not worker_pids() & before,
        30,
        what="the cancelled tasks' workers to be replaced",
    )
    assert list(hive.map(square, range(4))) == [0, 1, 4, 9]


def test_keyboard_interrupt_in_the_loop_cancels_the_job(hive):
    with pytest.raises(KeyboardInterrupt):
        for _ in hive.map(nap, itertools.repeat(0.01)):
            raise KeyboardInterrupt
    wait_no_jobs(hive)
    assert list(hive.map(square, range(4))) == [0, 1, 4, 9]


def test_ctrl_c_while_waiting_for_a_result_cancels_the_job(hive):
    wait_workers_ready(hive)
    # A KeyboardInterrupt raised while some __del__ runs (a collected zmq
    # Context, say) is printed as "Exception ignored" and lost, as a user's
    # Ctrl-C would be: press again, as a user would, until one lands.
    main = threading.main_thread().ident
    landed = threading.Event()

    def on_sigint(signum, frame):
        if not landed.is_set():
            raise KeyboardInterrupt

    def press_ctrl_c():
        while not landed.wait(1.0):
            signal.pthread_kill(main, signal.SIGINT)

    default = signal.signal(signal.SIGINT, on_sigint)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        list(hive.map(nap, [60, 60, 60]))
        pytest.fail("the map ended without a KeyboardInterrupt")
    except KeyboardInterrupt:
        landed.set()
    finally:
        landed.set()
        presser.join()
        signal.signal(signal.SIGINT, default)
    wait_no_jobs(hive)
    assert list(hive.map(square, range(4))) == [0, 1, 4, 9]


@pytest.mark.parametrize("where", ["embedded", "daemon"])
def test_a_map_read_after_shutdown_raises_rather_than_hangs(where, request):
    if where == "embedded":
        h = hived.connect("embedded")
    else:
        h = hived.connect(request.getfixturevalue("daemon").address)
    results = h.map(square, itertools.count())
    assert next(results) == 0
    h.shutdown()
    with pytest.raises(hived.HiveError, match="shut down|stopped"):
        for _ in results:  # what had arrived, then the error
            pass


# -- bad requests ---------------------------------------------------------------------------


def test_gpus_on_a_hive_without_gpus(hive):
    if hive.link.node.settings.gpus:
        pytest.skip("this machine has GPUs")
    with pytest.raises(hived.HiveError, match="GPU"):
        list(hive.map(square, [1, 2], gpus=1))
    wait_no_jobs(hive)
    assert list(hive.map(square, [3])) == [9]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"cpus": 0}, ValueError, "cpus"),
        ({"cpus": 1.5}, ValueError, "cpus"),
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"chunksize": -3}, ValueError, "chunksize"),
        ({"retries": -1}, ValueError, "retries"),
        ({"gpus": -1}, ValueError, "gpus"),
        ({"timeout": -1}, ValueError, "timeout"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_arguments_raise_at_call_time(hive, kwargs, error, match):
    with pytest.raises(error, match=match):
        hive.map(square, range(3), **kwargs)  # not iterated: raised by the call
    assert not jobs_of(hive)


def test_map_needs_an_iterable_and_a_callable(hive):
    with pytest.raises(TypeError, match="iterable"):
        hive.map(square)
    with pytest.raises(TypeError, match="callable"):
        hive.map(42, range(3))
    assert not jobs_of(hive)
    assert list(hive.map(square, [2])) == [4]


# -- data -------------------------------------------------------------------------------------


def test_a_32_mb_numpy_array_goes_and_comes_back_intact(hive):
    np = pytest.importorskip("numpy")
    a = np.random.default_rng(7).random(4 << 20)  # 4 Mi float64 = 32 MiB
    assert a.nbytes == 32 << 20
    out = hive.submit(reverse, a).result(timeout=60)
    assert out.dtype == a.dtype and np.array_equal(out, a[::-1])
    b = a.reshape(1024, -1)
    back = list(hive.map(reverse, [a, b]))
    assert np.array_equal(back[0], a[::-1]) and np.array_equal(back[1], b[::-1])


# -- worker recycling ------------------------------------------------------------------------


def test_max_tasks_per_worker_recycles_workers(make_daemon, tmp_path):
    config = tmp_path / "hived.toml"
    config.write_text("[pool]\nmax_tasks_per_worker = 5\n")
    daemon = make_daemon("--config", str(config))
    with hived.connect(daemon.address) as h:
        pids = list(h.map(pid_of, range(40), chunksize=1))
    per_worker = collections.Counter(pids)
    assert max(per_worker.values()) <= 5, per_worker
    assert len(per_worker) >= 40 // 5, per_worker
    wait_for(lambda: len(daemon.worker_pids()) == 2, 30, what="the daemon's pool to settle at 2")


def test_normal_use_logs_nothing_at_warning_or_above(caplog) -> None:
    """Routine events (workers stopped as the hive shuts down, a map left
    early and its tasks stopped) are INFO: a library's WARNINGs are faults."""
    caplog.set_level(logging.DEBUG)
    with hived.connect("embedded") as h:
        assert sum(h.map(square, range(1000))) == sum(x * x for x in range(1000))
        assert h.submit(square, 3).result(timeout=30) == 9
        left = h.map(nap, [0.0] + [5.0] * 8)
        next(left)
        left.close()  # its running tasks are stopped after CANCEL_GRACE
    hived.connect("embedded").shutdown()  # stopped while its workers still start
    loud = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud
    assert any("was stopped" in r.getMessage() for r in caplog.records)  # INFO, but said


# -- start-up -------------------------------------------------------------------------


def test_embedded_workers_start_before_the_node_and_go_if_it_fails(monkeypatch):
    import hived.node.node
    import hived.node.pool

    launched: list[hived.node.pool.Launcher] = []
    real_prelaunch = hived.node.pool.Launcher.prelaunch

    def prelaunch(self, cpus):
        real_prelaunch(self, cpus)
        launched.append(self)

    def broken_start(self):
        raise RuntimeError("the node could not start")

    monkeypatch.setattr(hived.node.pool.Launcher, "prelaunch", prelaunch)
    monkeypatch.setattr(hived.node.node.Node, "start", broken_start)
    before = worker_pids()
    with pytest.raises(hived.HiveError, match="the embedded hive did not start: the node could not start"):
        hived.connect("embedded", cpus=2)
    (launcher,) = launched
    assert not launcher.early
    assert not os.path.exists(launcher.dir)  # its sockets and black boxes gone with it
    assert worker_pids() == before  # the two early workers were killed and reaped


def test_a_shut_down_hive_is_freed_with_its_thread_without_a_collection() -> None:
    # As a ProcessPoolExecutor is: no reference cycle keeps a closed Hive and
    # its node's thread until the collector runs (CPython's own executor tests
    # count the threads left after each test).
    enabled = gc.isenabled()
    gc.disable()
    try:
        hive = hived.Hive(cpus=1)
        assert hive.submit(pow, 2, 8).result() == 256 and sum(hive.map(abs, range(-100, 0))) == 5050
        hive_ref, thread_ref = weakref.ref(hive), weakref.ref(hive.link.thread)
        hive.shutdown()
        del hive
        assert hive_ref() is None and thread_ref() is None
    finally:
        if enabled:
            gc.enable()


def test_a_hive_made_on_a_thread_that_ends_keeps_its_workers() -> None:
    # A worker dies with the thread that started it (PR_SET_PDEATHSIG follows
    # the thread that forked): the embedded node's own thread starts them.
    made: list[tuple[hived.Hive, set[int]]] = []

    def make() -> None:
        hive = hived.Hive(cpus=2)
        wait_workers_ready(hive)  # each has set its parent-death signal by now
        made.append((hive, {w.proc.pid for w in list(hive.link.node.pool.workers.values())}))

    maker = threading.Thread(target=make)
    maker.start()
    maker.join()
    ((hive, started),) = made
    try:
        assert sum(hive.map(abs, range(-1000, 0), chunksize=10)) == 500500
        alive = {p for p in started if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"}
        assert alive == started and on_node_loop(hive, lambda: hive.link.node.pool.worker_crashes) == 0
    finally:
        hive.shutdown()
