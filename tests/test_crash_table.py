"""The crash table: every stage at which one task can go wrong, in one test.

Each row is (id, function, items, bad item, expected error, message regex),
run on an embedded hive over six items of which one is bad (or, where the
function itself is at fault, all of them). The row is run twice:

- through `map`, with the six items in ONE chunk (the hardest case: the bad
  item shares its chunk with good ones): the items before the bad one come
  out right, then the bad one raises the expected error at its position;
- item by item through `submit`: the bad item fails with the expected error
  and every other item's result is right, each failure its own instance.

After each row the pool keeps serving: a follow-up map works and the pool is
back to its full count of worker processes (two on a 2-CPU machine). The autouse `no_leaked_children` fixture
asserts at teardown that no child process outlived the hive.

Stages covered, in loky's terms: pickling the function and the arguments
(caller), unpickling them (worker), running, pickling the result (worker),
unpickling it (caller), the worker dying mid-task (SIGKILL, SIGSEGV,
os._exit), and a task breaking its worker's link to the pool.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import importlib
import os
import re
import resource
import sys
import textwrap
import threading
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

import hived
import hived.protocol.serialization
from hived.errors import InternalError
from hived.testing.embedded import pool_valid
from hived.testing.waiting import wait_for

BAD = 3  # the bad item's value and, in ITEMS, its position
ITEMS = list(range(6))
CALL = "call"  # the function itself is at fault: map raises, submit's futures fail
ALL = "all"  # the function is at fault on the worker: every item fails
MISSING_PKG = "hived_test_absent_pkg"


# -- task functions -------------------------------------------------------------------


def times10(x):
    return x * 10


def raise_on_bad(x):
    if x == BAD:
        raise ValueError(f"bad item {x}")
    return x * 10


def lock_on_bad(x):
    if x == BAD:
        return threading.Lock()
    return x * 10


def _refuse_to_load(what):
    raise RuntimeError(f"refusing to load {what}")


class Unloadable:
    """Pickles fine; unpickling it raises (wherever that happens)."""

    def __init__(self, what="this"):
        self.what = what

    def __reduce__(self):
        return _refuse_to_load, (self.what,)


def unloadable_on_bad(x):
    if x == BAD:
        return Unloadable("the result")
    return x * 10


def times10_or_name(x):
    return x * 10 if isinstance(x, int) else type(x).__name__


def sigkill_on_bad(x):
    if x == BAD:
        os.kill(os.getpid(), 9)
    return x * 10


def segfault_on_bad(x):
    if x == BAD:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        ctypes.string_at(0)
    return x * 10


def exit3_on_bad(x):
    if x == BAD:
        os._exit(3)
    return x * 10


def scribble_on_link_on_bad(x):
    """Writes what is not a message on its worker's link to the pool (the
    socketpair's fd, its worker's first argument), then waits to be stopped."""
    if x == BAD:
        os.write(int(sys.argv[1]), b"\xff" * 16)
        threading.Event().wait(60)
    return x * 10


def sigkill_first_try(marker, x):
    """Kills its worker the first time it runs the bad item, then succeeds."""
    if x == BAD and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return x * 10


def square(x):
    return x * x


def _locked_function():
    lock = threading.Lock()

    def holds_a_lock(x):
        with lock:
            return x

    return holds_a_lock


def _function_of_a_missing_package(ctx):
    """A function from a package installed here but not on the worker.

    The package lives in a tmp dir on this process's sys.path only; listing
    that dir among the installed roots makes hived pickle the function by
    reference, as it would one from site-packages.
    """
    site = ctx.tmp_path / "site"
    (site / MISSING_PKG).mkdir(parents=True)
    (site / MISSING_PKG / "__init__.py").write_text(
        textwrap.dedent(
            """
            def times10(x):
                return x * 10
            """
        )
    )
    ctx.monkeypatch.setattr(
        hived.protocol.serialization,
        "_INSTALLED_ROOTS",
        (*hived.protocol.serialization._INSTALLED_ROOTS, os.path.realpath(site)),
    )
    ctx.monkeypatch.syspath_prepend(str(site))
    ctx.request.addfinalizer(lambda: sys.modules.pop(MISSING_PKG, None))
    return importlib.import_module(MISSING_PKG).times10


# -- the table ---------------------------------------------------------------------------


@dataclass
class Row:
    id: str
    make: Any  # ctx -> the function
    items: list[Any]
    bad: int | str  # the bad item's position, CALL or ALL
    error: type[BaseException]
    match: str

    def expected(self, fn: Any, i: int) -> Any:
        return fn(self.items[i])  # good items run here too


def _with_bad(value: Any) -> list[Any]:
    return [value if i == BAD else i for i in ITEMS]


def _fixed(fn):
    return lambda ctx: fn


ROWS = [
    Row(
        "unpicklable-function", lambda ctx: _locked_function(), ITEMS, CALL,
        hived.SerializationError, r"function .*holds_a_lock could not be pickled: .*lock",
    ),
    Row(
        "unpicklable-argument", _fixed(times10_or_name), _with_bad(threading.Lock()), BAD,
        hived.SerializationError, r"argument(s| of item 3) could not be pickled: .*lock",
    ),
    Row(
        "argument-fails-to-unpickle-in-worker", _fixed(times10_or_name),
        _with_bad(Unloadable("the argument")), BAD,
        hived.SerializationError,
        r"arguments \(on .+ pid \d+\) could not be unpickled: .*refusing to load the argument",
    ),
    Row(
        "task-raises", _fixed(raise_on_bad), ITEMS, BAD, ValueError, r"^bad item 3$",
    ),
    Row(
        "result-not-picklable", _fixed(lock_on_bad), ITEMS, BAD,
        hived.SerializationError, r"the task's result could not be pickled \(on .+ pid \d+\): .*lock",
    ),
    Row(
        "result-fails-to-unpickle-in-caller", _fixed(unloadable_on_bad), ITEMS, BAD,
        hived.SerializationError, r"result( of item 3)? could not be unpickled: .*refusing to load the result",
    ),
    Row(
        "sigkill", _fixed(sigkill_on_bad), ITEMS, BAD, hived.WorkerCrashed,
        r"worker pid (\d+) on .+ died from SIGKILL\(-9\).*out of memory.*\(tried 3 times\)",
    ),
    Row(
        "segfault", _fixed(segfault_on_bad), ITEMS, BAD, hived.WorkerCrashed,
        r"worker pid (\d+) on .+ died from SIGSEGV\(-11\).*segmentation fault",
    ),
    Row(
        "os-exit", _fixed(exit3_on_bad), ITEMS, BAD, hived.WorkerCrashed,
        r"worker pid (\d+) on .+ exited with code 3\b",
    ),
    Row(
        "link-scribbled", _fixed(scribble_on_link_on_bad), ITEMS, BAD, hived.WorkerCrashed,
        r"worker pid (\d+) on .+ was stopped while running item \d+ of a chunk: its link to the "
        r"pool broke: a message of 4294967295 frames; expected 1 to 4096 \(tried 3 times\)",
    ),
    Row(
        "package-missing-on-worker", _function_of_a_missing_package, ITEMS, ALL,
        hived.SerializationError,
        rf"function \(on (?P<node>\S+) pid \d+\) could not be unpickled: module '{MISSING_PKG}' is not installed",
    ),
]


@dataclass
class Ctx:
    tmp_path: Any
    monkeypatch: Any
    request: Any


# -- helpers ----------------------------------------------------------------------------


def worker_procs() -> list[psutil.Process]:
    """This process's live hived worker processes."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "hived.node.worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def outcomes(hive: hived.Hive, fn: Any, items: list[Any]) -> list[Any]:
    """Each item's result, or the exception it raised, one `submit` per item."""
    futures = [hive.submit(fn, item) for item in items]
    concurrent.futures.wait(futures, timeout=60)
    return [f.exception() or f.result() for f in futures]


