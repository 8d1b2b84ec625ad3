"""CPython's own concurrent.futures tests, run with `hived.Hive` as the executor.

Run as `python tests/cpython_suite.py OUT.json` under an interpreter whose
standard library ships `test.test_concurrent_futures` (a package from 3.13
on, one file before). It takes the generic test classes as installed (the
ones CPython runs against every ProcessPoolExecutor start method), mixes in
`HiveMixin` where CPython mixes in its executor, runs them with unittest and
writes what happened to OUT.json; tests/test_cpython_suite.py checks it.

Only tests that read ProcessPoolExecutor's inside are left out, each in
LEFT_OUT with its reason. Imported (not run) by the interpreters those
tests start, it makes `from concurrent.futures import HiveExecutor` work.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import sys
import time
import unittest
from concurrent import futures
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this tree's hived, installed or not

import hived  # noqa: E402


class HiveExecutor(hived.Hive):
    """An embedded hive, made the way the tests make a ProcessPoolExecutor
    (hived sizes its pool itself: max_workers, mp_context and
    max_tasks_per_child are ignored)."""

    def __init__(
        self, max_workers: int | None = None, mp_context: Any = None, *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        super().__init__("embedded")


# The tests' child interpreters import the executor by name from here.
futures.HiveExecutor = HiveExecutor  # type: ignore[attr-defined]

# The generic classes CPython mixes with each of its process pool mixins.
GENERIC = [
    "ProcessPoolExecutorTest",  # with ExecutorTest
    "ProcessPoolShutdownTest",  # with ExecutorShutdownTest
    "ExecutorDeadlockTest",
    "WaitTests",
    "AsCompletedTests",
]
# Where each lives in the 3.13 package (3.10 and 3.11: all in one module).
PACKAGE_MODULES = {
    "ProcessPoolExecutorTest": "test_process_pool",
    "ProcessPoolShutdownTest": "test_shutdown",
    "ExecutorDeadlockTest": "test_deadlock",
    "WaitTests": "test_wait",
    "AsCompletedTests": "test_as_completed",
}

_PROCESSES = "reads executor._processes (ProcessPoolExecutor's own processes)"
LEFT_OUT = {
    "test_killed_child": _PROCESSES + " (tests/test_pool.py kills hived's workers)",
    "test_saturation": _PROCESSES + " and executor._max_workers",
    "test_idle_process_reuse_one": _PROCESSES,
    "test_idle_process_reuse_multiple": _PROCESSES,
    "test_max_tasks_per_child": _PROCESSES,
    "test_processes_terminate": _PROCESSES,
    "test_context_manager_shutdown": _PROCESSES,
    "test_del_shutdown": _PROCESSES + ", _call_queue and _executor_manager_thread",
    "test_shutdown_no_wait": _PROCESSES + ", _call_queue and _executor_manager_thread",
    "test_max_tasks_per_child_defaults_to_spawn_context": "reads executor._mp_context",
    "test_shutdown_deadlock_pickle": "joins executor._executor_manager_thread",
    "test_gh105829_should_not_deadlock_if_wakeup_pipe_full": (
        "patches ProcessPoolExecutor's _ExecutorManagerThread and _ThreadWakeup"
    ),
    "test_python_finalization_error": (
        "patches threading to fail the second thread ProcessPoolExecutor starts "
        "(its queue feeder): which thread that is, is its inside"
    ),
    "test_traceback": (
        "asserts the cause is concurrent.futures.process._RemoteTraceback, "
        "ProcessPoolExecutor's private class (hived's is hived.errors.RemoteError; "
        "tests/test_contract.py checks the source line is in it)"
    ),
    "test_max_workers_negative": (
        "checks ProcessPoolExecutor's own max_workers check; Hive takes no max_workers "
        "(this adapter ignores it)"
    ),
}
# Not run at all: no generic class (listed in OUT.json with the counts).
NOT_GENERIC = {
    "test_init": (
        "initializer/initargs are a ProcessPoolExecutor constructor option, not part "
        "of Executor, and Hive has none; the failing-initializer tests also read "
        "executor._broken"
    ),
    "test_future": "tests concurrent.futures.Future alone, no executor",
    "test_thread_pool": "ThreadPoolExecutor's own tests",
}


def _import_suite() -> tuple[str, Any, dict[str, type]]:
    """The form ('package' or 'file'), the module of the tests' base classes
    (BaseTestCase, ExecutorMixin) and the generic classes by name."""
    package = importlib.import_module("test.test_concurrent_futures")
    if not hasattr(package, "__path__"):
        return "file", package, {name: getattr(package, name) for name in GENERIC}
    classes = {
        name: getattr(importlib.import_module(f"{package.__name__}.{module}"), name)
        for name, module in PACKAGE_MODULES.items()
    }
    return "package", importlib.import_module(f"{package.__name__}.util"), classes


class HiveMixin:
    """In the place of CPython's ProcessPoolSpawnMixin."""

    executor_type = HiveExecutor
    worker_count = 5  # what the tests assume of their pool; hived sizes its own

    def get_context(self) -> Any:
        # For the objects the tests share with tasks (Manager, Semaphore),
        # and the mp_context they pass (ignored). No `ctx` attribute: the
        # tests then build the executor as they build a ThreadPoolExecutor.
        return multiprocessing.get_context("spawn")


