"""Raw pyzmq ipc bandwidth over one hop and over two: the ceiling of a daemon's relay.

    python benchmarks/hops.py              # 5 rounds of 16 × 32 MB each way
    python benchmarks/hops.py --rounds 3

A caller's array reaches a daemon's worker over two ipc sockets (caller →
daemon's control socket → the pool's worker socket) where bench.py's floor
crosses one. This measures both with nothing of hived in them: a ROUTER
sends each 32 MB frame without a copy and waits for a one-byte answer, either
straight to the sink or through a relay that receives with copy=False and
forwards the very zmq.Frame objects, as the daemon does. The two-hop figure
is what a daemon that copies nothing in Python can reach; W4 through a
daemon divided by it says what hived itself costs. Medians with min–max of
the rounds, each round running both, one after the other.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile

import zmq
from bench import _echo, zero_copy_bandwidth

TASKS, SIZE = 16, 32 << 20
QUIT = b"q"  # what bench.py's _echo ends on


def _relay(front: str, back: str) -> None:
    """Forward the received frames both ways without copying them."""
    ctx = zmq.Context()
    up = ctx.socket(zmq.DEALER)
    up.connect(front)
    up.send(b"hi")
    down = ctx.socket(zmq.ROUTER)
    down.bind(back)
    peer, _ = down.recv_multipart()
    poller = zmq.Poller()
    poller.register(up, zmq.POLLIN)
    poller.register(down, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            if sock is up:
                frames = up.recv_multipart(copy=False)
                down.send_multipart([peer, *frames], copy=False)
                if len(frames[0]) == len(QUIT) and frames[0].bytes == QUIT:  # never copy the data
                    return
            else:
                up.send_multipart(down.recv_multipart(copy=False)[1:], copy=False)


def bandwidth(hops: int) -> float:
    """MB/s of TASKS frames of SIZE bytes over `hops` (1 or 2) ipc sockets."""
    tmp = tempfile.mkdtemp(prefix="hived-hops-")
    first, second = f"ipc://{tmp}/a.sock", f"ipc://{tmp}/b.sock"
    spawn = mp.get_context("spawn")
    procs = [spawn.Process(target=_echo, args=(first,))] if hops == 1 else [
        spawn.Process(target=_relay, args=(first, second)),
        spawn.Process(target=_echo, args=(second,)),
    ]
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(first)
    for proc in procs:
        proc.start()
    peer, _ = router.recv_multipart()
    mb_s = zero_copy_bandwidth(router, peer, TASKS, SIZE)
    router.send_multipart([peer, QUIT])
    for proc in procs:
        proc.join()
    router.close(linger=0)
    ctx.term()
    shutil.rmtree(tmp, ignore_errors=True)
    return mb_s


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"# {TASKS} × {SIZE >> 20} MiB per run; load average {os.getloadavg()[0]:.1f} at the start")
    one: list[float] = []
    two: list[float] = []
    for _ in range(args.rounds):
        one.append(bandwidth(1))
        two.append(bandwidth(2))
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    print(f"one hop  MB/s {_median(one)}")
    print(f"two hops MB/s {_median(two)}")
    print(f"two hops / one hop {statistics.median(two) / statistics.median(one):.2f} "
          f"(per round {min(ratios):.2f}–{max(ratios):.2f})")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
