"""What the loss of a client's node (its jobs' owner) costs a running map.

    python benchmarks/owner_loss.py [--runs 5] [--tasks 400] [--task-seconds 0.03]

Three test hosts with a hived each (default timings: heartbeat 0.5 s,
dead_after 3 s, lease 2 s; one CPU slot each) and a fourth host with the
client, which talks over TCP (CURVE) to the first node. Each run maps
`--tasks` tasks of `--task-seconds` twice on a fresh hive: once undisturbed,
once with that node killed (kill -9) a third of the way through. It prints
per run the two map times, the longest gap between results (the stall the
failover causes; the target is dead_after + the longest task + one
heartbeat), and how many tasks ran twice (each run of a task leaves a mark
in a file all hosts share), then the medians with min–max.

Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hived, hived.testing with it

from hived.testing.meshnet import Cluster  # noqa: E402
from hived.testing.netns import TestNet, netns_available  # noqa: E402
from hived.testing.waiting import wait_for  # noqa: E402

DEFAULT = {"heartbeat": 0.5, "dead_after": 3.0, "lease": 2.0}


def marked(args: tuple[int, float, str]) -> int:
    """x², after `seconds`, leaving a mark of this run in `marks`."""
    x, seconds, marks = args
    time.sleep(seconds)
    with open(marks, "a") as f:
        f.write(f"{x}\n")
    return x * x


def client(address: str, tasks: int, seconds: float, marks: str) -> None:
    """The client's side (run on its own host): a line per result, with its time."""
    import hived

    with hived.connect(address) as h:
        began = time.monotonic()
        inputs = [(x, seconds, marks) for x in range(tasks)]
        for i, value in enumerate(h.map(marked, inputs)):
            assert value == i * i, (i, value)
            print(f"{time.monotonic() - began:.4f}", flush=True)


def run_map(c: Cluster, tmp: str, tasks: int, seconds: float, kill: bool) -> tuple[float, float, int]:
    """Map time, longest gap between results, tasks run more than once."""
    marks = os.path.join(tmp, f"marks-{time.monotonic_ns()}")
    open(marks, "w").close()
    os.chmod(marks, 0o666)
    args = [sys.executable, __file__, "--client", c[0].address, str(tasks), str(seconds), marks]
    env = {**os.environ, "HIVED_KEY_FILE": c.key_path,
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE),
                                                      os.environ.get("PYTHONPATH")]))}
    proc = c.net[3].popen(args, env=env, stdout=subprocess.PIPE, text=True)
    times = []
    for line in proc.stdout:
        times.append(float(line))
        if kill and len(times) == tasks // 3:
            c[0].kill9()
    if proc.wait(120) != 0 or len(times) != tasks:
        raise RuntimeError(f"the client failed ({len(times)} results)\n{c.logs()}")
    with open(marks) as f:
        ran = f.read().split()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return times[-1], max(gaps), len(ran) - len(set(ran))


def one_run(tasks: int, seconds: float) -> tuple[float, float, float, int]:
    with TestNet(4) as net, tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        c = Cluster(net, tmp, voters=3, timing=DEFAULT)
        for node in c.nodes[:3]:
            node.start()
        try:
            wait_for(lambda: c.agreed_coordinator(c.nodes[:3]) is not None, 60, what="a coordinator")
            wait_for(lambda: all(len((n.status() or {"nodes": []})["nodes"]) == 3
                                 for n in c.nodes[:3]), 60, what="full membership")
            base, _, _ = run_map(c, tmp, tasks, seconds, kill=False)
            took, stall, twice = run_map(c, tmp, tasks, seconds, kill=True)
            return base, took, stall, twice
        finally:
            for node in c.nodes[:3]:
                if node.alive():
                    node.kill9()


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--task-seconds", type=float, default=0.03)
    opts = parser.parse_args()
    ok, why = netns_available()
    if not ok:
        sys.exit(f"owner_loss: {why}")
    rows = []
    print("run  undisturbed s  owner killed s  extra s  longest gap s  ran twice")
    for i in range(opts.runs):
        base, took, stall, twice = one_run(opts.tasks, opts.task_seconds)
        rows.append((base, took, took - base, stall, twice))
        print(f"{i + 1:>3}  {base:13.2f}  {took:14.2f}  {took - base:7.2f}  {stall:13.2f}  {twice:9d}")
    target = DEFAULT["dead_after"] + opts.task_seconds + DEFAULT["heartbeat"]
    columns = list(zip(*rows, strict=True))
    print(f"median (min–max) over {opts.runs} runs: undisturbed {spread(columns[0])} s, "
          f"owner killed {spread(columns[1])} s, extra {spread(columns[2])} s, "
          f"longest gap {spread(columns[3])} s (target {target:.2f} s), "
          f"ran twice {spread(columns[4], '{:.0f}')}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client"]:
        client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    else:
        main()