def _with_hive(run: Any) -> Any:
    """assert_python_ok whose interpreter can import HiveExecutor from concurrent.futures."""

    def run_with_hive(flag: str, script: str, *args: Any, **env: Any) -> Any:
        prologue = f"import sys; sys.path.insert(0, {HERE!r}); import cpython_suite\n"
        return run(flag, prologue + script, *args, **env)

    return run_with_hive


def build(util: Any, classes: dict[str, type]) -> tuple[unittest.TestSuite, dict[str, str]]:
    """The suite of Hive test cases, and the tests left out (name: reason)."""
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    left_out: dict[str, str] = {}
    patched = set()
    for name, mixin in classes.items():
        module = sys.modules[mixin.__module__]
        if hasattr(module, "assert_python_ok") and module not in patched:
            module.assert_python_ok = _with_hive(module.assert_python_ok)
            patched.add(module)
        # In the tests' own module: unittest runs its setUpModule, as CPython's runs do.
        attrs = {"__module__": module.__name__}
        for test in loader.getTestCaseNames(mixin):
            if test in LEFT_OUT:
                attrs[test] = unittest.skip(f"left out: {LEFT_OUT[test]}")(getattr(mixin, test))
                left_out[f"{name}.{test}"] = LEFT_OUT[test]
        case = type(f"Hive{name}", (mixin, HiveMixin, util.ExecutorMixin, util.BaseTestCase), attrs)
        suite.addTests(loader.loadTestsFromTestCase(case))
    return suite, left_out


class _Record(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passed: list[str] = []

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.passed.append(_name(test))


def _name(test: Any) -> str:
    return f"{type(test).__name__.removeprefix('Hive')}.{test._testMethodName}"


def main(out: str) -> None:
    form, util, classes = _import_suite()
    suite, left_out = build(util, classes)
    began = time.monotonic()
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2, resultclass=_Record)
    result = runner.run(suite)
    skipped = {_name(t): why for t, why in result.skipped if not why.startswith("left out: ")}
    report = {
        "python": sys.version.split()[0],
        "form": form,
        "seconds": round(time.monotonic() - began, 1),
        "collected": result.testsRun,
        "ran": result.testsRun - len(result.skipped),
        "passed": sorted(result.passed),
        "left_out": left_out,
        "skipped_by_cpython": skipped,
        "not_generic": NOT_GENERIC,
        "failures": [[_name(t), tb] for t, tb in result.failures + result.errors],
        "unexpected_successes": [_name(t) for t in result.unexpectedSuccesses],
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
