"""A 10-million-item map over a generator: the caller's memory as it goes.

    python benchmarks/flat_rss.py              # 10,000,000 items
    python benchmarks/flat_rss.py --items 2000000

Each engine runs in a fresh interpreter of its own (so its peak RSS is its
own), 2 workers, mapping a trivial function over a generator and consuming
the results as they come. It prints the caller's RSS after every tenth of
the items and its peak (getrusage), for hived's map with its default
chunking (a generator's chunks settle at MAX_UNSIZED_CHUNK items) and for
multiprocessing.Pool.imap with that same chunksize. Pool.imap's feeder
thread is held back by its pipe's buffer, hived's stream by its window of
chunks; both should stay flat, and the peak says what each costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

CHILD = r"""
import json, multiprocessing as mp, os, resource, sys, time
sys.path[:0] = [{repo!r}, {here!r}]
from benchtasks import identity
from hived.caller.mapping import MAX_UNSIZED_CHUNK

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def run(results, n):
    marks, step, t = [], max(n // 10, 1), time.perf_counter()
    for i, value in enumerate(results, 1):
        if i % step == 0:
            marks.append(rss())
    assert i == n
    return marks, time.perf_counter() - t

if __name__ == "__main__":
    engine, n = sys.argv[1], int(sys.argv[2])
    items = (i for i in range(n))
    base = rss()
    if engine == "hived":
        import hived
        h = hived.connect("embedded", cpus=2)
        h.submit(identity, 0).result()
        base = rss()
        marks, seconds = run(h.map(identity, items), n)
        h.shutdown()
    else:
        pool = mp.get_context("fork").Pool(2)
        pool.apply(identity, (0,))
        base = rss()
        marks, seconds = run(pool.imap(identity, items, chunksize=MAX_UNSIZED_CHUNK), n)
        pool.terminate()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(base=base, marks=marks, peak=peak, seconds=seconds,
                          chunk=MAX_UNSIZED_CHUNK)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=10_000_000)
    args = parser.parse_args()
    code = CHILD.format(repo=REPO, here=HERE)
    print(f"# {args.items:,} items from a generator, 2 workers, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d')}")
    print()
    print("| engine | chunksize | items/s | RSS before (MiB) | RSS after 10% → 100% of the items (MiB) "
          "| growth 10%→100% | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for engine, label in (("hived", "hived map (embedded, default)"), ("pool", "multiprocessing.Pool.imap")):
        out = subprocess.run([sys.executable, "-c", code, engine, str(args.items)],
                             capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        marks = [m / 2**20 for m in got["marks"]]
        chunk = f"{got['chunk']:,}" + (" (settles at)" if engine == "hived" else "")
        print(f"| {label} | {chunk} | {args.items / got['seconds']:,.0f} | {got['base'] / 2**20:.0f} "
              f"| {' '.join(f'{m:.0f}' for m in marks)} | {marks[-1] - marks[0]:+.0f} MiB "
              f"| {got['peak'] / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
