"""One contract suite for the concurrent.futures.Executor interface.

Every test runs against `ProcessPoolExecutor(2)` (the reference), an embedded
hive and a hive reached through a real `hived` subprocess, and asserts only
what the Executor contract promises, so a difference between the rows is a
bug in hived (or a deviation this file names).

Task functions are module level: ProcessPoolExecutor (fork) finds them by
name in its children, and hived pickles this module's functions by value.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import re
from collections.abc import Iterator

import pytest
from tasks import nap, nap_then

import hived

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
    futures = [executor.submit(fail_at_3, 3) for _ in range(2)]
    first, second = (f.exception(timeout=30) for f in futures)
    assert isinstance(first, ValueError) and isinstance(second, ValueError)
    assert first is not second


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


def test_task_timeout_is_a_timeout_error():
    assert issubclass(hived.TaskTimeout, TimeoutError)
    assert issubclass(hived.TaskTimeout, concurrent.futures.TimeoutError)
    assert issubclass(hived.TaskTimeout, hived.HiveError)
