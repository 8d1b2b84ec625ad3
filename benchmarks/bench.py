"""hived against its peers, same workloads, one run, ratios printed.

    python benchmarks/bench.py              # everything installed, 2 workers each, 5 rounds
    python benchmarks/bench.py --quick      # 3 rounds, smaller W2-W4, no dask/ray: for development
    python benchmarks/bench.py --only W2    # one workload
    python benchmarks/bench.py --engine hived --engine Pool

Shared machines are noisy, so every engine runs in the same run, in rounds:
each round starts every engine in turn (the order rotated by one each
round), runs its workloads once (W1: five maps of each kind, they take
milliseconds; W5: three fresh programs) and stops it. Every figure is the median of all runs with
their min-max beside it, never a best-of, and the verdicts are ratios of
medians between engines measured in the same run (with the min-max of the
per-round ratios). Engines that are not installed (loky,
dask.distributed, ray) are skipped with a note.

Workloads (2 workers everywhere):
  W1  20,000 trivial tasks, tasks/s, as a user calls map: default arguments
      with a list and with a range as input, and chunksize=2500 (a list).
      Engines whose default is an item per task (ProcessPoolExecutor, loky,
      dask, ray) run their default on 2,000 items (dask and ray on 500):
      they are slow.
  W2  500 sequential submit().result() round trips, median and p99 µs
  W3  40 tasks of ~100 ms pure-Python CPU, efficiency = ideal / actual
  W4  16 tasks each taking a 32 MB numpy array, MB/s
  W5  fresh `python -c` to its first result, s
The floor runs as an engine of its own in every round: a raw pyzmq
DEALER/ROUTER round trip between two processes (ipc and tcp) and raw
zero-copy pyzmq bandwidth (ipc).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import shutil
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
W1_CHUNK = 2_500  # what multiprocessing's heuristic gives 20,000 items on 2 workers
W1_UNCHUNKED_BUDGET = 2_000  # an item per task is slow: this many items
W1_REPEATS = 5  # maps of each kind per round
W5_REPEATS = 3  # fresh programs per engine per round


class Sizes:
    """What one round runs; --quick shrinks W2-W4."""

    def __init__(self, quick: bool) -> None:
        self.rounds = 3 if quick else 5
        self.w2_trips = 200 if quick else 500
        self.w3_tasks = 10 if quick else 40
        self.w4_tasks = 4 if quick else 16
        self.w4_bytes = 32 << 20


# -- engines ---------------------------------------------------------------------


class Engine:
    name = ""
    default_is_one = True  # its map's default is an item per task
    unchunked_budget = W1_UNCHUNKED_BUDGET  # items for its item-per-task W1 runs

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def map(self, fn: Callable, items: Any, chunksize: int | None) -> list: ...
    def call(self, fn: Callable, arg: Any) -> Any: ...


class HivedEngine(Engine):
    default_is_one = False

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
                 "--cpus", str(WORKERS), "--gpus", "0", "--log-level", "warning",
                 # any free port: another daemon (or bench) may hold the default
                 "--bind", "tcp://127.0.0.1:0"],
                env=env, start_new_session=True,
            )
            deadline = time.monotonic() + 30
            while True:
                try:
                    self.hive = hived.connect(address)
                    break
                except hived.HiveUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        else:
            self.hive = hived.connect(address, cpus=WORKERS)
        self.hive.submit(identity, 0).result()

    def stop(self) -> None:
        self.hive.shutdown()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None
            shutil.rmtree(self.tmp, ignore_errors=True)

    def map(self, fn, items, chunksize):
        return list(self.hive.map(fn, items, chunksize=chunksize))

    def call(self, fn, arg):
        return self.hive.submit(fn, arg).result()


class PoolEngine(Engine):
    name = "multiprocessing.Pool"
    default_is_one = False  # divmod(len, 4 * workers), +1 if there is a remainder

    def start(self):
        self.pool = mp.get_context("fork").Pool(WORKERS)
        self.pool.apply(identity, (0,))

    def stop(self):
        self.pool.terminate()
        self.pool.join()

    def map(self, fn, items, chunksize):
        return self.pool.map(fn, items, chunksize=chunksize)

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
    unchunked_budget = W1_UNCHUNKED_BUDGET // 4  # ~1 ms a task: the run would take minutes

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
    unchunked_budget = W1_UNCHUNKED_BUDGET // 4

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


class FloorEngine(Engine):
    """Raw pyzmq between two processes: what no engine on ZeroMQ can beat."""

    name = "raw pyzmq (floor)"


def _apply_batch(fn, batch):
    return [fn(x) for x in batch]


def engines(quick: bool) -> tuple[list[Engine], list[str]]:
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
    if quick:
        notes.append("--quick: dask.distributed and ray left out")
    else:
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
    found.append(FloorEngine())
    return found, notes


# -- workloads (each returns this round's figures) -------------------------------


def _rate(engine: Engine, items: Any, chunksize: int | None) -> float:
    t = time.perf_counter()
    got = engine.map(identity, items, chunksize)
    elapsed = time.perf_counter() - t
    assert got == list(items), engine.name
    return len(got) / elapsed


def w1(engine: Engine) -> dict[str, list[float]]:
    """W1_REPEATS maps of each kind, interleaved: one map takes milliseconds,
    so a round's figure is the median of several."""
    small = engine.unchunked_budget
    n = small if engine.default_is_one else W1_TASKS
    kinds = {
        "default_list": (lambda: list(range(n)), None),
        "default_range": (lambda: range(n), None),
        "c2500": (lambda: list(range(W1_TASKS)), W1_CHUNK),
        "c1": (lambda: list(range(small)), 1),
    }
    out: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(W1_REPEATS):
        for kind, (make, chunksize) in kinds.items():
            out[kind].append(_rate(engine, make(), chunksize))
    return out


