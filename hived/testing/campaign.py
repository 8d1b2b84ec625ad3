"""A Jepsen-style fault campaign: real daemons, a seeded nemesis, a checker.

Theory of operation::

    seed ──▶ make_schedule ──▶ [Step(offset, fault, targets, duration)]
                                     │
    Cluster (5 hived, CURVE,         ▼
    3 voters) ◀──── faults ──── Nemesis ──▶ history: [Event(fault, start, end)]
       ▲   ▲                                heal times (heal -> one coordinator)
       │   └── status() every 0.5 s ── Prober ──▶ probes: [Probe(node, asked, ok)]
       └── maps ── 2 clients (hived.testing.campaign_client, own processes,
                   two owners) ──▶ one JSON line per map
                                     │
    daemons' logs ─────────────────▶ check() ──▶ Report: counts, violations

The nemesis applies one fault at a time and heals it at the end of its
duration, so every instant of the history names at most one fault, and the
checker knows exactly which daemons were down (killed or paused) when. All
test hosts share this machine's clock, so wall-clock times from the
daemons' logs, the clients and the nemesis compare exactly.

`run_campaign` drives one seed end to end; tests/test_campaign.py (CI) and
benchmarks/campaign.py (the long run) call it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hived.testing.campaign_client import MAP_TIMEOUT, inputs, value
from hived.testing.childenv import child_env
from hived.testing.meshnet import Cluster, MeshNode
from hived.testing.netns import TestNet
from hived.testing.waiting import wait_for

TIMING = {"heartbeat": 0.2, "dead_after": 1.5, "lease": 1.0}
VOTERS = 3
OWNERS = (1, 4)  # a voter and a non-voter own the clients' jobs
HEAL_BOUND = 2 * TIMING["lease"] + TIMING["heartbeat"]  # after the last heal: one coordinator
PROBE_EVERY, PROBE_TIMEOUT = 0.5, 2.0
CLIENT = ["-m", "hived.testing.campaign_client"]  # after the interpreter

FAULTS = ("kill", "pause", "minority", "alone", "bridge", "loss", "slow", "disk-full")
DOWN = ("kill", "pause")  # faults after which a daemon may rightly not answer


# -- the schedule -------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One fault. `targets`: the node indices it acts on; for `minority` and
    `alone` the smaller side (the rest is the other side); for `bridge` the
    bridge node first, then one side (the rest, but the bridge, is the
    other). `amount`: the share of packets lost (`loss`), kbit/s (`slow`)."""

    offset: float
    fault: str
    targets: tuple[int, ...]
    duration: float
    amount: float = 0.0

    def __str__(self) -> str:
        extra = {"loss": f" {self.amount:.0%}", "slow": f" {self.amount:g}kbit"}.get(self.fault, "")
        return (f"+{self.offset:6.1f}s {self.fault:<9} {list(self.targets)}{extra}"
                f" for {self.duration:.1f}s")


