"""Membership and election at scale, on the simulated network (sans-IO cores).

    python benchmarks/sim_scale.py                      # 10, 100 and 1,000 nodes
    python benchmarks/sim_scale.py --sizes 100 --kills 10

Every node runs the daemon's own `MeshCore` (membership and election wired
as in the daemon) through the daemon's `MeshDriver`; hived.testing.simnet drives
them with a manual millisecond clock, clock rates skewed within the 1% drift
bound, 0.5-5 ms latency, no loss. With the default timings (heartbeat 0.5,
dead_after 3.0, lease 2.0) and the first three nodes as seeds (voters), all
nodes start at t=0 and it prints, in simulated seconds:

  converge   until every node sees every other node alive
  elected    until the first node holds the lease (>= one lease: every voter
             grants nothing for one lease after it starts)
  agreed     until every node names that coordinator
  failover   median time from kill -9 of the coordinator to a new coordinator
             agreed by every live node (over --kills kills)

and, in steady state over --window seconds, each node's heartbeat traffic
(membership messages: BEATs, HELLOs) in messages/s and bytes/s, the bytes
counted with wire.encode on a sample of nodes, plus the coordinator's
election traffic (its LEADER announcements to every node and renewal asks). Per-node traffic is (N-1) BEATs per heartbeat of a constant
size, so it grows linearly with N; "per peer" shows it is flat.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's hived, hived.testing with it

from hived.testing.simnet import SimNet  # noqa: E402

HEARTBEAT, DEAD_AFTER, LEASE = 0.5, 3.0, 2.0
STEP = 0.05  # how often (simulated seconds) the run checks its stop condition


def run_until(net: SimNet, stop, limit: float) -> float | None:
    """Advance in steps until `stop()`; the simulated time it took, or None."""
    start = net.now
    while net.now - start < limit:
        net.run_for(STEP)
        if stop():
            return net.now - start
    return None


def measure(n: int, voters: int, kills: int, window: float, seed: int) -> dict:
    wall = time.perf_counter()
    net = SimNet.cluster(
        n, voters=voters, seed=seed, heartbeat=HEARTBEAT, dead_after=DEAD_AFTER, lease=LEASE,
        check=False,
    )  # fmt: skip
    row: dict = {"n": n}
    converged = elected = agreed = None
    while net.now < 60.0 and (converged is None or agreed is None):
        net.run_for(STEP)
        if converged is None and net.converged():
            converged = net.now
        if elected is None and net.elections:
            elected = net.elections[0][0]
        if elected is not None and agreed is None and net.agreed() is not None:
            agreed = net.now
    row.update(converge=converged, elected=elected, agreed=agreed)

    # steady-state traffic, metered on every node, bytes on a sample. The
    # election's messages are counted from agreement on (renewals come every
    # hold/3, so a short window would catch one or two); heartbeats in the window.
    coordinator = net.agreed()[0] if net.agreed() else None
    sample = [name for name in list(net.nodes)[:: max(1, n // 20)] if name != coordinator]
    net.meter_bytes_for = set(sample)
    net.meter_on = True
    started = net.now
    net.run_for(HEARTBEAT)
    before, before_bytes = dict(net.sent), dict(net.sent_bytes)
    net.run_for(window)
    net.meter_on = False
    sent = {k: v - before.get(k, 0) for k, v in net.sent.items()}
    sent_bytes = {k: v - before_bytes.get(k, 0) for k, v in net.sent_bytes.items()}
    member_msgs = sum(v for k, v in sent.items() if k[1].startswith(b"M.")) / n / window
    sample_bytes = sum(v for k, v in sent_bytes.items() if k[1].startswith(b"M."))
    sample_beats = [
        (sent_bytes.get((s, b"M.BEAT"), 0), sent.get((s, b"M.BEAT"), 0)) for s in sample
    ]
    coord = sum(v for k, v in net.sent.items() if k[0] == coordinator and k[1].startswith(b"E."))
    row.update(
        msgs=member_msgs,
        bytes=sample_bytes / len(sample) / window,
        per_peer=member_msgs / (n - 1),
        beat_bytes=sum(b for b, _ in sample_beats) / max(1, sum(c for _, c in sample_beats)),
        coord_msgs=coord / (net.now - started),
    )

    # failover: kill -9 the coordinator, time until all live nodes agree anew
    times = []
    for kill in range(kills):
        current = net.agreed()
        if current is None:
            break
        net.kill(current[0])
        took = run_until(net, lambda c=current: net.agreed() not in (None, c), 6 * LEASE)
        if took is None:
            break
        times.append(took)
        if kill == kills - 1:
            break
        net.restart(current[0])
        run_until(net, lambda: net.converged() and net.agreed() is not None, 30.0)
    row["failover"] = statistics.median(times) if times else None
    row["failovers"] = len(times)
    row["wall"] = time.perf_counter() - wall
    row["events"] = net.delivered
    return row


def fmt(value, spec=".2f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--voters", type=int, default=3)
    parser.add_argument("--kills", type=int, default=None,
                        help="coordinator kills per size (default 10, 1 from 1,000 nodes)")  # fmt: skip
    parser.add_argument("--window", type=float, default=1.0, help="traffic window, sim seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # a million peer records and no reference cycles: the cyclic collector
    # would only rescan them over and over
    gc.disable()

    print(f"timings: heartbeat {HEARTBEAT}s, dead_after {DEAD_AFTER}s, lease {LEASE}s; "
          f"{args.voters} voters (seeds); times in simulated seconds from a cold start")  # fmt: skip
    head = (
        f"{'nodes':>6} {'converge':>8} {'elected':>8} {'agreed':>7} {'failover':>9} "
        f"{'hb msg/s':>9} {'hb B/s':>9} {'msg/s/peer':>10} {'B/BEAT':>7} "
        f"{'coord E/s':>11} {'wall s':>7}"
    )
    print(head)
    rows = []
    for n in args.sizes:
        kills = args.kills if args.kills is not None else (10 if n < 1000 else 1)
        row = measure(n, min(args.voters, n), kills, args.window, args.seed)
        rows.append(row)
        print(
            f"{n:>6} {fmt(row['converge']):>8} {fmt(row['elected']):>8} {fmt(row['agreed']):>7} "
            f"{fmt(row['failover']):>6}/{row['failovers']:<2} {row['msgs']:>9.1f} "
            f"{row['bytes']:>9.0f} {row['per_peer']:>10.3f} {row['beat_bytes']:>7.0f} "
            f"{row['coord_msgs']:>11.1f} {row['wall']:>7.1f}",
            flush=True,
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last["bytes"] / first["bytes"]) / ((last["n"] - 1) / (first["n"] - 1))
        print(f"per-node heartbeat bytes/s grew {last['bytes'] / first['bytes']:.1f}x from "
              f"{first['n']} to {last['n']} nodes, {growth:.2f}x of linear in (N-1)")  # fmt: skip


if __name__ == "__main__":
    main()
