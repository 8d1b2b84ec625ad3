"""Native thread pools sized to the task: THREAD_LIMITS in the worker's environment.

A task reads os.environ in its worker: each variable equals the task's
`cpus` unless the worker inherited it (the embedded caller's environment,
or the daemon's), which is then left as it was.
"""

from __future__ import annotations

import os

import pytest

import hived
from hived.node.worker import THREAD_LIMITS
from hived.testing.childenv import child_env


def thread_limits(_=None):
    return {name: os.environ.get(name) for name in THREAD_LIMITS}


@pytest.fixture
def clean_env(monkeypatch):
    for name in THREAD_LIMITS:
        monkeypatch.delenv(name, raising=False)


def test_each_variable_is_the_tasks_cpus(clean_env) -> None:
    with hived.connect("embedded") as h:
        assert h.submit(thread_limits).result(timeout=30) == dict.fromkeys(THREAD_LIMITS, "1")
        (two,) = h.map(thread_limits, [None], cpus=2)
        assert two == dict.fromkeys(THREAD_LIMITS, "2")
        # and back: a worker that ran a 2-CPU task runs a 1-CPU one with 1
        assert list(h.map(thread_limits, range(4))) == [dict.fromkeys(THREAD_LIMITS, "1")] * 4


def test_what_the_caller_set_is_left_alone(clean_env, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with hived.connect("embedded") as h:
        (seen,) = h.map(thread_limits, [None], cpus=2)
    assert seen == {**dict.fromkeys(THREAD_LIMITS, "2"), "OMP_NUM_THREADS": "7"}


def test_through_a_daemon_the_daemons_environment_decides(clean_env, make_daemon) -> None:
    daemon = make_daemon(env=child_env(MKL_NUM_THREADS="3"))
    with hived.connect(daemon.address) as h:
        (seen,) = h.map(thread_limits, [None], cpus=2)
    assert seen == {**dict.fromkeys(THREAD_LIMITS, "2"), "MKL_NUM_THREADS": "3"}