def make_schedule(seed: int, seconds: float, nodes: int = 5, voters: int = VOTERS) -> list[Step]:
    """The same seed always gives the same steps. Fault kinds come in shuffled
    rounds of all of them, so a short campaign still meets most kinds."""
    rng = random.Random(seed)
    steps: list[Step] = []
    kinds: list[str] = []
    t = 2.0
    while True:
        if not kinds:
            kinds = list(FAULTS)
            rng.shuffle(kinds)
        fault = kinds.pop()
        duration = round(rng.uniform(1.5, 3.0) if fault in DOWN else rng.uniform(2.0, 4.0), 1)
        if t + duration > seconds:
            return steps
        everyone = list(range(nodes))
        amount = 0.0
        if fault in ("kill", "pause", "slow"):
            targets: tuple[int, ...] = (rng.randrange(nodes),)
            amount = rng.choice((64, 128, 256)) if fault == "slow" else 0.0
        elif fault == "disk-full":
            targets = (rng.randrange(voters),)
        elif fault == "minority":
            targets = tuple(sorted(rng.sample(everyone, (nodes - 1) // 2)))
        elif fault == "alone":
            targets = (rng.randrange(nodes),)
        elif fault == "bridge":
            rng.shuffle(everyone)
            targets = (everyone[0], *sorted(everyone[1 : 1 + (nodes - 1) // 2]))
        else:  # loss
            targets = tuple(sorted(rng.sample(everyone, rng.randint(1, 2))))
            amount = round(rng.uniform(0.2, 0.4), 2)
        steps.append(Step(round(t, 1), fault, targets, duration, amount))
        # The gap lets the mesh heal before the next fault, and is where each
        # heal time is measured: longer than the bound it is held to.
        t += duration + rng.uniform(HEAL_BOUND + 0.5, HEAL_BOUND + 1.5)


# -- the nemesis --------------------------------------------------------------------------


@dataclass
class Event:
    """A fault as applied: wall-clock start and end (for `kill`, the end is
    when the restarted daemon first answered)."""

    step: Step
    names: list[str]
    start: float
    end: float = 0.0
    note: str = ""

    def __str__(self) -> str:
        return (f"{self.start:.3f}-{self.end:.3f} {self.step.fault:<9} {self.names}"
                f"{' ' + self.note if self.note else ''}")


class Nemesis:
    """Runs a schedule against a cluster, one fault at a time, and keeps the history."""

    def __init__(self, cluster: Cluster, steps: list[Step]) -> None:
        self.cluster, self.steps = cluster, steps
        self.history: list[Event] = []
        self.heal_times: list[tuple[str, float | None]] = []  # (fault, seconds or None)
        self.final_heal: float | None = None
        self.fillers: list[str] = []

    def run(self, started: float) -> None:
        for k, step in enumerate(self.steps):
            _sleep_until(started + step.offset)
            event = Event(step, [self.cluster[i].name for i in step.targets], time.time())
            self.history.append(event)
            try:
                self._apply(step, event)
                _sleep_until(event.start + step.duration)
            finally:
                self._heal(step, event)
            until = started + self.steps[k + 1].offset if k + 1 < len(self.steps) else None
            if until is not None:
                self.heal_times.append((step.fault, self.time_to_agree(event.end, until)))
        ended = self.history[-1].end if self.history else time.time()
        self.final_heal = self.time_to_agree(ended, ended + 15)

    def time_to_agree(self, healed: float, until: float) -> float | None:
        """Seconds from `healed` until every node names one coordinator; None
        if they did not by `until` (wall clock)."""
        while time.time() < until:
            if self.cluster.agreed_coordinator() is not None:
                return time.time() - healed
            time.sleep(0.05)
        return None

    def _apply(self, step: Step, event: Event) -> None:
        c, net = self.cluster, self.cluster.net
        nodes = [c[i] for i in step.targets]
        if step.fault == "kill":
            event.note = f"pid {nodes[0].process.pid}"
            nodes[0].kill9()
        elif step.fault == "pause":
            os.kill(nodes[0].process.pid, signal.SIGSTOP)
        elif step.fault in ("minority", "alone"):
            net.partition([n.host for n in nodes])
        elif step.fault == "bridge":
            side_a = [n.host for n in nodes[1:]]
            side_b = [n.host for n in c.nodes if n not in nodes]
            net.drop_between(side_a, side_b)
        elif step.fault == "loss":
            for n in nodes:
                net.impair(n.host, loss=step.amount)
        elif step.fault == "slow":
            net.impair(nodes[0].host, rate=f"{step.amount:g}kbit")
        elif step.fault == "disk-full":
            self.fillers.append(fill_disk(nodes[0].data_dir))
        else:
            raise ValueError(f"unknown fault {step.fault!r}; expected one of {FAULTS}")

    def _heal(self, step: Step, event: Event) -> None:
        node = self.cluster[step.targets[0]]
        if step.fault == "kill":
            if not node.alive():  # _apply may have failed before the kill
                node.start()
            event.note += f", restarted as {node.process.pid}"
            wait_for(lambda: node.status(timeout=0.5) is not None, 30,
                     what=f"{node.name} to answer after its restart")
        elif step.fault == "pause":
            os.kill(node.process.pid, signal.SIGCONT)
        elif step.fault == "disk-full":
            while self.fillers:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.fillers.pop())
        else:
            self.cluster.net.heal_all()
        event.end = time.time()


def fill_disk(directory: str) -> str:
    """Fill the file system under `directory` to the last byte; the filler's path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        size = 65536
        while size:  # unbuffered, down to single bytes: nothing left for anyone
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    return path


def _sleep_until(wall: float) -> None:
    """The schedule's own waits: faults last as long as the seed says, by design."""
    time.sleep(max(0.0, wall - time.time()))


# -- the prober ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    node: str
    asked: float
    answered: float | None  # None: no answer within PROBE_TIMEOUT


class Prober:
    """One thread per daemon asks `status()` every PROBE_EVERY seconds."""

    def __init__(self, nodes: list[MeshNode]) -> None:
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True,
                                          name=f"probe-{n.name}") for n in nodes]

    def __enter__(self) -> Prober:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(PROBE_TIMEOUT + 5)

    def _run(self, node: MeshNode) -> None:
        while not self._stop.is_set():
            asked = time.time()
            ok = node.status(timeout=PROBE_TIMEOUT) is not None
            self.probes.append(Probe(node.name, asked, time.time() if ok else None))
            self._stop.wait(max(0.0, asked + PROBE_EVERY - time.time()))


# -- the checker --------------------------------------------------------------------------

BECAME = re.compile(r"mesh: became coordinator, term (\d+) at ([\d.]+) \(lease to ([\d.]+)\)")
STEPPED = re.compile(r"mesh: no longer coordinator, term (\d+) \(held to ([\d.]+)\)")
# The format before the daemons logged wall times: nothing to check leases with.
UNTIMED = re.compile(r"mesh: (?:became|no longer) coordinator, term \d+\s*$")


@dataclass
class Report:
    seed: int
    schedule: list[Step]
    history: list[Event]
    counts: collections.Counter = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    heal_times: list[tuple[str, float | None]] = field(default_factory=list)
    final_heal: float | None = None
    logs: str = ""

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        c = self.counts
        heals = [t for _, t in self.heal_times if t is not None]
        spread = (f"median {statistics.median(heals):.2f}s, {min(heals):.2f}-{max(heals):.2f}s"
                  if heals else "none measured")
        final = f"{self.final_heal:.2f}s" if self.final_heal is not None else "never"
        return (
            f"seed {self.seed}: {len(self.history)} faults, {c['maps']} maps"
            f" ({c['maps_ok']} whole, {c['unavailable']} HiveUnavailable with the owner down),"
            f" {c['results']} results checked, {c['lost']} lost, {c['duplicated']} duplicated,"
            f" {c['wrong']} wrong; {c['leases']} leases, {c['overlaps']} overlapping;"
            f" {c['probes']} probes, {c['silent']} silent; heal times {spread};"
            f" after the last heal {final} (bound {HEAL_BOUND:.1f}s);"
            f" {len(self.violations)} violations"
        )

    def failure_text(self) -> str:
        return "\n".join([
            f"campaign seed {self.seed} (replay: HIVED_CAMPAIGN_SEED={self.seed})",
            self.summary(),
            "violations:", *(f"  {v}" for v in self.violations),
            "schedule:", *(f"  {s}" for s in self.schedule),
            "nemesis history (wall clock):", *(f"  {e}" for e in self.history),
            "daemons' logs (tails):", self.logs,
        ])


def down_intervals(history: list[Event]) -> dict[str, list[tuple[float, float]]]:
    """When each daemon was killed or paused, by the nemesis's own record."""
    down: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for e in history:
        if e.step.fault in DOWN:
            down[e.names[0]].append((e.start, e.end or float("inf")))
    return down


def _overlaps(spans: list[tuple[float, float]], start: float, end: float) -> bool:
    return any(a <= end and start <= b for a, b in spans)


def check_maps(maps: dict[str, list[dict]], down: dict[str, list[tuple[float, float]]],
               report: Report) -> None:
    """Every result right and exactly once, in order; HiveUnavailable only
    while the owner was down; any other error is a violation."""
    c = report.counts
    for owner, records in maps.items():
        for r in records:
            c["maps"] += 1
            expected = [value(x) for x in inputs(r["map"], r["n"])]
            got = r["results"]
            c["results"] += len(got)
            label = f"map {r['map']} on {owner} ({r['start']:.3f}-{r['end']:.3f})"
            err = r.get("error")
            if err is None:
                if got == expected:
                    c["maps_ok"] += 1
                    continue
                have, want = collections.Counter(got), collections.Counter(expected)
                lost = sum((want - have).values())
                dup = sum(have[v] - want[v] for v in want if have[v] > want[v])
                wrong = sum(k for v, k in have.items() if v not in want)
                c["lost"] += lost
                c["duplicated"] += dup
                c["wrong"] += wrong
                report.violations.append(
                    f"{label}: {len(got)} results for {len(expected)} items: {lost} lost,"
                    f" {dup} duplicated, {wrong} wrong{', order wrong' if not (lost or dup or wrong) else ''};"
                    f" first difference at {_first_difference(got, expected)}")
                continue
            if got != expected[: len(got)]:
                report.violations.append(
                    f"{label}: the {len(got)} results before its {err['type']} are not the"
                    f" first expected ones (first difference at {_first_difference(got, expected)})")
            owner_down = _overlaps(down.get(owner, []), r["start"], r["end"])
            if err["type"] == "HiveUnavailable" and owner_down:
                c["unavailable"] += 1
                continue
            why = (" while its owner was up (only a killed or paused owner may end a map)"
                   if err["type"] == "HiveUnavailable" else
                   " (its owner was down meanwhile; the contract allows HiveUnavailable only)"
                   if owner_down else "")
            c["errors"] += 1
            report.violations.append(f"{label}: {err['type']}: {err['message'][:200]}{why}")


def _first_difference(got: list, expected: list) -> str:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return f"item {i}: got {a}, expected {b}"
    return f"item {min(len(got), len(expected))} (one list ends)"


@dataclass(frozen=True)
class Lease:
    node: str
    term: int
    start: float
    end: float
    how: str  # how it ended: "stepped down", "killed", "campaign end"


def leases(logs: dict[str, str], history: list[Event], end: float,
           report: Report) -> list[Lease]:
    """Each holder's interval from its log; also checks that terms only rise."""
    kills: dict[str, list[float]] = collections.defaultdict(list)
    for e in history:
        if e.step.fault == "kill":
            kills[e.names[0]].append(e.start)
    out = []
    for node, text in logs.items():
        untimed = [line for line in text.splitlines() if UNTIMED.search(line)]
        if untimed:
            report.violations.append(
                f"{node}: {len(untimed)} coordinator lines without wall-clock times (e.g."
                f" {untimed[0].strip()!r}); leases cannot be checked until hived.mesh.shell logs"
                f" 'became coordinator, term N at W0 (lease to W1)'")
        open_: tuple[int, float] | None = None
        last_term, last_became = 0, 0
        for line in text.splitlines():
            m = BECAME.search(line)
            found = m or STEPPED.search(line)
            if found is None:
                continue
            term = int(found.group(1))
            if term < last_term:
                report.violations.append(f"{node}: term fell from {last_term} to {term}: {line.strip()}")
            last_term = max(last_term, term)
            if m:
                if term <= last_became:
                    report.violations.append(
                        f"{node}: became coordinator of term {term} after term {last_became}")
                last_became = max(last_became, term)
                start = float(found.group(2))
                if open_ is not None:  # never stepped down: it was killed in between
                    out.append(_ended(node, *open_, kills[node], start))
                open_ = (term, start)
            elif open_ is not None:
                out.append(Lease(node, open_[0], open_[1], float(found.group(2)), "stepped down"))
                open_ = None
        if open_ is not None:
            out.append(_ended(node, *open_, kills[node], end))
    return out


def _ended(node: str, term: int, start: float, kills: list[float], limit: float) -> Lease:
    killed = [k for k in kills if start <= k <= limit]
    if killed:
        return Lease(node, term, start, killed[0], "killed")
    return Lease(node, term, start, limit, "campaign end")


def check_leases(found: list[Lease], report: Report) -> None:
    """No two holders' intervals overlap, by a single microsecond."""
    report.counts["leases"] += len(found)
    ordered = sorted(found, key=lambda x: x.start)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if b.start >= a.end:
                break
            report.counts["overlaps"] += 1
            report.violations.append(
                f"leases overlap by {min(a.end, b.end) - b.start:.3f}s: {a.node} term {a.term}"
                f" [{a.start:.3f}, {a.end:.3f}] ({a.how}) and {b.node} term {b.term}"
                f" [{b.start:.3f}, {b.end:.3f}] ({b.how})")


def check_probes(probes: list[Probe], down: dict[str, list[tuple[float, float]]],
                 report: Report) -> None:
    """A daemon that was neither killed nor paused answered every probe in time."""
    report.counts["probes"] += len(probes)
    silent: dict[str, list[float]] = collections.defaultdict(list)
    for p in probes:
        if p.answered is None and not _overlaps(down.get(p.node, []), p.asked,
                                                p.asked + PROBE_TIMEOUT):
            silent[p.node].append(p.asked)
    for node, times in sorted(silent.items()):
        report.counts["silent"] += len(times)
        spans = _runs(sorted(times))
        report.violations.append(
            f"{node} did not answer status() within {PROBE_TIMEOUT:g}s {len(times)} times while"
            f" neither killed nor paused: " + ", ".join(f"{a:.3f}-{b + PROBE_TIMEOUT:.3f}"
                                                        for a, b in spans))


def _runs(times: list[float]) -> list[tuple[float, float]]:
    """Consecutive probe times grouped into spans (a gap of more than 3 probes splits)."""
    spans: list[tuple[float, float]] = []
    for t in times:
        if spans and t - spans[-1][1] <= 3 * PROBE_EVERY + PROBE_TIMEOUT:
            spans[-1] = (spans[-1][0], t)
        else:
            spans.append((t, t))
    return spans


def check(report: Report, maps: dict[str, list[dict]], probes: list[Probe],
          logs: dict[str, str], end: float) -> Report:
    """Every check, into `report` (its history and heal times already filled)."""
    down = down_intervals(report.history)
    for e in report.history:
        report.counts[f"fault {e.step.fault}"] += 1
    check_maps(maps, down, report)
    check_leases(leases(logs, report.history, end, report), report)
    check_probes(probes, down, report)
    if report.final_heal is None:
        report.violations.append("after the last heal the nodes never agreed on one coordinator")
    elif report.final_heal > HEAL_BOUND:
        report.violations.append(
            f"after the last heal one coordinator took {report.final_heal:.2f}s"
            f" (bound: 2 x lease + heartbeat = {HEAL_BOUND:.1f}s)")
    return report


# -- one campaign ---------------------------------------------------------------------------


def dump_stacks(cluster: Cluster) -> None:
    """SIGUSR1 makes each running daemon write its threads' stacks to its log;
    wait (briefly) until the logs have grown."""
    sizes = {}
    for n in cluster.nodes:
        if n.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.process.pid, signal.SIGCONT)  # a paused one cannot write
                os.kill(n.process.pid, signal.SIGUSR1)
                sizes[n.name] = os.path.getsize(n.log_path)
    with contextlib.suppress(AssertionError):
        wait_for(lambda: all(os.path.getsize(cluster.node(k).log_path) > v
                             for k, v in sizes.items()), 3, what="stacks in the logs")


def _read_maps(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def run_campaign(net: TestNet, seed: int, seconds: float, workdir: str,
                 say: Callable[[str], Any] = print) -> Report:
    """Five daemons, two clients, one seeded schedule of `seconds`; the checked report.

    Kills and unmounts everything it started, whatever happens; on an error
    (a wait that timed out, the test's own timeout) the daemons' stacks and
    log tails are printed before it propagates."""
    schedule = make_schedule(seed, seconds, len(net.hosts))
    say(f"campaign seed {seed} (replay: HIVED_CAMPAIGN_SEED={seed}), schedule:\n"
        + "\n".join(f"  {s}" for s in schedule))
    cluster = Cluster(net, workdir, voters=VOTERS, timing=TIMING)
    nemesis = Nemesis(cluster, schedule)
    stop = os.path.join(workdir, "stop")
    clients: list[subprocess.Popen] = []
    try:
        for node in cluster.nodes[:VOTERS]:
            node.mount_data()
        cluster.start()
        cluster.wait_agreed(timeout=30)
        for i in OWNERS:
            node = cluster[i]
            out = os.path.join(workdir, f"maps-{node.name}.jsonl")
            with open(out + ".err", "ab") as err:
                clients.append(node.host.popen([sys.executable, *CLIENT, node.control, out, stop],
                                               env=child_env(), stdout=subprocess.DEVNULL,
                                               stderr=err))
        with Prober(cluster.nodes) as prober:
            nemesis.run(time.time())
            with open(stop, "w"):
                pass
            for proc in clients:  # a map in flight ends by its own timeout at the latest
                try:
                    proc.wait(MAP_TIMEOUT + 10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        end = time.time()
        report = Report(seed, schedule, nemesis.history, heal_times=nemesis.heal_times,
                        final_heal=nemesis.final_heal)
        maps = {cluster[i].name: _read_maps(os.path.join(workdir, f"maps-{cluster[i].name}.jsonl"))
                for i in OWNERS}
        check(report, maps, prober.probes, {n.name: n.log for n in cluster.nodes}, end)
        if not report.ok:
            report.logs = cluster.logs()
        return report
    except BaseException:
        dump_stacks(cluster)
        say("campaign failed; nemesis history:\n" + "\n".join(f"  {e}" for e in nemesis.history)
            + f"\ndaemons' logs (tails):\n{cluster.logs()}")
        raise
    finally:
        for proc in clients:
            if proc.poll() is None:
                net[0].kill9(proc)
        for node in cluster.nodes:
            if node.proc is not None and node.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGCONT)
                node.kill9()
        for node in cluster.nodes:
            node.unmount_data()
