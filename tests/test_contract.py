"""One contract suite for the concurrent.futures.Executor interface.

Every test runs against `ProcessPoolExecutor(2)` (the reference), an embedded
hive and a hive reached through a real `hived` subprocess, and asserts only
what the Executor contract promises, so a difference between the rows is a
bug in hived (or a deviation this file names).

Task functions are module level: ProcessPoolExecutor (fork) finds them by
name in its children, and hived pickles this module's functions by value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool

import pytest
from tasks import (
    SHARED,
    Buffer,
    FailAtPickle,
    crash,
    length,
    log_then_return_exit_at_pickle,
    make_thing,
    mark_then_nap,
    nap,
    nap_then,
    raise_shared,
)

import hived
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

KINDS = ["ppe", "embedded", "daemon"]


# -- task functions -------------------------------------------------------------


def square(x):
    return x * x


def add(a, b):
    return a + b


def describe(a, b=0, *, scale=1):
    return (a + b) * scale




def fail_at_3(x):
    if x == 3:
        raise ValueError(f"item {x} is bad")
    return x * 10


class ContractError(Exception):
    """An exception class of the caller's own (travels by value to hived)."""


def raise_own(x):
    raise ContractError(f"own error {x}")


def raise_here(x):
    raise ContractError(f"raised at a known line {x}")


RAISE_LINE = raise_here.__code__.co_firstlineno + 1  # the line of its raise


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("this exception will not pickle")


def raise_unpicklable(x):
    raise Unpicklable(f"the message of {x}")


# -- the executors ----------------------------------------------------------------


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def executor(kind, request) -> Iterator[concurrent.futures.Executor]:
    if kind == "ppe":
        ex: concurrent.futures.Executor = concurrent.futures.ProcessPoolExecutor(2)
    elif kind == "embedded":
        ex = hived.connect("embedded")
    else:
        daemon = request.getfixturevalue("daemon")
        ex = hived.connect(daemon.address)
    yield ex
    ex.shutdown(wait=True, cancel_futures=True)


def _node_name(ex: concurrent.futures.Executor) -> str:
    return ex.node_name  # a Hive: the node that ran the task


# -- submit -----------------------------------------------------------------------


def test_submit_returns_a_real_future_with_the_result(executor):
    future = executor.submit(square, 7)
    assert type(future) is concurrent.futures.Future
    assert future.result(timeout=30) == 49
    assert future.done() and not future.cancelled()
    assert future.exception() is None


def test_submit_passes_positional_and_keyword_arguments(executor):
    assert executor.submit(describe, 2, b=3, scale=10).result(timeout=30) == 50
    assert executor.submit(describe, 2, 3).result(timeout=30) == 5
    assert executor.submit(describe, a=1).result(timeout=30) == 1


def test_submit_lambda(executor, kind):
    if kind == "ppe":
        pytest.skip("ProcessPoolExecutor pickles by reference: a lambda cannot reach it")
    offset = 5
    assert executor.submit(lambda x: x + offset, 1).result(timeout=30) == 6


def test_task_exception_keeps_its_type(executor, kind):
    future = executor.submit(fail_at_3, 3)
    with pytest.raises(ValueError, match="item 3 is bad") as info:
        future.result(timeout=30)
    assert isinstance(future.exception(), ValueError)
    if kind != "ppe":
        cause = info.value.__cause__
        assert isinstance(cause, hived.HiveError)
        text = str(cause)
        assert "Traceback" in text and "fail_at_3" in text
        assert re.search(rf"on {re.escape(_node_name(executor))}\b.* pid \d+", text), text


def test_task_exception_of_the_callers_own_class(executor, kind):
    with pytest.raises(ContractError, match="own error 1") as info:
        executor.submit(raise_own, 1).result(timeout=30)
    if kind != "ppe":
        assert re.search(r"pid \d+", str(info.value.__cause__))


def test_each_future_gets_its_own_exception_instance(executor):
    for fn in (fail_at_3, raise_shared):  # raise_shared raises one module-level instance
        futures = [executor.submit(fn, 3) for _ in range(2)]
        first, second = (f.exception(timeout=30) for f in futures)
        assert isinstance(first, ValueError) and isinstance(second, ValueError)
        assert first is not second and first is not SHARED


