"""One campaign client: maps through one daemon, one JSON line per map.

    python3 -m hived.testing.campaign_client CONTROL OUT_FILE STOP_FILE [N]

Loops until STOP_FILE exists: connect to CONTROL (which makes that daemon the
job's owner), map `task` over N known inputs, and append what came back --
every result, or the exception that ended the map -- to OUT_FILE. The checker
(hived.testing.campaign) recomputes the expected values with the same `task`.
Its own process, so that a client stuck in a map is only one more fact for
the checker, and the test process can always kill it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import hived


def value(x: int) -> int:
    """What `task` returns, computed at once (the checker's expected values)."""
    return (x * x + 7) % 1_000_003


def task(x: int) -> int:
    """Deterministic and light: a few ms, so that five daemons' workers and two
    clients leave the 2-core CI machine room to breathe."""
    time.sleep(0.003)
    return value(x)


def inputs(map_id: int, n: int) -> range:
    """Each map its own inputs, so that a result delivered to the wrong map shows."""
    return range(map_id * 1000, map_id * 1000 + n)


MAP_TIMEOUT = 15.0  # a stuck map ends as TaskTimeout, which the checker counts
# An owner down for longer ends the map with HiveUnavailable (which the
# checker allows while it is down) well before MAP_TIMEOUT; back sooner, it
# takes the map up again.
RECONNECT_TIMEOUT = MAP_TIMEOUT / 2


def main(argv: list[str]) -> None:
    control, out_path, stop_path = argv[:3]
    n = int(argv[3]) if len(argv) > 3 else 24
    map_id = 0
    with open(out_path, "a") as out:
        while not os.path.exists(stop_path):
            record: dict = {"map": map_id, "n": n, "start": time.time(), "results": []}
            try:
                with hived.connect(control, reconnect_timeout=RECONNECT_TIMEOUT) as h:
                    for r in h.map(task, inputs(map_id, n), timeout=MAP_TIMEOUT):
                        record["results"].append(r)
            except Exception as exc:  # noqa: BLE001 - every failure is a fact for the checker
                record["error"] = {"type": type(exc).__name__, "message": str(exc)[:500]}
            record["end"] = time.time()
            out.write(json.dumps(record) + "\n")
            out.flush()
            map_id += 1
            time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1:])
