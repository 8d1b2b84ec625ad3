"""Runs of the suite's parts under other interpreters, two at a time.

Each such run is a subprocess that mostly waits (tests that wait by design,
interpreters starting), so the runs a session selects are all queued when
the first of their tests is reached and run AT_ONCE at a time, and each
test collects its own. The conftest hook puts their tests last, so no run
overlaps the main suite's timing-sensitive tests. (All five at once loaded
a 2-core machine past what the runs' own timing-sensitive tests allow.)

A run's processes are its test's, not leaks of the tests that end while it
runs: `running` names them for conftest's leak check.

A test module declares its runs with `declare`; a run's output goes to a
file, and a run past its timeout is sent SIGABRT first (the child runs
with -X faulthandler, so every thread's stack is written) before it and
its session are killed: the output and the stacks are in the result.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pythons import ROOT

# How long a timed-out run has to write its stacks before it is killed.
STACKS_WAIT_S = 3.0
AT_ONCE = 2

_running: set[int] = set()
_running_lock = threading.Lock()


def running() -> set[int]:
    """The pids of the runs going now."""
    with _running_lock:
        return set(_running)


@dataclass(frozen=True)
class Spec:
    """How to run one part under one interpreter: the interpreter's
    arguments, given a directory of the run's own."""

    arguments: Callable[[str], list[str]]
    timeout: float


_DUMP = "Fatal Python error"
_THREAD = re.compile(r"^(?:Current thread|Thread) (0x[0-9a-f]+)")
_FRAME = re.compile(r'^\s+File "(.+)", line (\d+) in (\S+)')


@dataclass
class Result:
    returncode: int | None  # None: killed at its timeout
    output: str
    seconds: float
    out_dir: str

    def report(self, timeout: float) -> str:
        """What a failed run's assertion shows. A run killed at its timeout:
        its last words, then each thread's stack on one line, last, where a
        CI log folded in the middle still shows them."""
        if self.returncode is not None or _DUMP not in self.output:
            return f"exit {self.returncode}\n" + self.output[-10000:]
        before, _, dump = self.output.rpartition(_DUMP)
        return (f"killed at {timeout:g} s; its output ended:\n{before[-3000:]}\n"
                f"its threads, innermost frame first, then this checkout's:\n{stacks_in_brief(dump)}")


def stacks_in_brief(dump: str) -> str:
    """A faulthandler dump, a line per thread: its innermost frame, then the
    frames of this checkout's files (hived's, the tests')."""
    lines: list[str] = []
    frames: list[str] = []
    for text in dump.splitlines() + [""]:
        thread, frame = _THREAD.match(text), _FRAME.match(text)
        if frame is not None:
            path, line, name = frame.groups()
            if not frames or path.startswith(ROOT + os.sep):
                frames.append(f"{os.path.relpath(path, ROOT) if path.startswith(ROOT) else os.path.basename(path)}"
                              f":{line} {name}")
            continue
        if frames:
            lines[-1] += " " + " < ".join(frames)
            frames = []
        if thread is not None:
            lines.append(f"{thread.group(1)}:")
    return "\n".join(lines)


_SPECS: dict[tuple[str, str], Spec] = {}


def declare(test: str, versions: Iterable[str], arguments: Callable[[str], list[str]], timeout: float) -> None:
    """Register `test`'s run under each of `versions` (its parameter `version`),
    in the checkout's root with PYTHONPATH naming it."""
    for version in versions:
        _SPECS[(test, version)] = Spec(arguments, timeout)


class Runs:
    """The runs of the selected tests, all queued by the first `result`."""

    def __init__(self, selected: set[tuple[str, str]], python_of: Callable[[str], str], base: str) -> None:
        self._selected = {key: _SPECS[key] for key in selected if key in _SPECS}
        self._python_of = python_of
        self._base = base
        self._pool: ThreadPoolExecutor | None = None
        self._futures: dict = {}

    def result(self, test: str, version: str) -> Result:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(AT_ONCE, thread_name_prefix="subrun")
            # The longest first (a run's timeout is in proportion to its
            # length): a short run left for last would keep one slot idle.
            order = sorted(self._selected.items(), key=lambda item: (-item[1].timeout, item[0]))
            self._futures = {key: self._pool.submit(self._run, key, spec) for key, spec in order}
        return self._futures[(test, version)].result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _run(self, key: tuple[str, str], spec: Spec) -> Result:
        python = self._python_of(key[1])  # a skip or failure here is the test's own
        out_dir = os.path.join(self._base, f"{key[0]}-{key[1]}")
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, "output.txt")
        started = time.monotonic()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [python, "-X", "faulthandler", *spec.arguments(out_dir)], cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        with _running_lock:
            _running.add(proc.pid)
        try:
            returncode: int | None = proc.wait(spec.timeout)
        except subprocess.TimeoutExpired:
            returncode = None
            os.kill(proc.pid, signal.SIGABRT)
            try:
                proc.wait(STACKS_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):  # its session may be gone with it
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            with _running_lock:
                _running.discard(proc.pid)
        with open(log_path, errors="replace") as f:
            output = f.read()
        return Result(returncode, output, time.monotonic() - started, out_dir)
