"""joblib's backend "hived": scikit-learn's n_jobs on the hive, and batching.

GridSearchCV(n_jobs=-1) under parallel_config("hived") must find what a
serial run finds, on an embedded hive, through a daemon, and across three
test hosts (real daemons in network namespaces, one CPU slot each), where
the work must have run on more than one node.
"""

from __future__ import annotations

import time

import pytest
from test_distributed import running_cluster

joblib = pytest.importorskip("joblib")
sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import GridSearchCV  # noqa: E402
from sklearn.svm import SVC  # noqa: E402

import hived  # noqa: E402
import hived.joblib  # noqa: E402
from hived.joblib import HiveBackend  # noqa: E402

GRID = {"C": [0.1, 1.0, 10.0], "gamma": [0.0005, 0.002]}


def grid_search(n_jobs: int) -> GridSearchCV:
    X, y = load_digits(return_X_y=True)
    return GridSearchCV(SVC(), GRID, cv=3, n_jobs=n_jobs).fit(X[:600], y[:600])


def same_search(a: GridSearchCV, b: GridSearchCV) -> None:
    assert a.best_params_ == b.best_params_
    assert list(a.cv_results_["mean_test_score"]) == list(b.cv_results_["mean_test_score"])
    assert list(a.cv_results_["params"]) == list(b.cv_results_["params"])


@pytest.fixture
def counted_submits(monkeypatch) -> list[int]:
    """How many times the backend submitted (one per joblib batch)."""
    count = [0]
    submit = HiveBackend.submit

    def counting(self, func, callback=None):
        count[0] += 1
        return submit(self, func, callback)

    monkeypatch.setattr(HiveBackend, "submit", counting)
    return count


@pytest.fixture(autouse=True)
def fresh_hives():
    """Each test connects anew; the hives it made are shut down after it."""
    yield
    for hive in hived.joblib._hives.values():
        hive.shutdown()
    hived.joblib._hives.clear()


def test_grid_search_on_an_embedded_hive_equals_a_serial_run(monkeypatch, counted_submits) -> None:
    monkeypatch.setenv("HIVED_ADDRESS", "embedded")
    serial = grid_search(n_jobs=1)
    with joblib.parallel_config("hived"):
        on_hive = grid_search(n_jobs=-1)
    same_search(serial, on_hive)
    assert counted_submits[0] > 0  # it ran on the hive, not in this process


def test_grid_search_through_a_daemon(daemon) -> None:
    serial = grid_search(n_jobs=1)
    with joblib.parallel_config("hived", address=daemon.address):
        on_hive = grid_search(n_jobs=-1)
    same_search(serial, on_hive)
    row = daemon.status()["nodes"][0]
    assert row["tasks_done"] >= 1


def test_a_thousand_tiny_calls_go_in_batches(monkeypatch, counted_submits) -> None:
    monkeypatch.setenv("HIVED_ADDRESS", "embedded")
    with joblib.parallel_config("hived"):
        joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(10))  # the hive is up
        counted_submits[0] = 0
        began = time.perf_counter()
        got = joblib.Parallel()(joblib.delayed(abs)(-i) for i in range(1000))
        took = time.perf_counter() - began
    assert got == list(range(1000))
    assert counted_submits[0] <= 200, counted_submits[0]  # joblib's auto-batching
    print(f"1,000 calls in {counted_submits[0]} batches, {took * 1000:.0f} ms")


def test_n_jobs_minus_one_is_every_slot(monkeypatch) -> None:
    monkeypatch.setenv("HIVED_ADDRESS", "embedded")
    monkeypatch.setenv("HIVED_CPUS", "3")
    backend = HiveBackend()
    assert backend.effective_n_jobs(-1) == 3
    assert backend.effective_n_jobs(-2) == 2
    assert backend.effective_n_jobs(-10) == 1
    assert backend.effective_n_jobs(5) == 5
    with pytest.raises(ValueError):
        backend.effective_n_jobs(0)


def fails_on_three(x):
    if x == 3:
        raise KeyError(x)
    return x


def test_a_task_error_is_raised_with_its_own_type(monkeypatch) -> None:
    monkeypatch.setenv("HIVED_ADDRESS", "embedded")
    with joblib.parallel_config("hived"), pytest.raises(KeyError):
        joblib.Parallel()(joblib.delayed(fails_on_three)(i) for i in range(8))


def test_grid_search_across_test_hosts_runs_on_more_than_one_node(testnet) -> None:
    serial = grid_search(n_jobs=1)
    with running_cluster(testnet) as c:
        with joblib.parallel_config("hived", address=c[0].control):
            on_hive = grid_search(n_jobs=-1)
        done = {n.name: n.status()["nodes"][0]["tasks_done"] for n in c.nodes}
    same_search(serial, on_hive)
    assert sum(1 for count in done.values() if count) >= 2, done
    print(f"batches run per node: {done}")