def check_error(row: Row, exc: BaseException, hive: hived.Hive) -> None:
    assert type(exc) is row.error, repr(exc)
    assert re.search(row.match, str(exc)), f"{str(exc)!r} does not match {row.match!r}"
    if row.error is ValueError:  # the task's own exception: remote traceback as cause
        cause = exc.__cause__
        assert isinstance(cause, hived.HiveError)
        assert re.search(rf"on {re.escape(hive.node_name)} pid \d+", str(cause))
        assert "raise_on_bad" in str(cause)
    if row.error is hived.WorkerCrashed:  # names the dead worker, not a live one
        pid = int(re.search(row.match, str(exc)).group(1))
        assert pid not in {p.pid for p in worker_procs()}
    if row.bad == ALL:
        assert re.search(row.match, str(exc)).group("node") == hive.node_name


def assert_pool_serves(hive: hived.Hive) -> None:
    assert list(hive.map(square, range(20))) == [x * x for x in range(20)]
    assert hive.submit(square, 9).result(timeout=30) == 81
    wait_for(
        lambda: len(worker_procs()) == hive.slots,
        30,
        what=f"the pool to be back to {hive.slots} workers",
    )
    # What the processes show, the pool's own records must agree with.
    wait_for(lambda: pool_valid(hive), 30, what="the pool's invariants", ignore=InternalError)