def test_remote_traceback_names_the_callers_file_and_line(executor, kind):
    # In hived raise_here travels by value (this module is not installed).
    with pytest.raises(ContractError) as info:
        executor.submit(raise_here, 1).result(timeout=30)
    text = str(info.value.__cause__)
    assert f'File "{__file__}", line {RAISE_LINE}, in raise_here' in text, text
    assert "raised at a known line" in text


def test_an_exception_that_will_not_pickle_fails_its_future(executor, kind):
    error = executor.submit(raise_unpicklable, 5).exception(timeout=30)
    assert error is not None  # ProcessPoolExecutor: whatever pickling raised
    if kind != "ppe":
        assert isinstance(error, hived.SerializationError)
        assert "Unpicklable: the message of 5" in str(error), error
        assert "this exception will not pickle" in str(error)
        assert "raise_unpicklable" in str(error.__cause__)  # the remote traceback
    assert executor.submit(square, 3).result(timeout=30) == 9


def test_system_exit_while_pickling_a_result_lands_on_its_future_once(executor, tmp_path):
    log = tmp_path / "calls"
    with pytest.raises(SystemExit):
        executor.submit(log_then_return_exit_at_pickle, str(log)).result(timeout=60)
    assert log.read_text() == "x\n"  # run once, not retried as a crash
    assert executor.submit(square, 4).result(timeout=30) == 16


def test_pickling_failures_are_pickling_errors(executor):
    with pytest.raises(pickle.PicklingError, match="refused by FailAtPickle"):
        executor.submit(length, FailAtPickle()).result(timeout=30)


def test_a_crashed_worker_is_a_broken_process_pool(executor, kind):
    with pytest.raises(BrokenProcessPool):
        executor.submit(crash).result(timeout=60)
    if kind != "ppe":  # hived replaced the worker: the pool goes on
        assert isinstance(executor.submit(crash).exception(timeout=60), hived.WorkerCrashed)
        assert executor.submit(square, 5).result(timeout=30) == 25


def test_hiveds_errors_are_what_process_pool_handlers_catch():
    assert issubclass(hived.WorkerCrashed, BrokenProcessPool)
    assert issubclass(hived.SerializationError, pickle.PicklingError)
    # ProcessPoolExecutor reports what will not unpickle as a broken pool.
    assert issubclass(hived.SerializationError, BrokenProcessPool)
    assert issubclass(hived.WorkerCrashed, hived.HiveError)
    assert issubclass(hived.SerializationError, hived.HiveError)


def test_manager_proxies_work_in_tasks(executor, kind):
    if kind == "daemon":
        pytest.skip("a daemon's workers are not this process's children: they lack its authkey")
    with multiprocessing.Manager() as manager:
        queue = manager.Queue()
        assert executor.submit(queue.put, "through the manager").result(timeout=30) is None
        assert queue.get(timeout=30) == "through the manager"


# -- running and cancelling -------------------------------------------------------


def test_a_started_call_is_running_and_cannot_be_cancelled(executor, tmp_path):
    started = tmp_path / "started"
    future = executor.submit(mark_then_nap, (str(started), 1.0, "done"))
    wait_for(started.exists, 30, what="the call to start")
    assert future.running()
    assert not future.cancel()
    assert not future.cancelled()
    assert future.result(timeout=30) == "done"


