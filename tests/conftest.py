"""Fixtures shared by the whole suite: real daemons, real workers, no leaks.

Every test is checked for leaked child processes: whatever a test started
(daemons, worker processes of an embedded hive) must be gone when it ends.

A test that times out (pytest-timeout, signal method) first gets the stacks
of every hived it started: each is sent SIGUSR1 and its log from there on is
added to the failure report, before the fixtures kill the daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import subruns as subrun
from hypothesis import settings
from pythons import DECLARED, interpreter

import hived
from hived.daemon import STACKS_WRITTEN
from hived.protocol.control import StatusQuery, ask
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

pytest_plugins = ["netns_fixtures"]

# In CI every hypothesis test draws the same examples each run (a failure
# is a bug to reproduce, not luck); each test's max_examples bounds its time.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI") == "true":
    settings.load_profile("ci")

# How long a timed-out test waits for its daemons to write their stacks.
STACKS_WAIT_S = 3.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A real `hived` in a subprocess, on a control socket of its own."""

    def __init__(self, tmp: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.dir = tmp
        self.address = f"ipc://{tmp}/hived.sock"
        self.log_path = os.path.join(tmp, "hived.log")
        self.args = [
            sys.executable, "-m", "hived.daemon", "--control", self.address,
            "--name", "testnode", "--cpus", "2", "--gpus", "0", "--log-level", "info",
            "--bind", "tcp://127.0.0.1:0",
            "--data-dir", os.path.join(tmp, "data"), *args,
        ]
        self.env = env or child_env()
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        if wait:
            wait_for(self.answers, 20, what=f"hived to answer at {self.address}; log:\n{self.log}")
        return self

    def answers(self) -> bool:
        assert self.proc.poll() is None, f"hived exited {self.proc.returncode}; log:\n{self.log}"
        return ask(self.address, StatusQuery(1), timeout=0.5) is not None

    def status(self) -> dict:
        answer = ask(self.address, StatusQuery(1), timeout=3)
        assert answer is not None, f"hived did not answer; log:\n{self.log}"
        return answer.body

    def worker_pids(self) -> list[int]:
        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def kill(self) -> None:
        """Kill the daemon and everything it started (its session)."""
        if self.proc is not None and self.proc.poll() is None:
            pids = self.worker_pids()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            for pid in pids:  # workers run in sessions of their own
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def make_daemon() -> Iterator:
    """Factory for real daemons; each is killed at teardown if still running."""
    made: list[Daemon] = []
    dirs: list[tempfile.TemporaryDirectory] = []

    def make(*args: str, start: bool = True, env: dict[str, str] | None = None) -> Daemon:
        tmp = tempfile.TemporaryDirectory(prefix="hived-test-")
        dirs.append(tmp)
        daemon = Daemon(tmp.name, *args, env=env)
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in made:
        daemon.kill()
    for tmp in dirs:
        tmp.cleanup()


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop of the test's own, for the node's parts driven without a thread."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def python_of(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """An interpreter of a declared Python version for this session's tests
    (tests/pythons.py): the first call finds or makes every declared
    version's at once (making a venv mostly waits on pip's I/O)."""
    venvs = str(tmp_path_factory.mktemp("venvs"))
    with ThreadPoolExecutor(len(DECLARED), thread_name_prefix="venv") as pool:
        found: dict[str, Future[str]] = {}

        def of(version: str) -> str:
            if not found:
                found.update({v: pool.submit(interpreter, v, venvs) for v in DECLARED})
            return found[version].result()  # its skip or failure is the caller's

        yield of


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of runs under other interpreters (tests/subruns.py) last,
    together: their runs start at once and load the machine meanwhile."""
    items.sort(key=lambda item: "subruns" in getattr(item, "fixturenames", ()))