def w2(engine: Engine, sizes: Sizes) -> dict[str, float]:
    for i in range(20):
        engine.call(identity, i)
    times = []
    for i in range(sizes.w2_trips):
        t = time.perf_counter()
        assert engine.call(identity, i) == i
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_us": statistics.median(times) * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6}


def w3(engine: Engine, sizes: Sizes, unit: int, one: float) -> dict[str, float]:
    chunksize = None if isinstance(engine, HivedEngine) else 1
    t = time.perf_counter()
    got = engine.map(burn, [unit] * sizes.w3_tasks, chunksize)
    actual = time.perf_counter() - t
    assert len(got) == sizes.w3_tasks
    return {"efficiency": (sizes.w3_tasks * one / WORKERS) / actual}


def w4(engine: Engine, sizes: Sizes) -> dict[str, float]:
    chunksize = None if isinstance(engine, HivedEngine) else 1
    arrays = [np.full(sizes.w4_bytes // 8, i, dtype=np.float64) for i in range(sizes.w4_tasks)]
    engine.map(nbytes, arrays[:2], chunksize)
    t = time.perf_counter()
    got = engine.map(nbytes, arrays, chunksize)
    elapsed = time.perf_counter() - t
    assert got == [sizes.w4_bytes] * sizes.w4_tasks
    return {"MB_s": sizes.w4_tasks * sizes.w4_bytes / 1e6 / elapsed}


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
    """Seconds from a fresh interpreter's start to its first result printed
    (the interpreter's exit and the pool's shutdown after it not counted)."""
    script = W5_SCRIPTS.get(name)
    if script is None:
        return None
    env = dict(os.environ, PYTHONPATH=REPO, HIVED_CPUS=str(WORKERS))
    env.pop("HIVED_ADDRESS", None)
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - t
    proc.wait(60)
    if line.strip() != b"1":
        print(f"# W5 {name}: no result ({line!r})", file=sys.stderr)
        return None
    return {"s": elapsed}


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


def zero_copy_bandwidth(router: zmq.Socket, peer: bytes, count: int, size: int) -> float:
    """MB/s of `count` frames of `size` bytes sent without a copy to `peer`
    (an `_echo`), each answered before the next; one more first, to warm up."""
    data = np.ones(size // 8)
    router.send_multipart([peer, data], copy=False)  # the sockets' buffers, the pages
    router.recv_multipart()
    t = time.perf_counter()
    for _ in range(count):
        router.send_multipart([peer, data], copy=False)
        router.recv_multipart()
    return count * size / 1e6 / (time.perf_counter() - t)


def floors(sizes: Sizes) -> dict[str, dict[str, float]]:
    """This round's raw pyzmq round trips (ipc, tcp) and zero-copy ipc bandwidth,
    measured as W2 and W4 measure the engines."""
    out: dict[str, dict[str, float]] = {"W2": {}, "W4": {}}
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
        for i in range(20 + sizes.w2_trips):
            t = time.perf_counter()
            router.send_multipart([peer, b"%d" % i])
            router.recv_multipart()
            times.append(time.perf_counter() - t)
        out["W2"][f"{transport}_us"] = statistics.median(times[20:]) * 1e6
        if transport == "ipc":
            out["W4"]["MB_s"] = zero_copy_bandwidth(router, peer, sizes.w4_tasks, sizes.w4_bytes)
        router.send_multipart([peer, b"q"])
        proc.join()
        router.close(linger=0)
        ctx.term()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the run ---------------------------------------------------------------------

Samples = dict[str, dict[str, dict[str, list[list[float]]]]]  # engine: workload: figure: per round: runs


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


def run_engine(engine: Engine, todo: set[str], sizes: Sizes, unit: int, one: float) -> dict[str, dict]:
    """One round of every workload on `engine`, started and stopped here."""
    if isinstance(engine, FloorEngine):
        return floors(sizes) if todo & {"W2", "W4"} else {}
    row: dict[str, dict] = {}
    if todo - {"W5"}:
        engine.start()
        try:
            if "W1" in todo:
                row["W1"] = w1(engine)
            if "W2" in todo:
                row["W2"] = w2(engine, sizes)
            if "W3" in todo:
                row["W3"] = w3(engine, sizes, unit, one)
            if "W4" in todo:
                row["W4"] = w4(engine, sizes)
        finally:
            engine.stop()
    if "W5" in todo:
        runs = [w5(engine.name) for _ in range(W5_REPEATS)]
        if all(runs):
            row["W5"] = {"s": [run["s"] for run in runs]}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=["W1", "W2", "W3", "W4", "W5"])
    parser.add_argument("--engine", action="append", help="run only engines whose name contains this")
    parser.add_argument("--quick", action="store_true", help="3 rounds, smaller W2-W4, no dask/ray")
    parser.add_argument("--rounds", type=int, help="rounds (each engine once per round; default 5)")
    args = parser.parse_args()
    sizes = Sizes(args.quick)
    if args.rounds:
        sizes.rounds = args.rounds
    todo = set(args.only or ["W1", "W2", "W3", "W4", "W5"])
    found, notes = engines(args.quick)
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
        # Every program here would compile its modules anew each start: not
        # how users run them, and the worse for whoever has more source.
        notes.append("PYTHONDONTWRITEBYTECODE was set: unset for the engines' processes")
    if args.engine:
        found = [e for e in found if any(s in e.name for s in args.engine)]
    unit, one = calibrate() if "W3" in todo else (0, 0.0)
    load = os.getloadavg()[0]
    print(f"# {WORKERS} workers each; {sizes.rounds} rounds, engine order rotated per round; "
          f"W3 task = {one * 1000:.0f} ms; python {sys.version.split()[0]}; {os.cpu_count()} CPUs; "
          f"load average {load:.1f} at the start; {time.strftime('%Y-%m-%d')}")
    print(f"# engines: {', '.join(e.name for e in found)}")
    for note in notes:
        print(f"# {note}")
    if "W5" in todo:  # unmeasured: bytecode written, files cached, as on a second run
        for engine in found:
            w5(engine.name)
    samples: Samples = {e.name: {} for e in found}
    for r in range(sizes.rounds):
        shift = r % len(found)
        for engine in found[shift:] + found[:shift]:
            row = run_engine(engine, todo, sizes, unit, one)
            for workload, figures in row.items():
                for figure, value in figures.items():
                    per_round = samples[engine.name].setdefault(workload, {}).setdefault(
                        figure, [[] for _ in range(sizes.rounds)])
                    per_round[r].extend(value if isinstance(value, list) else [value])
        print(f"# round {r + 1}/{sizes.rounds} done", file=sys.stderr, flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")
    report(samples)


# -- the report ------------------------------------------------------------------


def _rounds(samples: Samples, engine: str, workload: str, figure: str) -> list[list[float]]:
    return samples.get(engine, {}).get(workload, {}).get(figure, [])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(rounds: list[list[float]], spec: str) -> str:
    got = [v for runs in rounds for v in runs]
    if not got:
        return "–"
    return f"{format(statistics.median(got), spec)} ({format(min(got), spec)}–{format(max(got), spec)})"


COLUMNS = [  # heading, workload, figure, format
    ("W1 default, list (tasks/s)", "W1", "default_list", ",.0f"),
    ("W1 default, range", "W1", "default_range", ",.0f"),
    ("W1 chunksize=2500", "W1", "c2500", ",.0f"),
    ("W1 chunksize=1", "W1", "c1", ",.0f"),
    ("W2 median µs", "W2", "median_us", ",.0f"),
    ("W2 p99 µs", "W2", "p99_us", ",.0f"),
    ("W3 efficiency", "W3", "efficiency", ".3f"),
    ("W4 MB/s", "W4", "MB_s", ",.0f"),
    ("W5 s", "W5", "s", ".2f"),
]


def report(samples: Samples) -> None:
    print()
    print("Median (min–max) of every run.")
    print()
    print("| engine | " + " | ".join(c[0] for c in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for name in samples:
        if name == FloorEngine.name:
            continue
        cells = [_cell(_rounds(samples, name, w, f), spec) for _, w, f, spec in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    floor = FloorEngine.name
    if floor in samples:
        cells = ["–"] * len(COLUMNS)
        cells[4] = (f"{_cell(_rounds(samples, floor, 'W2', 'ipc_us'), ',.0f')} ipc / "
                    f"{_cell(_rounds(samples, floor, 'W2', 'tcp_us'), ',.0f')} tcp")
        cells[7] = _cell(_rounds(samples, floor, "W4", "MB_s"), ",.0f")
        print(f"| {floor} | " + " | ".join(cells) + " |")
    print(f"\n(Engines whose default is an item per task run their W1 default columns on "
          f"{W1_UNCHUNKED_BUDGET:,} items, dask and ray on {W1_UNCHUNKED_BUDGET // 4:,}; so does "
          "every chunksize=1 column.)")
    verdicts(samples)


# The six ratios: (label, (engine, workload, figure), (engine, workload, figure), op, goal)
EMB, DMN, POOL, PPE, LOKY = ("hived (embedded)", "hived (daemon)", "multiprocessing.Pool",
                             "ProcessPoolExecutor", "loky")
RATIOS = [
    ("W1 hive.map default (list) / Pool.map default", (EMB, "W1", "default_list"),
     (POOL, "W1", "default_list"), ">=", 1.0),
    ("W1 chunksize=2500 / Pool.map chunksize=2500", (EMB, "W1", "c2500"), (POOL, "W1", "c2500"),
     ">=", 1.0),
    ("W2 submit().result() embedded / ProcessPoolExecutor", (EMB, "W2", "median_us"),
     (PPE, "W2", "median_us"), "<=", 1.0),
    ("W2 through a daemon / raw pyzmq ipc round trip", (DMN, "W2", "median_us"),
     (FloorEngine.name, "W2", "ipc_us"), "<=", 2.5),
    ("W4 16 × 32 MB through a daemon / raw pyzmq ipc bandwidth", (DMN, "W4", "MB_s"),
     (FloorEngine.name, "W4", "MB_s"), ">=", 0.8),
    ("W5 fresh python -c to first result, embedded / loky", (EMB, "W5", "s"), (LOKY, "W5", "s"),
     "<=", 1.0),
]
ALSO = [  # printed beneath, not verdicts of the issue
    ("W1 hive.map default (range) / Pool.map default (range)", (EMB, "W1", "default_range"),
     (POOL, "W1", "default_range"), ">=", 1.0),
    ("W4 embedded / raw pyzmq ipc bandwidth (keep)", (EMB, "W4", "MB_s"),
     (FloorEngine.name, "W4", "MB_s"), ">=", 0.85),
]


def ratio_row(samples: Samples, label: str, got: tuple, base: tuple, op: str, goal: float) -> str:
    """The ratio of the medians of every run, and the spread of the per-round ratios."""
    top, bottom = _rounds(samples, *got), _rounds(samples, *base)
    mt = _median([v for runs in top for v in runs])
    mb = _median([v for runs in bottom for v in runs])
    if mt is None or mb is None:
        return f"| {label} | – | – | {op} {goal} | not run |"
    r = mt / mb
    per_round = [statistics.median(t) / statistics.median(b)
                 for t, b in zip(top, bottom, strict=True) if t and b]
    ok = r >= goal if op == ">=" else r <= goal
    spread = f"{min(per_round):.2f}–{max(per_round):.2f}" if per_round else "–"
    return f"| {label} | {r:.2f} | {spread} | {op} {goal} | {'met' if ok else 'MISSED'} |"


def verdicts(samples: Samples) -> None:
    print()
    print("| ratio (of medians) | now | per-round min–max | goal | verdict |")
    print("|---|---|---|---|---|")
    for row in RATIOS:
        print(ratio_row(samples, *row))
    print()
    print("Also:")
    print()
    print("| ratio (of medians) | now | per-round min–max | goal | verdict |")
    print("|---|---|---|---|---|")
    for row in ALSO:
        print(ratio_row(samples, *row))


if __name__ == "__main__":
    main()