def test_shutdown_cancel_futures_leaves_started_calls_running(executor, tmp_path):
    started = tmp_path / "started"
    first = executor.submit(mark_then_nap, (str(started), 1.0, "first"))
    wait_for(started.exists, 30, what="the first call to start")
    rest = [executor.submit(nap_then, (0.5, i)) for i in range(20)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert first.result() == "first" and not first.cancelled()
    assert rest[-1].cancelled()
    for i, future in enumerate(rest):
        assert future.cancelled() or future.result() == i


# -- references -----------------------------------------------------------------


def test_no_reference_to_an_argument_outlives_its_call(executor):
    argument = Buffer(1 << 20)  # big enough to travel out of band
    alive = weakref.ref(argument)
    future = executor.submit(length, argument)
    assert future.result(timeout=30) == 1 << 20
    del argument
    gc.collect()
    assert alive() is None  # the future, still held, keeps its result only


def test_no_reference_to_a_result_once_the_caller_lets_go(executor):
    future = executor.submit(make_thing)
    alive = weakref.ref(future.result(timeout=30))
    del future
    gc.collect()
    assert alive() is None


def test_map_keeps_no_result_it_yielded(executor):
    for thing in executor.map(make_thing, range(10)):
        alive = weakref.ref(thing)
        del thing
        gc.collect()
        assert alive() is None


# -- map --------------------------------------------------------------------------


def test_map_yields_results_in_input_order(executor):
    assert list(executor.map(square, range(50))) == [x * x for x in range(50)]


def test_map_order_is_input_order_not_completion_order(executor):
    # Item 0 finishes last; map still yields it first.
    items = [(0.5, "a"), (0.0, "b"), (0.0, "c"), (0.0, "d")]
    assert list(executor.map(nap_then, items)) == ["a", "b", "c", "d"]


def test_map_of_nothing(executor):
    assert list(executor.map(square, [])) == []


def test_map_takes_several_iterables_and_stops_at_the_shortest(executor):
    assert list(executor.map(add, range(10), range(3))) == [0, 2, 4]
    assert list(executor.map(add, itertools.count(), [10, 20])) == [10, 21]
    assert list(executor.map(add, "ab", "xyz")) == ["ax", "by"]


def test_map_timeout_raises_at_the_first_late_item_and_cancels_the_rest(executor, tmp_path):
    marks = [str(tmp_path / f"item-{i}") for i in range(20)]
    items = [(marks[0], 0, "a"), (marks[1], 0, "b")] + [(m, 1.0, "late") for m in marks[2:]]
    got = []
    with pytest.raises(TimeoutError):
        for value in executor.map(mark_then_nap, items, timeout=0.5):
            got.append(value)
    assert got == ["a", "b"]
    executor.shutdown(wait=True)
    assert not all(os.path.exists(m) for m in marks), "every item ran: none was cancelled"


def test_map_timeout_raises_timeout_error(executor, kind):
    # The tasks would finish (and map return) after 1.5 s: raising at all
    # means the deadline was honoured.
    with pytest.raises(TimeoutError) as info:
        list(executor.map(nap, [1.5, 1.5], timeout=0.2))
    if kind != "ppe":
        assert type(info.value) is hived.TaskTimeout
        assert isinstance(info.value, concurrent.futures.TimeoutError)


def test_map_raises_a_task_error_at_its_position(executor):
    results = executor.map(fail_at_3, range(6))
    assert [next(results) for _ in range(3)] == [0, 10, 20]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(results)


def test_map_of_a_lambda(executor, kind):
    if kind == "ppe":
        pytest.skip("ProcessPoolExecutor pickles by reference: a lambda cannot reach it")
    assert list(executor.map(lambda x: -x, range(5))) == [0, -1, -2, -3, -4]


# -- shutdown -----------------------------------------------------------------------


def test_submit_after_shutdown_raises_runtime_error(executor):
    executor.shutdown()
    with pytest.raises(RuntimeError):
        executor.submit(square, 2)
    with pytest.raises(RuntimeError):
        executor.map(square, [1])
    executor.shutdown()  # a second shutdown is harmless


def test_context_manager_waits_and_shuts_down(executor):
    with executor as ex:
        assert ex is executor
        future = ex.submit(nap_then, (0.2, "late"))
    assert future.done()
    assert future.result() == "late"
    with pytest.raises(RuntimeError):
        executor.submit(square, 2)


def test_shutdown_cancel_futures(executor):
    futures = [executor.submit(nap_then, (0.3, i)) for i in range(8)]
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    # The queued tail is cancelled; whatever had started (the executor's
    # choice, and a matter of timing) finished with its own result.
    assert futures[-1].cancelled()
    for i, future in enumerate(futures):
        if not future.cancelled():
            assert future.result() == i


def test_cancel_a_queued_future(executor):
    futures = [executor.submit(nap_then, (0.3, i)) for i in range(6)]
    assert futures[-1].cancel()
    assert futures[-1].cancelled() and futures[-1].done()
    # wait() and as_completed() count a cancelled future as done.
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done
    assert [f.result() for f in futures[:-1]] == list(range(5))
    with pytest.raises(concurrent.futures.CancelledError):
        futures[-1].result()
    assert len(list(concurrent.futures.as_completed(futures, timeout=30))) == 6


def test_shutdown_without_wait_returns_at_once(executor):
    future = executor.submit(nap_then, (0.3, "x"))
    executor.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        executor.submit(square, 2)
    # The future completes, one way or the other.
    concurrent.futures.wait([future], timeout=30)
    assert future.done()


# -- the module-level helpers ---------------------------------------------------------


def test_wait_and_as_completed(executor):
    futures = [executor.submit(square, i) for i in range(10)]
    done, not_done = concurrent.futures.wait(futures, timeout=30)
    assert not not_done and done == set(futures)
    assert sorted(f.result() for f in done) == [i * i for i in range(10)]

    slow = executor.submit(nap_then, (1.5, "slow"))
    fast = executor.submit(nap_then, (0.0, "fast"))
    done, _ = concurrent.futures.wait([slow, fast], timeout=30, return_when="FIRST_COMPLETED")
    assert fast in done

    futures = {executor.submit(square, i): i for i in range(10)}
    seen = [f.result() for f in concurrent.futures.as_completed(futures, timeout=30)]
    assert sorted(seen) == [i * i for i in range(10)]


def test_wait_first_exception(executor):
    futures = [executor.submit(fail_at_3, 3), executor.submit(nap_then, (1.0, "x"))]
    done, _ = concurrent.futures.wait(futures, timeout=30, return_when="FIRST_EXCEPTION")
    assert futures[0] in done
    assert isinstance(futures[0].exception(), ValueError)


def test_asyncio_wrap_future(executor):
    async def both():
        done = await asyncio.wrap_future(executor.submit(square, 6))
        with pytest.raises(ValueError, match="item 3 is bad"):
            await asyncio.wrap_future(executor.submit(fail_at_3, 3))
        return done

    assert asyncio.run(both()) == 36


def test_cancelling_a_queued_future_through_asyncio(executor, tmp_path):
    started = tmp_path / "started"
    blockers = [executor.submit(mark_then_nap, (str(started), 1.0, i)) for i in range(8)]
    queued = executor.submit(square, 7)

    async def cancel_it():
        wrapped = asyncio.wrap_future(queued)
        wrapped.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wrapped

    asyncio.run(cancel_it())
    wait_for(queued.done, 30, what="the queued future to be cancelled")
    assert queued.cancelled()
    assert [f.result(timeout=60) for f in blockers] == list(range(8))


def test_task_timeout_is_a_timeout_error():
    assert issubclass(hived.TaskTimeout, TimeoutError)
    assert issubclass(hived.TaskTimeout, concurrent.futures.TimeoutError)
    assert issubclass(hived.TaskTimeout, hived.HiveError)


# -- interpreter exit -------------------------------------------------------------------


def _run_script(kind: str, request, body: str) -> subprocess.CompletedProcess:
    """Run `body` in a fresh interpreter, with `ex` the executor of this row."""
    if kind == "ppe":
        make = "concurrent.futures.ProcessPoolExecutor(2)"
    elif kind == "embedded":
        make = "hived.connect('embedded')"
    else:
        make = f"hived.connect({request.getfixturevalue('daemon').address!r})"
    script = f"import concurrent.futures, hived, tasks\nex = {make}\n" + textwrap.dedent(body)
    here = os.path.dirname(os.path.abspath(__file__))
    env = child_env(PYTHONPATH=os.pathsep.join([here, child_env()["PYTHONPATH"]]))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("shutdown", ["", "ex.shutdown(wait=False)"])
def test_submitted_work_finishes_at_interpreter_exit(kind, request, tmp_path, shutdown):
    done = tmp_path / "done"
    run = _run_script(kind, request, f"""
        ex.submit(tasks.mark_then_nap, ({str(done)!r}, 0.5, None))
        {shutdown}
    """)
    assert run.returncode == 0, run.stderr
    assert done.exists()
    assert run.stderr == ""


def test_submit_after_interpreter_shutdown_raises_runtime_error(kind, request, tmp_path):
    run = _run_script(kind, request, """
        import atexit

        @atexit.register
        def too_late():
            try:
                ex.submit(tasks.nap, 0)
            except RuntimeError as exc:
                print(exc)
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "cannot schedule new futures after interpreter shutdown"
