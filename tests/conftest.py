"""Fixtures shared by the whole suite: real daemons, real workers, no leaks.

Every test is checked for leaked child processes: whatever a test started
(daemons, worker processes of an embedded hive) must be gone when it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import psutil
import pytest
from netns import wait_for

import hived
from hived.control import StatusQuery, ask

pytest_plugins = ["netns_fixtures"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(hived.__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must run this checkout's hived."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HIVED_", "NOTIFY_", "WATCHDOG_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


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


@pytest.fixture(autouse=True)
def no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves a child process of ours behind."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leaked() -> list[psutil.Process]:
        return [p for p in me.children(recursive=True) if p.pid not in before and _alive(p)]

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
