"""The long fault campaign: hived.testing.campaign for many minutes, then the figures.

    sudo python3 benchmarks/campaign.py --minutes 30 [--seed N]

One seeded schedule over the whole run (same seed, same schedule), against
five daemons in network namespaces with two clients mapping throughout; at
the end: faults applied by kind, maps and results checked, lost, duplicated,
overlapping leases, silent daemons, heal times. Exits 1 on any violation,
after printing the seed, the schedule, the history, the violations and the
daemons' log tails.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout

from hived.testing.campaign import FAULTS, HEAL_BOUND, Report, run_campaign  # noqa: E402
from hived.testing.netns import TestNet, netns_available  # noqa: E402


def figures(report: Report) -> str:
    c = report.counts
    heals = [t for _, t in report.heal_times if t is not None]
    unhealed = sum(t is None for _, t in report.heal_times)
    lines = [
        f"seed {report.seed} (replay: --seed {report.seed})",
        "faults applied: " + ", ".join(f"{k} {c[f'fault {k}']}" for k in FAULTS),
        f"maps: {c['maps']} ({c['maps_ok']} whole, {c['unavailable']} HiveUnavailable with"
        f" their owner killed or paused, {c['errors']} other errors)",
        f"results checked: {c['results']}; lost {c['lost']}, duplicated {c['duplicated']},"
        f" wrong {c['wrong']}",
        f"leases: {c['leases']}, overlapping {c['overlaps']}",
        f"status probes: {c['probes']}, silent (daemon up, no answer in 2 s) {c['silent']}",
    ]
    if heals:
        lines.append(f"heal times (heal -> one coordinator): median {statistics.median(heals):.2f}s,"
                     f" {min(heals):.2f}-{max(heals):.2f}s over {len(heals)} heals"
                     f"{f', {unhealed} not healed before the next fault' if unhealed else ''}")
    final = f"{report.final_heal:.2f}s" if report.final_heal is not None else "never"
    lines.append(f"after the last heal: {final} (bound {HEAL_BOUND:.1f}s)")
    lines.append(f"violations: {len(report.violations)}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    args = parser.parse_args()
    ok, why = netns_available()
    if not ok:
        print(f"campaign: {why}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    with TestNet(5) as net, tempfile.TemporaryDirectory(prefix="hived-campaign-") as tmp:
        report = run_campaign(net, seed, args.minutes * 60, tmp)
    if not report.ok:
        print(report.failure_text())
    print(figures(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
