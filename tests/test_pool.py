"""The local pool inside a real daemon: spawned workers, slots, recycling, GPUs."""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil
import pytest

import hived
from hived.node.resources import resolve_gpus
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for


def worker_pid(_: object = None) -> int:
    return os.getpid()


def visible_devices(_: object = None) -> tuple[int, str | None]:
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def window(seconds: float) -> tuple[float, float, int]:
    """The span this task ran, on the machine-wide monotonic clock."""
    began = time.monotonic()
    time.sleep(seconds)
    return began, time.monotonic(), os.getpid()


def hog(nbytes: int) -> int:
    """Allocate and touch `nbytes`, and keep them after returning."""
    block = bytearray(b"\x01") * nbytes
    sys.__dict__.setdefault("_hived_test_hog", []).append(block)
    return os.getpid()


def hog_and_stay(nbytes: int) -> int:
    block = bytearray(b"\x01") * nbytes
    time.sleep(60)
    return len(block)


def workers(daemon, n: int) -> list[int]:
    """The daemon's worker pids, once there are exactly `n` of them, all ready."""

    def settled() -> list[int] | None:
        pids = daemon.worker_pids()
        return pids if len(pids) == n else None

    return wait_for(settled, 30, what=f"{n} workers; log:\n{daemon.log}")


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "hived.toml"
    path.write_text(text)
    return str(path)


def test_one_spawned_worker_per_cpu_slot(make_daemon) -> None:
    daemon = make_daemon("--cpus", "3")
    pids = workers(daemon, 3)
    status = daemon.status()["nodes"][0]
    assert (status["cpus"], status["slots_free"]) == (3, 3)
    for pid in pids:
        proc = psutil.Process(pid)
        assert proc.ppid() == daemon.proc.pid
        cmdline = " ".join(proc.cmdline())
        # A fresh interpreter running the worker, not a fork of the daemon.
        assert "hived.node.worker" in cmdline
        assert "hived.daemon" not in cmdline
        assert os.path.realpath(proc.exe()) == os.path.realpath(sys.executable)
    with hived.connect(daemon.address) as h:
        seen = set(h.map(worker_pid, range(60), chunksize=1))
    assert seen <= set(pids)


def test_worker_killed_while_idle_is_replaced(daemon) -> None:
    before = workers(daemon, 2)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[int] | None:
        pids = daemon.worker_pids()
        return pids if len(pids) == 2 and victim not in pids else None

    after = wait_for(replaced, 30, what=f"the killed worker to be replaced; log:\n{daemon.log}")
    assert before[1] in after
    assert f"worker pid {victim} exited" in daemon.log
    with hived.connect(daemon.address) as h:
        assert set(h.map(worker_pid, range(20), chunksize=1)) <= set(after)
    assert daemon.status()["nodes"][0]["slots_free"] == 2


def test_max_tasks_per_worker_recycles(make_daemon, tmp_path) -> None:
    config = write_config(tmp_path, "[pool]\nmax_tasks_per_worker = 5\n")
    daemon = make_daemon("--config", config)
    workers(daemon, 2)
    with hived.connect(daemon.address) as h:
        pids = list(h.map(worker_pid, range(40), chunksize=1))
    counts = {pid: pids.count(pid) for pid in set(pids)}
    assert len(counts) > 2, counts
    assert max(counts.values()) <= 5, counts  # each worker retires after its fifth task
    assert len(counts) >= 8, counts
    workers(daemon, 2)  # the successors keep the slot count


def test_memory_limit_replaces_a_heavy_worker(make_daemon, tmp_path) -> None:
    # The limit is also checked every heartbeat while a task runs (the next
    # test), and touching 300 MB takes up to a second on a busy machine: a
    # slow heartbeat and a few retries keep that check out of this test's way.
    config = write_config(
        tmp_path,
        '[pool]\nmemory_limit = "200MB"\n[timing]\nheartbeat = 10.0\ndead_after = 30.0\n',
    )
    daemon = make_daemon("--config", config)
    workers(daemon, 2)
    with hived.connect(daemon.address) as h:
        (heavy,) = h.map(hog, [300 * 1024 * 1024], retries=5, timeout=60)

        def replaced() -> list[int] | None:
            pids = daemon.worker_pids()
            return pids if len(pids) == 2 and heavy not in pids else None

        wait_for(replaced, 30, what=f"the heavy worker {heavy} to be replaced; log:\n{daemon.log}")
        # A light task does not trip the limit and its worker stays.
        light = h.submit(hog, 1024).result(timeout=30)
        assert light in daemon.worker_pids()


def test_memory_limit_stops_a_task_that_keeps_growing(make_daemon, tmp_path) -> None:
    config = write_config(tmp_path, '[pool]\nmemory_limit = "200MB"\n')
    daemon = make_daemon("--config", config)
    workers(daemon, 2)
    with hived.connect(daemon.address) as h:
        results = h.map(hog_and_stay, [300 * 1024 * 1024], retries=0, timeout=60)
        with pytest.raises(hived.WorkerCrashed, match="memory_limit") as info:
            next(results)
        assert "testnode" in str(info.value)
        # The pool goes on serving.
        assert list(h.map(worker_pid, range(4))) and len(workers(daemon, 2)) == 2


def test_gpu_task_without_a_gpu_fails_clearly(daemon) -> None:
    with hived.connect(daemon.address) as h:
        with pytest.raises(hived.HiveUnavailable, match="ask for a GPU .* has 0"):
            list(h.map(visible_devices, range(2), gpus=1, timeout=30))
        # The pool still runs CPU tasks.
        assert len(list(h.map(worker_pid, range(4)))) == 4


def test_gpu_slot_gets_its_own_worker_with_cuda_visible_devices(make_daemon) -> None:
    daemon = make_daemon("--gpus", "1")
    (device,) = resolve_gpus(1, child_env())
    workers(daemon, 3)  # two CPU workers and one for the GPU
    status = daemon.status()["nodes"][0]
    assert status["gpus"] == 1
    with hived.connect(daemon.address) as h:
        on_gpu = list(h.map(visible_devices, range(6), gpus=1, chunksize=1, timeout=60))
        on_cpu = list(h.map(visible_devices, range(30), chunksize=1, timeout=60))
    gpu_pids = {pid for pid, _ in on_gpu}
    assert len(gpu_pids) == 1, on_gpu  # one worker per GPU
    assert {seen for _, seen in on_gpu} == {device}
    cpu_pids = {pid for pid, _ in on_cpu}
    assert not gpu_pids & cpu_pids, "a gpus=0 task ran on the GPU worker"
    # The GPUs belong to the GPU workers: CPU tasks see none.
    assert {seen for _, seen in on_cpu} == {""}


def test_two_cpu_tasks_run_one_at_a_time_on_two_slots(daemon) -> None:
    with hived.connect(daemon.address) as h:
        spans = list(h.map(window, [0.3] * 4, cpus=2, chunksize=1, timeout=60))
        refused = h.map(window, [0.1], cpus=3, timeout=30)
        with pytest.raises(hived.HiveUnavailable, match="3 CPUs"):
            next(refused)
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"cpus=2 tasks overlapped on a 2-slot node: {spans}"