@pytest.fixture(scope="session")
def subruns(request: pytest.FixtureRequest, python_of: Callable[[str], str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[subrun.Runs]:  # fmt: skip
    """The session's selected runs under other interpreters, started together."""
    selected = {
        (item.originalname, item.callspec.params["version"])
        for item in request.session.items
        if isinstance(item, pytest.Function) and "subruns" in item.fixturenames and hasattr(item, "callspec")
    }
    runs = subrun.Runs(selected, python_of, str(tmp_path_factory.mktemp("subruns")))
    yield runs
    runs.close()


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves a child process of ours behind."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leaked() -> list[psutil.Process]:
        theirs = set(subrun.running())  # each run's processes are its own test's
        for pid in list(theirs):
            with contextlib.suppress(psutil.NoSuchProcess):
                theirs.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        return [p for p in me.children(recursive=True) if p.pid not in before | theirs and _alive(p)]

    try:
        wait_for(lambda: not leaked(), 10, what="child processes to exit")
    except AssertionError:
        names = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in leaked()]
        for p in leaked():
            p.kill()
        raise AssertionError(f"leaked child processes: {names}") from None


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def hive() -> Iterator[hived.Hive]:
    """An embedded hive sized to this machine, shut down (workers gone) after the test."""
    h = hived.connect("embedded")
    yield h
    h.shutdown()


# -- the stacks of a timed-out test's daemons ---------------------------------------------


@pytest.hookimpl(wrapper=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Iterator[Any]:
    """Wrap pytest-timeout's SIGALRM handler: the daemons' stacks, then its failure.

    Costs nothing until a test times out; pytest-timeout's cancel resets
    SIGALRM, which drops the wrapper with it."""
    armed = yield
    on_timeout = signal.getsignal(signal.SIGALRM)
    # Only the signal method runs a handler, in the main thread, before teardown.
    if callable(on_timeout) and threading.current_thread() is threading.main_thread():

        def dump_then_fail(signum: int, frame: Any) -> None:
            __tracebackhide__ = True
            item.add_report_section("timeout", "hived stacks", daemon_stacks())
            on_timeout(signum, frame)

        signal.signal(signal.SIGALRM, dump_then_fail)
    return armed


def daemon_stacks(wait: float = STACKS_WAIT_S) -> str:
    """SIGUSR1 to every hived below this process; each one's log from then on.

    The daemons are found in the process tree (every helper that starts one,
    here or in a test module, is covered); each one's log is its stderr.
    Waits until every log has the line that ends a dump, or `wait` seconds
    (a daemon stuck inside C code writes the stacks but not that line)."""
    asked: list[tuple[psutil.Process, str, int]] = []
    notes: list[str] = []
    for proc in _running_daemons():
        log_path = _stderr_file(proc.pid)
        if log_path is None:
            notes.append(f"--- hived pid {proc.pid}: its stderr is not a file; not asked")
        elif not _catches(proc.pid, signal.SIGUSR1):  # SIGUSR1 would kill it
            notes.append(f"--- hived pid {proc.pid}: not catching SIGUSR1 yet (starting); not asked")
        else:
            offset = os.path.getsize(log_path)
            os.kill(proc.pid, signal.SIGUSR1)
            asked.append((proc, log_path, offset))

    def tail(log_path: str, offset: int) -> str:
        with open(log_path, errors="replace") as f:
            f.seek(offset)
            return f.read()

    with contextlib.suppress(AssertionError):  # at the deadline: what they wrote so far
        wait_for(lambda: all(STACKS_WRITTEN in tail(p, o) for _, p, o in asked), wait, what="stacks")
    for proc, log_path, offset in asked:
        notes.append(f"--- hived pid {proc.pid} ({log_path}), after SIGUSR1:\n{tail(log_path, offset)}")
    return "\n".join(notes) or "no hived was running"


def _running_daemons() -> list[psutil.Process]:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if _alive(proc) and any("hived.daemon" in arg for arg in proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # gone meanwhile
            pass
    return found


def _stderr_file(pid: int) -> str | None:
    try:
        path = os.readlink(f"/proc/{pid}/fd/2")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def _catches(pid: int, sig: int) -> bool:
    """Whether `pid` has a handler for `sig` (the kernel's SigCgt mask)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(caught, 16) >> (sig - 1) & 1)