# -- the tests ---------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_crash_table(hive, row, tmp_path, monkeypatch, request):
    fn = row.make(Ctx(tmp_path, monkeypatch, request))

    if row.bad == CALL:
        with pytest.raises(row.error) as info:
            hive.map(fn, row.items)
        check_error(row, info.value, hive)
        # submit: the future holds the error, as ProcessPoolExecutor's does.
        errors = [f.exception(timeout=30) for f in [hive.submit(fn, x) for x in row.items[:2]]]
        for exc in errors:
            check_error(row, exc, hive)
        assert errors[0] is not errors[1]
        assert_pool_serves(hive)
        return

    # Through map, all six items in one chunk.
    bad = 0 if row.bad == ALL else row.bad
    results = hive.map(fn, row.items, chunksize=len(row.items))
    for i in range(bad):
        assert next(results) == row.expected(fn, i)
    with pytest.raises(row.error) as info:
        next(results)
    check_error(row, info.value, hive)
    results.close()

    # Item by item: only the bad item fails, each failure its own instance.
    got = outcomes(hive, fn, row.items)
    errors = []
    for i, value in enumerate(got):
        if row.bad in (ALL, i):
            check_error(row, value, hive)
            errors.append(value)
        else:
            assert value == row.expected(fn, i), f"item {i}"
    assert len({id(e) for e in errors}) == len(errors)
    assert_pool_serves(hive)


def test_unpicklable_arguments_in_a_generator_fail_alone(hive):
    """Unknown length, adaptive chunks: a bad item deep in a big chunk fails alone."""

    def items(start):
        for i in range(start, 300):
            yield threading.Lock() if i in (7, 250) else i

    results = hive.map(times10_or_name, items(0))
    assert [next(results) for _ in range(7)] == [i * 10 for i in range(7)]
    with pytest.raises(hived.SerializationError, match="argument of item 7 could not be pickled"):
        next(results)
    results = hive.map(times10_or_name, items(8))
    assert [next(results) for _ in range(8, 250)] == [i * 10 for i in range(8, 250)]
    with pytest.raises(hived.SerializationError, match="argument of item 242 could not be pickled"):
        next(results)
    results.close()
    assert_pool_serves(hive)


def sigkill_on_bad_noting_runs(runs, x):
    """Appends a line to `runs` for every run of the bad item, then kills its worker."""
    if x == BAD:
        with open(runs, "a") as f:
            f.write(f"{os.getpid()}\n")
        os.kill(os.getpid(), 9)
    return x * 10


@pytest.mark.parametrize("chunksize", [1, 2, 6])
@pytest.mark.parametrize("retries", [0, 2])
def test_a_task_that_always_kills_its_worker_runs_retries_plus_one_times(
    hive, tmp_path, retries, chunksize
):
    # The bad item last: every other item of the map comes out first. A range
    # of several items first runs on the fast path, which cannot say which
    # item killed the worker; finding it must not cost the bad item a run.
    runs = tmp_path / "runs"
    items = [0, 1, 2, 4, 5, BAD]
    fn = functools.partial(sigkill_on_bad_noting_runs, str(runs))
    results = hive.map(fn, items, chunksize=chunksize, retries=retries)
    assert [next(results) for _ in range(5)] == [0, 10, 20, 40, 50]
    times = "1 time" if retries == 0 else f"{retries + 1} times"
    with pytest.raises(hived.WorkerCrashed, match=rf"SIGKILL.*\(tried {times}\)$"):
        next(results)
    assert len(runs.read_text().splitlines()) == retries + 1
    assert_pool_serves(hive)


def test_a_task_that_crashes_once_succeeds_on_retry(hive, tmp_path):
    marker = tmp_path / "crashed-once"
    fn = functools.partial(sigkill_first_try, str(marker))
    assert list(hive.map(fn, ITEMS, chunksize=len(ITEMS))) == [x * 10 for x in ITEMS]
    assert marker.exists()  # it did crash once
    assert_pool_serves(hive)


def test_crashes_of_several_futures_are_separate_instances(hive):
    futures = [hive.submit(exit3_on_bad, BAD) for _ in range(2)]
    errors = [f.exception(timeout=60) for f in futures]
    assert all(type(e) is hived.WorkerCrashed for e in errors)
    assert errors[0] is not errors[1]
    assert_pool_serves(hive)
