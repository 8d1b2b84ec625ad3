"""hived against its peers, same workloads, one run, ratios printed.

    python benchmarks/bench.py            # everything installed, 2 workers each
    python benchmarks/bench.py --only W2  # one workload

Shared machines are noisy, so every engine runs in the same run and the
verdicts are ratios, never absolute times. Engines that are not installed
(loky, dask.distributed, ray) are skipped with a note.

Workloads (2 workers everywhere):
  W1  20,000 trivial tasks, tasks/s (peers with chunksize 1 and with a good
      chunksize; hived with chunksize=None)
  W2  500 sequential single-task round trips, median and p99 µs
  W3  40 tasks of ~100 ms pure-Python CPU, efficiency = ideal / actual
  W4  16 tasks each taking a 32 MB numpy array, MB/s
  W5  fresh process to first result, s
Floors measured in the same run: a raw pyzmq DEALER/ROUTER round trip between
two processes (ipc and tcp) and raw zero-copy pyzmq bandwidth (ipc).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from benchtasks import burn, identity, nbytes  # noqa: E402

import hived  # noqa: E402

WORKERS = 2
W1_TASKS = 20_000
W1_UNCHUNKED_BUDGET = 2_000  # peers without chunking run this many (they are slow)
W2_TRIPS = 500
W3_TASKS = 40
W4_TASKS, W4_BYTES = 16, 32 << 20


# -- engines ---------------------------------------------------------------------


class Engine:
    name = ""
    chunked = True  # takes a chunksize

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def map(self, fn: Callable, items: Any, chunksize: int | None) -> list: ...
    def call(self, fn: Callable, arg: Any) -> Any: ...


class HivedEngine(Engine):
    def __init__(self, daemon: bool) -> None:
        self.daemon = daemon
        self.name = "hived (daemon)" if daemon else "hived (embedded)"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        address = "embedded"
        if self.daemon:
            self.tmp = tempfile.mkdtemp(prefix="hived-bench-")
            address = f"ipc://{self.tmp}/hived.sock"
            env = dict(os.environ, PYTHONPATH=REPO)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hived.daemon", "--control", address,
                 "--cpus", str(WORKERS), "--gpus", "0", "--log-level", "warning"],
                env=env, start_new_session=True,
            )
            deadline = time.monotonic() + 20
            while True:
                try:
                    self.hive = hived.connect(address)
                    break
                except hived.HiveUnavailable:
                    if time.monotonic() > deadline:
                        raise
        else:
            self.hive = hived.connect(address)
        self.hive.submit(identity, 0).result()

    def stop(self) -> None:
        self.hive.shutdown()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def map(self, fn, items, chunksize):
        return list(self.hive.map(fn, items, chunksize=chunksize))

    def call(self, fn, arg):
        return self.hive.submit(fn, arg).result()


class PoolEngine(Engine):
    name = "multiprocessing.Pool"

    def start(self):
        self.pool = mp.get_context("fork").Pool(WORKERS)
        self.pool.apply(identity, (0,))

    def stop(self):
        self.pool.terminate()
        self.pool.join()

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize or 1)

    def call(self, fn, arg):
        return self.pool.apply(fn, (arg,))


class ExecutorEngine(Engine):
    def __init__(self, name: str, make: Callable[[], cf.Executor]) -> None:
        self.name, self.make = name, make

    def start(self):
        self.ex = self.make()
        self.ex.submit(identity, 0).result()

    def stop(self):
        self.ex.shutdown()

    def map(self, fn, items, chunksize):
        return list(self.ex.map(fn, items, chunksize=chunksize or 1))

    def call(self, fn, arg):
        return self.ex.submit(fn, arg).result()


class DaskEngine(Engine):
    name = "dask.distributed"
    chunked = False

    def start(self):
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.submit(identity, 0).result()

    def stop(self):
        self.client.close()
        self.cluster.close()

    def map(self, fn, items, chunksize):
        items = list(items)
        if chunksize and chunksize > 1:
            batches = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
            futures = self.client.map(_apply_batch, [fn] * len(batches), batches, pure=False)
            return [r for batch in self.client.gather(futures) for r in batch]
        return self.client.gather(self.client.map(fn, items, pure=False))

    def call(self, fn, arg):
        return self.client.submit(fn, arg, pure=False).result()


class RayEngine(Engine):
    name = "ray"

    def start(self):
        import ray

        self.ray = ray
        ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": HERE}})
        self.remote_cache: dict = {}
        self.call(identity, 0)

    def stop(self):
        self.ray.shutdown()

    def _remote(self, fn):
        if fn not in self.remote_cache:
            self.remote_cache[fn] = self.ray.remote(fn)
        return self.remote_cache[fn]

    def map(self, fn, items, chunksize):
        items = list(items)
        if chunksize and chunksize > 1:
            batch = self._remote(_apply_batch)
            refs = [batch.remote(fn, items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
            return [r for part in self.ray.get(refs) for r in part]
        remote = self._remote(fn)
        return self.ray.get([remote.remote(x) for x in items])

    def call(self, fn, arg):
        return self.ray.get(self._remote(fn).remote(arg))


def _apply_batch(fn, batch):
    return [fn(x) for x in batch]


def engines() -> tuple[list[Engine], list[str]]:
    found: list[Engine] = [
        HivedEngine(daemon=False),
        HivedEngine(daemon=True),
        PoolEngine(),
        ExecutorEngine("ProcessPoolExecutor",
                       lambda: cf.ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("fork"))),
    ]
    notes = []
    try:
        import loky

        found.append(ExecutorEngine("loky", lambda: loky.get_reusable_executor(WORKERS)))
    except ImportError:
        notes.append("loky: not installed (pip install loky)")
    try:
        import distributed  # noqa: F401

        found.append(DaskEngine())
    except ImportError:
        notes.append("dask.distributed: not installed (pip install distributed)")
    try:
        import ray  # noqa: F401

        found.append(RayEngine())
    except ImportError:
        notes.append("ray: not installed (pip install ray)")
    return found, notes


# -- workloads -------------------------------------------------------------------


def w1(engine: Engine) -> dict[str, float]:
    out = {}
    items = range(W1_TASKS)
    if isinstance(engine, HivedEngine):
        t = time.perf_counter()
        got = engine.map(identity, items, None)
        out["auto"] = W1_TASKS / (time.perf_counter() - t)
    else:
        good = W1_TASKS // (4 * WORKERS)
        t = time.perf_counter()
        got = engine.map(identity, items, good)
        out["chunked"] = W1_TASKS / (time.perf_counter() - t)
        small = range(W1_UNCHUNKED_BUDGET)
        t = time.perf_counter()
        engine.map(identity, small, 1)
        out["unchunked"] = W1_UNCHUNKED_BUDGET / (time.perf_counter() - t)
    assert got == list(items), engine.name
    return out


def w2(engine: Engine) -> dict[str, float]:
    for i in range(20):
        engine.call(identity, i)
    times = []
    for i in range(W2_TRIPS):
        t = time.perf_counter()
        assert engine.call(identity, i) == i
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def w3(engine: Engine, unit: int, one: float) -> dict[str, float]:
    t = time.perf_counter()
    got = engine.map(burn, [unit] * W3_TASKS, 1 if not isinstance(engine, HivedEngine) else None)
    actual = time.perf_counter() - t
    assert len(got) == W3_TASKS
    return {"efficiency": (W3_TASKS * one / WORKERS) / actual}


def w4(engine: Engine) -> dict[str, float]:
    arrays = [np.full(W4_BYTES // 8, i, dtype=np.float64) for i in range(W4_TASKS)]
    engine.map(nbytes, arrays[:2], 1 if not isinstance(engine, HivedEngine) else None)
    t = time.perf_counter()
    got = engine.map(nbytes, arrays, 1 if not isinstance(engine, HivedEngine) else None)
    elapsed = time.perf_counter() - t
    assert got == [W4_BYTES] * W4_TASKS
    return {"MB_s": W4_TASKS * W4_BYTES / 1e6 / elapsed}


W5_SCRIPTS = {
    "hived (embedded)": "import hived; h = hived.connect('embedded'); print(h.submit(abs, -1).result())",
    "ProcessPoolExecutor": (
        "import concurrent.futures as cf\n"
        "if __name__ == '__main__':\n"
        "    with cf.ProcessPoolExecutor(2) as ex: print(ex.submit(abs, -1).result())"
    ),
    "loky": "import loky; print(loky.get_reusable_executor(2).submit(abs, -1).result())",
    "dask.distributed": (
        "from distributed import Client, LocalCluster\n"
        "if __name__ == '__main__':\n"
        "    c = Client(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))\n"
        "    print(c.submit(abs, -1).result(), flush=True)\n"
        "    c.close()"
    ),
    "ray": (
        "import ray; ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
        "@ray.remote\n"
        "def f(x): return abs(x)\n"
        "print(ray.get(f.remote(-1)), flush=True)"
    ),
    "multiprocessing.Pool": (
        "import multiprocessing as mp\n"
        "if __name__ == '__main__':\n"
        "    with mp.Pool(2) as p: print(p.apply(abs, (-1,)))"
    ),
}


def w5(name: str) -> dict[str, float] | None:
    script = W5_SCRIPTS.get(name)
    if script is None:
        return None
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                env=dict(os.environ, PYTHONPATH=REPO))
        line = proc.stdout.readline()
        runs.append(time.perf_counter() - t)
        proc.wait(60)
        if line.strip() != b"1":
            print(f"# W5 {name}: no result ({line!r})", file=sys.stderr)
            return None
    return {"s": statistics.median(runs)}


# -- floors ----------------------------------------------------------------------


def _echo(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    sock.send(b"hi")
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames[0]) > 64:
            sock.send(b"k")  # bandwidth: acknowledge, never copy the data
        elif frames[0].bytes == b"q":
            return
        else:
            sock.send(frames[0].bytes)


def floors() -> dict[str, float]:
    out = {}
    tmp = tempfile.mkdtemp(prefix="hived-floor-")
    for transport, address in (("ipc", f"ipc://{tmp}/f.sock"), ("tcp", "tcp://127.0.0.1:0")):
        ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.bind(address)
        address = router.last_endpoint.decode()
        proc = mp.get_context("spawn").Process(target=_echo, args=(address,))
        proc.start()
        peer, _ = router.recv_multipart()
        times = []
        for i in range(2000):
            t = time.perf_counter()
            router.send_multipart([peer, b"%d" % i])
            router.recv_multipart()
            times.append(time.perf_counter() - t)
        out[f"rt_{transport}_us"] = statistics.median(times[100:]) * 1e6
        if transport == "ipc":
            data = np.ones(W4_BYTES // 8)
            router.send_multipart([peer, data], copy=False)
            router.recv_multipart()
            t = time.perf_counter()
            for _ in range(W4_TASKS):
                router.send_multipart([peer, data], copy=False)
                router.recv_multipart()
            out["bw_MB_s"] = W4_TASKS * W4_BYTES / 1e6 / (time.perf_counter() - t)
        router.send_multipart([peer, b"q"])
        proc.join()
        router.close(linger=0)
        ctx.term()
    return out


# -- the run ---------------------------------------------------------------------


def calibrate() -> tuple[int, float]:
    """A burn() size that takes about 100 ms, and its time, measured in a
    fresh interpreter as the engines' workers are (this process is busier)."""
    code = (
        f"import sys, time; sys.path.insert(0, {HERE!r})\n"
        "from benchtasks import burn\n"
        "unit = 200_000\n"
        "for _ in range(2):\n"
        "    t = time.perf_counter(); burn(unit); unit = int(unit * 0.1 / (time.perf_counter() - t))\n"
        "times = []\n"
        "for _ in range(5):\n"
        "    t = time.perf_counter(); burn(unit); times.append(time.perf_counter() - t)\n"
        "print(unit, sorted(times)[2])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    unit, one = out.stdout.split()
    return int(unit), float(one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["W1", "W2", "W3", "W4", "W5"])
    parser.add_argument("--engine", action="append", help="run only engines whose name contains this")
    args = parser.parse_args()
    todo = set(args.only or ["W1", "W2", "W3", "W4", "W5"])
    found, notes = engines()
    if args.engine:
        found = [e for e in found if any(s in e.name for s in args.engine)]
    unit, one = calibrate()
    print(f"# {WORKERS} workers each; W3 task = {one * 1000:.0f} ms; python {sys.version.split()[0]}; "
          f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d')}")
    for note in notes:
        print(f"# {note}")
    floor = floors()
    print(f"# floor: raw pyzmq round trip ipc {floor['rt_ipc_us']:.0f} µs, tcp {floor['rt_tcp_us']:.0f} µs; "
          f"zero-copy ipc {floor['bw_MB_s']:,.0f} MB/s")
    results: dict[str, dict[str, Any]] = {}
    for engine in found:
        row: dict[str, Any] = {}
        engine.start()
        try:
            if "W1" in todo:
                row["W1"] = w1(engine)
            if "W2" in todo:
                row["W2"] = w2(engine)
            if "W3" in todo:
                row["W3"] = w3(engine, unit, one)
            if "W4" in todo:
                row["W4"] = w4(engine)
        finally:
            engine.stop()
        if "W5" in todo:
            row["W5"] = w5(engine.name)
        results[engine.name] = row
        print(f"# done: {engine.name}", file=sys.stderr)
    report(results, floor)


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def report(results: dict[str, dict[str, Any]], floor: dict[str, float]) -> None:
    print()
    print("| engine | W1 tasks/s (chunked / unchunked) | W2 median µs | W2 p99 µs | W3 efficiency | W4 MB/s | W5 s |")
    print("|---|---|---|---|---|---|---|")
    for name, row in results.items():
        w1r = row.get("W1", {})
        if "auto" in w1r:
            w1s = f"{w1r['auto']:,.0f} (chunksize=None)"
        elif w1r:
            w1s = f"{w1r['chunked']:,.0f} / {w1r['unchunked']:,.0f}"
        else:
            w1s = "–"
        w2r, w3r, w4r, w5r = (row.get(k) or {} for k in ("W2", "W3", "W4", "W5"))
        print(f"| {name} | {w1s} | {_fmt(w2r.get('median_us'), ',.0f')} | {_fmt(w2r.get('p99_us'), ',.0f')} "
              f"| {_fmt(w3r.get('efficiency'), '.3f')} | {_fmt(w4r.get('MB_s'), ',.0f')} | {_fmt(w5r.get('s'), '.2f')} |")
    print(f"| raw pyzmq (floor) | – | {floor['rt_ipc_us']:.0f} (ipc) / {floor['rt_tcp_us']:.0f} (tcp) | – | – "
          f"| {floor['bw_MB_s']:,.0f} | – |")
    verdicts(results, floor)


def verdicts(results: dict[str, dict[str, Any]], floor: dict[str, float]) -> None:
    emb, dmn = results.get("hived (embedded)", {}), results.get("hived (daemon)", {})
    ppe, pool, loky = (results.get(k, {}) for k in ("ProcessPoolExecutor", "multiprocessing.Pool", "loky"))
    checks = []

    def ratio(label: str, got: float | None, base: float | None, op: str, target: float) -> None:
        if got is None or base is None:
            return
        r = got / base
        ok = r >= target if op == ">=" else r <= target
        checks.append(f"| {label} | {r:.2f} | {op} {target} | {'met' if ok else 'MISSED'} |")

    get = lambda row, w, k: (row.get(w) or {}).get(k)  # noqa: E731
    ratio("W1 embedded / ProcessPoolExecutor (best chunksize)", get(emb, "W1", "auto"), get(ppe, "W1", "chunked"), ">=", 1.0)
    ratio("W1 embedded / multiprocessing.Pool.map (best chunksize)", get(emb, "W1", "auto"), get(pool, "W1", "chunked"), ">=", 0.5)
    ratio("W2 median embedded / ProcessPoolExecutor", get(emb, "W2", "median_us"), get(ppe, "W2", "median_us"), "<=", 1.0)
    ratio("W2 median daemon / raw pyzmq ipc round trip", get(dmn, "W2", "median_us"), floor["rt_ipc_us"], "<=", 2.5)
    for name, row in (("embedded", emb), ("daemon", dmn)):
        ratio(f"W3 efficiency, {name}", get(row, "W3", "efficiency"), 1.0, ">=", 0.97)
        ratio(f"W4 {name} / raw pyzmq bandwidth", get(row, "W4", "MB_s"), floor["bw_MB_s"], ">=", 0.5)
    ratio("W5 embedded / loky", get(emb, "W5", "s"), get(loky, "W5", "s"), "<=", 1.5)
    print()
    print("| target | ratio | wanted | verdict |")
    print("|---|---|---|---|")
    print("\n".join(checks))


if __name__ == "__main__":
    main()
