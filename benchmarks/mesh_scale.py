"""Membership convergence, election and failover times of real daemons.

    python benchmarks/mesh_scale.py                  # 3, 5 and 30 daemons, 10 failovers
    python benchmarks/mesh_scale.py --sizes 3 --kills 20

Each daemon runs on a test host of its own (a network namespace on this
machine, CURVE on), with the default timings (heartbeat 0.5 s, dead_after
3 s, lease 2 s) unless --fast. Three seeds are the voters. Figures:

- up:       from starting the daemons until every one answers (30 interpreters
            starting at once on 2 cores take most of this)
- converge: from every daemon answering until every node lists every node alive
- elect:    from every daemon answering until every node names one coordinator
- failover: kill -9 of the coordinator until every survivor names a new one
            (median and max over --kills kills; the killed node is restarted
            and the cluster settles between kills)

Needs root (network namespaces).
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

from hived.testing.meshnet import Cluster  # noqa: E402
from hived.testing.netns import TestNet, netns_available  # noqa: E402

DEFAULT = {"heartbeat": 0.5, "dead_after": 3.0, "lease": 2.0}


def until(predicate, timeout: float, step: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"not within {timeout}s")
        time.sleep(step)
    return time.monotonic()


def full_view(c: Cluster) -> bool:
    names = {n.name for n in c.nodes}
    for node in c.nodes:
        view = node.status(timeout=0.5)
        if view is None or {r["name"] for r in view["nodes"] if r["state"] == "alive"} != names:
            return False
    return True


def measure(size: int, kills: int, timing: dict[str, float]) -> dict[str, float]:
    with TestNet(size) as net, tempfile.TemporaryDirectory(prefix="hived-scale-") as tmp:
        c = Cluster(net, tmp, voters=3, timing=timing)
        launched = time.monotonic()
        c.start()
        try:
            step = 0.05 if size < 10 else 0.25
            started = until(lambda: all(n.status(timeout=0.5) for n in c.nodes), 120, step)
            converged = until(lambda: full_view(c), 120, step) - started
            elected = until(lambda: c.agreed_coordinator() is not None, 60, step) - started
            failovers = []
            for _ in range(kills):
                name, term = c.agreed_coordinator()
                victim = c.node(name)
                rest = [n for n in c.nodes if n is not victim]
                t0 = time.monotonic()
                victim.kill9()
                until(lambda rest=rest, name=name: (c.agreed_coordinator(rest) or (name,))[0] != name,
                      60, 0.02)
                failovers.append(time.monotonic() - t0)
                victim.start()
                until(lambda: full_view(c) and c.agreed_coordinator() is not None, 120, step)
        finally:
            for node in c.nodes:
                if node.alive():
                    node.kill9()
    out = {"up": started - launched, "converge": converged, "elect": max(elected, 0.0)}
    if failovers:
        out["failover_median"] = statistics.median(failovers)
        out["failover_max"] = max(failovers)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 30])
    parser.add_argument("--kills", type=int, default=10, help="failovers measured per size (0 for none)")
    parser.add_argument("--kills-up-to", type=int, default=5, help="measure failovers only for sizes up to this")
    args = parser.parse_args()
    ok, why = netns_available()
    if not ok:
        sys.exit(f"mesh_scale: {why}")
    t = DEFAULT
    print(f"# timings: heartbeat {t['heartbeat']} s, dead_after {t['dead_after']} s, lease {t['lease']} s; "
          f"failover target 2 x lease + heartbeat = {2 * t['lease'] + t['heartbeat']:.1f} s")
    print("| daemons | up s | converge s | elect s | failover median s | failover max s |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        kills = args.kills if size <= args.kills_up_to else 0
        r = measure(size, kills, t)
        fm = f"{r['failover_median']:.2f}" if "failover_median" in r else "–"
        fx = f"{r['failover_max']:.2f}" if "failover_max" in r else "–"
        print(f"| {size} | {r['up']:.2f} | {r['converge']:.2f} | {r['elect']:.2f} | {fm} | {fx} |",
              flush=True)


if __name__ == "__main__":
    main()
