"""Distributed maps on real daemons on test hosts (network namespaces).

    python benchmarks/mesh_maps.py            # all measurements
    python benchmarks/mesh_maps.py --only faults

Measures, with the default timings (heartbeat 0.5 s, dead_after 3 s,
lease 2 s), one CPU slot per node:

- throughput of 20,000 trivial tasks and the median single-task round trip,
  through one node alone and through a 3-host mesh (the client talks to one
  node, its owner);
- the stall of a running job when its coordinator is killed (largest gap
  between results against the normal gap), and how long a job submitted
  right after the kill waits for its first result;
- the extra time a job takes when a worker node is killed mid-job, against
  dead_after + the lost tasks' run time;
- 30 daemons running one 10,000-task job.

Needs root (network namespaces). Not named distributed.py: bench.py runs
from this folder and must import Dask's `distributed`, not us.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hived, hived.testing with it
sys.path.insert(0, HERE)

from benchtasks import burn, burn_where, identity  # noqa: E402

import hived  # noqa: E402
from hived.testing.meshnet import Cluster  # noqa: E402
from hived.testing.netns import TestNet, netns_available  # noqa: E402
from hived.testing.waiting import wait_for  # noqa: E402

DEFAULT = {"heartbeat": 0.5, "dead_after": 3.0, "lease": 2.0}


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def started(size: int, tmp: str, net: TestNet) -> Cluster:
    c = Cluster(net, tmp, voters=min(size, 3), timing=DEFAULT).start()
    wait_for(lambda: c.agreed_coordinator() is not None, 120, what="a coordinator")
    wait_for(lambda: all(len((n.status() or {"nodes": []})["nodes"]) == size for n in c.nodes), 120,
             what="full membership")
    return c


def stop(c: Cluster) -> None:
    for node in c.nodes:
        if node.alive():
            node.kill9()


def throughput_and_latency(size: int) -> tuple[float, float]:
    with TestNet(size) as net, tempfile.TemporaryDirectory() as tmp:
        c = started(size, tmp, net)
        try:
            with hived.connect(c[0].control) as h:
                list(h.map(identity, range(2000)))
                t = time.perf_counter()
                assert list(h.map(identity, range(20_000))) == list(range(20_000))
                rate = 20_000 / (time.perf_counter() - t)
                trips = []
                for i in range(300):
                    t = time.perf_counter()
                    h.submit(identity, i).result()
                    trips.append(time.perf_counter() - t)
            return rate, statistics.median(trips) * 1e6
        finally:
            stop(c)


def coordinator_kill() -> tuple[float, float, float]:
    """(normal gap, largest gap around the kill, first result of a new job), seconds."""
    with TestNet(3) as net, tempfile.TemporaryDirectory() as tmp:
        c = started(3, tmp, net)
        try:
            name, _ = c.agreed_coordinator()
            owner = next(n for n in c.nodes if n.name != name)
            with hived.connect(owner.control) as h:
                stamps = []
                # Unordered: the killed coordinator was also running a range of
                # this job, which waits for dead_after like any lost node's;
                # the question here is whether the others keep delivering.
                it = h.map(sleepy, [0.05] * 400, ordered=False)
                for i, _ in enumerate(it):
                    stamps.append(time.monotonic())
                    if i == 100:
                        c.node(name).kill9()
                        killed = time.monotonic()
                        with hived.connect(owner.control) as h2:
                            # a job submitted now waits for the new coordinator only
                            # to spread; its owner runs it meanwhile
                            first = h2.submit(sleepy, 0.0)
                            first.result()
                            new_job = time.monotonic() - killed
            gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            return statistics.median(gaps[:90]), max(gaps[95:]), new_job
        finally:
            stop(c)


def worker_death(task: float = 0.2, items: int = 60) -> tuple[float, float]:
    """(baseline s, with a worker node killed mid-job s)."""
    with TestNet(3) as net, tempfile.TemporaryDirectory() as tmp:
        c = started(3, tmp, net)
        try:
            name, _ = c.agreed_coordinator()
            owner = next(n for n in c.nodes if n.name != name)
            victim = next(n for n in c.nodes if n is not owner and n.name != name)
            with hived.connect(owner.control) as h:
                t = time.perf_counter()
                assert list(h.map(sleepy, [task] * items)) == [task] * items
                base = time.perf_counter() - t
                t = time.perf_counter()
                got = []
                for i, r in enumerate(h.map(sleepy, [task] * items)):
                    got.append(r)
                    if i == items // 3:
                        victim.kill9()
                assert got == [task] * items
                faulty = time.perf_counter() - t
            return base, faulty
        finally:
            stop(c)


def coordinator_traffic() -> list[tuple[int, int, int]]:
    """For payloads of growing size: (payload bytes per task, bytes the job's
    tasks carried, scheduling bytes the coordinator received)."""
    import numpy as np

    rows = []
    with TestNet(3) as net, tempfile.TemporaryDirectory() as tmp:
        c = started(3, tmp, net)
        try:
            name, _ = c.agreed_coordinator()
            coordinator = c.node(name)
            owner = next(n for n in c.nodes if n is not coordinator)

            def scheduling_in() -> int:
                # what it receives as coordinator; as a worker node it also pulls
                # ranges (S.RANGE), which is task data it runs, not matchmaking
                got = coordinator.status()["nodes"][0]["mesh_bytes_in"]
                return sum(got.get(kind, 0) for kind in ("S.OFFER", "S.WANT"))

            with hived.connect(owner.control) as h:
                for size in (1_000, 100_000, 1_000_000):
                    arrays = [np.zeros(size // 8) for _ in range(60)]
                    before = scheduling_in()
                    list(h.map(sleepy_nbytes, arrays, chunksize=1))
                    rows.append((size, 60 * size, scheduling_in() - before))
            return rows
        finally:
            stop(c)


def sleepy_nbytes(array) -> int:
    time.sleep(0.02)
    return array.nbytes


def thirty() -> tuple[float, int, float]:
    """(seconds for the job, how many worker processes ran it, one task's seconds)."""
    t = time.perf_counter()
    burn(20_000)
    one = time.perf_counter() - t
    with TestNet(30) as net, tempfile.TemporaryDirectory() as tmp:
        c = started(30, tmp, net)
        try:
            with hived.connect(c[0].control) as h:
                t = time.perf_counter()
                pids = list(h.map(burn_where, [20_000] * 10_000))
                assert len(pids) == 10_000
                return time.perf_counter() - t, len(set(pids)), one
        finally:
            stop(c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["speed", "traffic", "faults", "thirty"], action="append")
    args = parser.parse_args()
    todo = set(args.only or ["speed", "traffic", "faults", "thirty"])
    ok, why = netns_available()
    if not ok:
        sys.exit(f"mesh_maps: {why}")
    print(f"# timings: heartbeat {DEFAULT['heartbeat']} s, dead_after {DEFAULT['dead_after']} s, "
          f"lease {DEFAULT['lease']} s; 1 CPU slot per node")
    if "speed" in todo:
        one = throughput_and_latency(1)
        three = throughput_and_latency(3)
        print("| hive | 20,000 trivial tasks/s | submit round trip median µs |")
        print("|---|---|---|")
        print(f"| 1 node | {one[0]:,.0f} | {one[1]:,.0f} |")
        print(f"| 3 hosts | {three[0]:,.0f} | {three[1]:,.0f} |", flush=True)
    if "traffic" in todo:
        print("| payload per task | task data moved | OFFER + WANT bytes into the coordinator |")
        print("|---|---|---|")
        for size, moved, into in coordinator_traffic():
            print(f"| {size:,} B | {moved:,} B | {into:,} B |", flush=True)
    if "faults" in todo:
        normal, stall, new_job = coordinator_kill()
        print(f"coordinator kill -9 mid-job: normal gap between results {normal * 1000:.0f} ms, "
              f"largest gap {stall * 1000:.0f} ms (target: no stall); a job submitted at the kill had its "
              f"first result after {new_job:.2f} s (target <= 2 x lease = 4 s)", flush=True)
        base, faulty = worker_death()
        extra = faulty - base
        lost = 0.2  # one node's running task
        print(f"worker node kill -9 mid-job: {base:.2f} s -> {faulty:.2f} s, extra {extra:.2f} s "
              f"(target <= dead_after + lost tasks = {DEFAULT['dead_after'] + lost:.1f} s)", flush=True)
    if "thirty" in todo:
        took, workers, one = thirty()
        print(f"30 daemons, one 10,000-task job ({one * 1000:.1f} ms tasks, "
              f"{10_000 * one:.1f} s of CPU on 2 cores): {took:.2f} s, run by {workers} "
              f"worker processes", flush=True)


if __name__ == "__main__":
    main()
