"""A client on a test host of its own, for the owner-failover tests.

    python3 tests/failover_client.py MODE ADDRESSES N SECONDS RECONNECT_TIMEOUT

Connects to ADDRESSES (commas; the key from HIVED_KEY_FILE), prints
`node NAME`, then one JSON line per result as it comes: `[index, value,
daemon pid]`, and at the end `done`, or `error TYPE MESSAGE` with the
seconds since the last result. MODE: `ordered`, `unordered` (maps of N
tasks of SECONDS), `endless` (a map over an endless generator, left after N
results) or `submit` (N futures, printed as they complete). Its own process
in its own network namespace, so that the test can cut it off or kill its
node like any other machine's.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import sys
import time


def square_where(args: tuple[int, float]) -> tuple[int, int]:
    """x², and the daemon whose worker ran it."""
    x, seconds = args
    time.sleep(seconds)
    return x * x, os.getppid()


def main(mode: str, addresses: str, n: int, seconds: float, reconnect_timeout: float) -> None:
    import hived

    with hived.connect(addresses, reconnect_timeout=reconnect_timeout) as h:
        print("node", h.node_name, flush=True)
        last = time.monotonic()
        try:
            if mode == "submit":
                futures = {h.submit(square_where, (x, seconds)): x for x in range(n)}
                done = concurrent.futures.as_completed(futures)
                results = ((futures[f], f.result()) for f in done)
            else:
                inputs = itertools.count() if mode == "endless" else range(n)
                mapped = h.map(square_where, ((x, seconds) for x in inputs), chunksize=1,
                               ordered=mode != "unordered")
                results = enumerate(itertools.islice(mapped, n))
            for index, (value, pid) in results:
                print(json.dumps([index, value, pid]), flush=True)
                last = time.monotonic()
        except hived.HiveError as exc:
            print("error", type(exc).__name__, f"{time.monotonic() - last:.2f}", exc, flush=True)
            return
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
