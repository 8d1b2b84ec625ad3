"""Distributed maps across real hosts, and the faults they must survive.

Three hosts (network namespaces), a real hived on each (one CPU slot each,
all voters, the short mesh timings of `meshnet.TIMING`). The test process
is the client: it connects to a node's ipc control socket, which makes that
node the job's owner. Tasks report `os.getppid()` (the daemon whose worker
ran them), so each result says which node ran it.

Every test checks the full result list: every item exactly once, in order.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from meshpeer import MeshPeer
from test_cli import hivectl
from test_daemon import NotifySocket

import hived
from hived.mesh.gossip import Beat
from hived.mesh.matchmaking import HeldAsk, HeldTell, Nothing, Pull, RangeFailed, RangeMsg
from hived.net.security import load_key
from hived.protocol.control import DrainRequest, JobsQuery, ask
from hived.protocol.serialization import function_digest
from hived.testing.campaign import BECAME, Report, check_leases, leases
from hived.testing.childenv import child_env
from hived.testing.meshnet import PORT, TIMING, Cluster, MeshNode
from hived.testing.waiting import wait_for

BAD = 10_000  # the item that kills its worker
SLOWDOWN = "TEST_TASK_SLOWDOWN"  # set for one daemon (and so its workers): its tasks run slower


# -- tasks (module level: pickled by value) ------------------------------------------------


def square_where(x):
    """x², and the daemon whose worker ran it."""
    time.sleep(0.1)
    return x * x, os.getppid()


def square_where_when(x):
    """x², the daemon whose worker ran it, when it started, and the GPU that
    worker was given (CUDA_VISIBLE_DEVICES)."""
    started = time.time()
    time.sleep(0.1)
    return x * x, os.getppid(), started, os.environ.get("CUDA_VISIBLE_DEVICES")


def square_where_paced(x):
    """x² in 50 ms, times the slowdown of the node it runs on."""
    time.sleep(0.05 * float(os.environ.get(SLOWDOWN, "1")))
    return x * x, os.getppid()


def nap(seconds):
    time.sleep(seconds)
    return seconds


def speaks(x):
    """Writes a line at the fd level and logs a warning; returns its daemon."""
    time.sleep(0.1)
    os.write(1, f"fd line {x}\n".encode())
    logging.getLogger("hived_tests.remote").warning("remote warning %d", x)
    return os.getppid()


def die_on_bad(args):
    """x * 10, but the BAD item kills its worker on every try (and leaves a
    mark naming the daemon it ran under)."""
    x, marks = args
    if x == BAD:
        with open(os.path.join(marks, f"{os.getppid()}-{os.getpid()}"), "w"):
            pass
        os.kill(os.getpid(), 9)
    time.sleep(0.05)
    return x * 10


# -- the cluster ---------------------------------------------------------------------------


def all_see_all(c: Cluster, nodes: list[MeshNode]) -> bool:
    names = {n.name for n in nodes}
    for node in nodes:
        states = c.states(node)
        if {n for n, s in states.items() if s == "alive"} != names:
            return False
    return True


@contextlib.contextmanager
def running_cluster(testnet, **options):
    """Three hosts, a hived on each, every node seeing every other, one coordinator."""
    tmp = tempfile.TemporaryDirectory(prefix="hived-dist-")
    c = Cluster(testnet(3), tmp.name, **options).start()
    try:
        eventually(c, lambda: all_see_all(c, c.nodes), 30, "full membership")
        c.wait_agreed()
        yield c
    finally:
        print(c.logs())  # pytest shows it when the test failed
        for node in c.nodes:
            if node.alive():
                node.kill9()
        c.net.close()
        tmp.cleanup()


@pytest.fixture
def cluster(testnet):
    with running_cluster(testnet) as c:
        yield c


@pytest.fixture
def gpu_cluster(testnet):
    """As `cluster`, with one GPU slot on the third node only."""
    with running_cluster(testnet, gpus={2: 1}) as c:
        yield c


@pytest.fixture
def slow_node_cluster(testnet):
    """As `cluster`, but tasks run four times slower on the third node."""
    with running_cluster(testnet, env={2: {SLOWDOWN: "4"}}) as c:
        yield c


def eventually(c: Cluster, predicate, timeout: float, what: str):
    """wait_for, with the daemons' logs as they are at the deadline."""
    try:
        return wait_for(predicate, timeout, interval=0.1, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{c.logs()}") from None


def coordinator(c: Cluster) -> MeshNode:
    name, _ = c.wait_agreed()
    return c.node(name)


def pick(c: Cluster, avoid: list[MeshNode]) -> MeshNode:
    return next(n for n in c.nodes if n not in avoid)


def busy(node: MeshNode) -> int | None:
    """Slots busy on this node, as the node itself says."""
    view = node.status()
    return None if view is None else view["nodes"][0]["slots_busy"]


def check_squares(got: list[tuple], n: int, c: Cluster) -> list[int]:
    """Every x² exactly once, in order; returns which daemon ran each."""
    assert [r[0] for r in got] == [x * x for x in range(n)]
    pids = [r[1] for r in got]
    assert set(pids) <= {node.proc.pid for node in c.nodes}, "a result from an unknown process"
    return pids


# -- the scenarios -------------------------------------------------------------------------


def test_a_map_from_one_owner_spreads_over_every_node(cluster):
    c = cluster
    owner = c[0]
    with hived.connect(owner.control) as h:
        assert h.slots == 3
        got = []
        for r in h.map(square_where, range(40), chunksize=1):
            got.append(r)
            if len(got) == 5:  # mid-job: any node lists the job, cluster-wide
                rows = ask(c[1].control, JobsQuery(1), timeout=3).body["jobs"]
                assert [row["owner"] for row in rows] == [owner.name], rows
                assert rows[0]["total"] >= 5 and rows[0]["done"] >= 5
    pids = check_squares(got, 40, c)
    others = {n.proc.pid for n in c.nodes if n is not owner}
    assert others <= set(pids), f"ran on {sorted(set(pids))}, expected the others {sorted(others)}"


def test_output_and_records_from_other_nodes_reach_the_client_through_the_owner(
        cluster, capfd, caplog):
    c = cluster
    with hived.connect(c[0].control) as h:
        ran = set(h.map(speaks, range(30), chunksize=1))
        names = {n.proc.pid: n.name for n in c.nodes}
        assert len(ran) >= 2, ran
        out = ""

        def arrived() -> bool:
            nonlocal out
            out += capfd.readouterr().out
            records = [r for r in caplog.records if r.name == "hived_tests.remote"]
            return out.count("fd line") == 30 and len(records) == 30

        wait_for(arrived, 30, what="every task's line and record")
    for x in range(30):
        assert re.search(rf"^\((h\d) pid=\d+\) fd line {x}$", out, re.M), out
    lines_from = set(re.findall(r"^\((h\d) pid=\d+\) fd line", out, re.M))
    assert lines_from == {names[pid] for pid in ran}, (lines_from, ran)
    records = [r for r in caplog.records if r.name == "hived_tests.remote"]
    assert {r.levelno for r in records} == {logging.WARNING}
    for node in c.nodes:
        assert "fd line" not in node.log and "remote warning" not in node.log


def test_a_worker_node_killed_mid_job_loses_no_result(cluster):
    c = cluster
    coord = coordinator(c)
    owner = pick(c, [coord])
    victim = pick(c, [coord, owner])
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where_when, range(60), chunksize=1):
            got.append(r)
            if len(got) == 20:
                victim_pid = victim.proc.pid
                killed_at = time.time()
                victim.kill9()
    pids = check_squares(got, 60, c)
    assert victim_pid in pids, "the victim ran nothing before it was killed"
    # Results come in order, so the victim may have run items well past the
    # 20th before the kill; none after it.
    late = [r for r in got if r[1] == victim_pid and r[2] > killed_at]
    assert not late, f"results from a node killed before they started: {late}"
    for node in (coord, owner):
        eventually(c, lambda node=node: c.states(node).get(victim.name) == "dead", 10,
                   f"{victim.name} marked dead on {node.name}")


def test_the_coordinator_killed_mid_job_stalls_no_running_job(cluster):
    c = cluster
    old, term = c.wait_agreed()
    coord = c.node(old)
    owner = pick(c, [coord])
    got, times = [], []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where, range(60), chunksize=1, ordered=False):
            got.append(r)
            times.append(time.monotonic())
            if len(got) == 20:
                killed_at = len(got)
                coord.kill9()
    # Unordered, so results flow as they come; each item still exactly once.
    assert sorted(r[0] for r in got) == [x * x for x in range(60)]
    assert len(got) == 60
    assert {r[1] for r in got} <= {n.proc.pid for n in c.nodes}
    # From the kill on, results keep coming: no gap near a coordinator failover
    # (~2 leases), let alone dead_after plus a new election.
    gaps = [b - a for a, b in itertools.pairwise(times[killed_at - 1:])]
    bound = 2 * TIMING["lease"] + 1.0
    assert max(gaps) < bound, f"a {max(gaps):.2f} s stall after the kill"
    rest = [n for n in c.nodes if n is not coord]
    new, new_term = c.wait_agreed(rest, exclude=old)
    assert new != old and new_term > term


def test_a_worker_node_partitioned_away_then_healed_gives_every_result_once(cluster):
    c = cluster
    owner = c[0]
    victim = pick(c, [owner, coordinator(c)])
    others = [n for n in c.nodes if n is not victim]
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where, range(60), chunksize=1):
            got.append(r)
            if len(got) == 20:
                c.net.partition([victim.host], [n.host for n in others])
    pids = check_squares(got, 60, c)
    assert victim.proc.pid in pids[:20]
    eventually(c, lambda: c.states(owner).get(victim.name) == "dead", 10,
               f"{victim.name} marked dead")
    c.net.heal_all()
    eventually(c, lambda: all_see_all(c, c.nodes), 30, "membership after the heal")
    c.wait_agreed(timeout=20)
    with hived.connect(owner.control) as h:  # and the healed mesh still serves
        pids = check_squares(list(h.map(square_where, range(30), chunksize=1)), 30, c)


def test_a_task_that_kills_every_worker_it_runs_on_fails_alone(cluster, tmp_path):
    c = cluster
    owner = c[0]
    marks = str(tmp_path)
    os.chmod(marks, 0o777)
    items = [(x, marks) for x in range(12)] + [(BAD, marks)]
    with hived.connect(owner.control) as h:
        # Keep the owner's own slot busy, so that the map runs on the other nodes.
        blocker = h.submit(nap, 4)
        eventually(c, lambda: busy(owner) == 1, 10, "the blocker running on the owner")
        results = h.map(die_on_bad, items, chunksize=1, retries=2)
        assert [next(results) for _ in range(12)] == [x * 10 for x in range(12)]
        with pytest.raises(hived.WorkerCrashed, match=r"tried 3 times"):
            next(results)
        results.close()
        assert blocker.result(timeout=30) == 4
        # The pools serve on.
        got = list(h.map(square_where, range(12), chunksize=1))
    check_squares(got, 12, c)
    ran_under = [int(name.split("-")[0]) for name in os.listdir(marks)]
    # retries=2: at most 3 runs, the one that found the item included.
    assert len(ran_under) == 3, ran_under
    remote = {n.proc.pid for n in c.nodes if n is not owner}
    assert set(ran_under) & remote, f"the bad task never ran on a remote node: {ran_under}"


CLIENT = textwrap.dedent(
    """
    import sys, time
    import hived

    def long_nap(x):
        time.sleep(60)
        return x

    with hived.connect(sys.argv[1]) as h:
        for r in h.map(long_nap, range(12), chunksize=1):
            print(r, flush=True)
    """
)


def test_workers_drop_the_tasks_of_an_owner_whose_client_vanished(cluster):
    c = cluster
    owner = c[0]
    client = subprocess.Popen([sys.executable, "-c", CLIENT, owner.control], env=child_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        eventually(c, lambda: all(busy(n) == 1 for n in c.nodes), 20,
                   "the client's tasks running on every node")
        jobs = ask(owner.control, JobsQuery(1), timeout=3)
        assert jobs is not None and len(jobs.body["jobs"]) == 1
    finally:
        client.kill()
        client.wait()
    # The owner notices the silent client (client_timeout), drops its job, and
    # the other nodes stop running its tasks long before they would end (60 s).
    eventually(c, lambda: all(busy(n) == 0 for n in c.nodes), 20,
               "every node to drop the job's tasks")
    jobs = ask(owner.control, JobsQuery(1), timeout=3)
    assert jobs is not None and jobs.body["jobs"] == []
    # They serve the next job.
    with hived.connect(owner.control) as h:
        check_squares(list(h.map(square_where, range(12), chunksize=1)), 12, c)


def test_a_drained_node_takes_nothing_new_and_the_job_completes_elsewhere(cluster):
    c = cluster
    owner = c[0]
    victim = c[1]
    got = []
    drained_at = None
    with hived.connect(owner.control) as h:
        for r in h.map(square_where_when, range(60), chunksize=1):
            got.append(r)
            if len(got) == 15:
                answer = ask(victim.control, DrainRequest(1, victim.name), timeout=3)
                assert answer is not None and answer.body == {"draining": victim.name}
                drained_at = time.time()
                eventually(c, lambda: victim.status()["nodes"][0]["state"] == "draining", 5,
                           "the victim to show draining")
    pids = check_squares(got, 60, c)
    assert victim.proc.pid in pids[:15], "the victim ran nothing before the drain"
    # What it ran after the drain: at most what was already running or on its way.
    late = [r for r in got if r[1] == victim.proc.pid and r[2] > drained_at]
    assert len(late) <= 2, f"{len(late)} tasks started on the drained node after the drain"
    assert {owner.proc.pid, c[2].proc.pid} <= set(pids[30:])
    eventually(c, lambda: c.states(owner).get(victim.name) == "draining", 5,
               f"the owner to see {victim.name} draining")


@pytest.fixture
def notified_cluster(testnet, tmp_path):
    """As `cluster`, with systemd's end of the third node's NOTIFY_SOCKET."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        with running_cluster(testnet, env={2: {"NOTIFY_SOCKET": notify.path}}) as c:
            yield c, notify
    finally:
        notify.close()


def status_line(notify: NotifySocket) -> str | None:
    """The last STATUS= the node sent, if any came since `lines` was cleared."""
    notify.pump()
    sent = [line for line in notify.lines if line.startswith("STATUS=")]
    return sent[-1] if sent else None


def test_a_node_drained_from_another_takes_nothing_new_until_a_third_undrains_it(
    notified_cluster,
):
    c, notify = notified_cluster
    owner, asked, victim = c[0], c[1], c[2]
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where_when, range(60), chunksize=1):
            got.append(r)
            if len(got) == 15:
                notify.lines.clear()
                out = hivectl("drain", victim.name, address=asked.control)
                assert out.returncode == 0, out.stderr
                drained_at = time.time()
                assert out.stdout.startswith(f"{victim.name} is draining")
    pids = check_squares(got, 60, c)
    assert victim.proc.pid in pids[:15], "the victim ran nothing before the drain"
    late = [r for r in got if r[1] == victim.proc.pid and r[2] > drained_at]
    assert len(late) <= 2, f"{len(late)} tasks started on the drained node after the drain"
    assert f"draining (asked by {asked.name} via hivectl)" in victim.log
    assert status_line(notify).startswith("STATUS=draining; "), notify.lines
    eventually(c, lambda: all(c.states(n).get(victim.name) == "draining" for n in c.nodes), 5,
               f"every node to show {victim.name} draining")

    notify.lines.clear()
    out = hivectl("undrain", victim.name, address=owner.control)
    assert out.returncode == 0 and out.stdout == f"{victim.name} takes work again\n", out.stderr
    assert f"drain ended (asked by {owner.name} via hivectl)" in victim.log
    assert "draining" not in status_line(notify), notify.lines
    eventually(c, lambda: all(c.states(n).get(victim.name) == "alive" for n in c.nodes), 5,
               f"every node to show {victim.name} alive again")
    with hived.connect(owner.control) as h:
        pids = check_squares(list(h.map(square_where, range(30), chunksize=1)), 30, c)
    assert victim.proc.pid in pids, "the undrained node took no work"

    out = hivectl("drain", "nosuch", address=asked.control)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().endswith(
        f"no node named 'nosuch' in this hive (this node is '{asked.name}'); the nodes it "
        f"knows: {', '.join(sorted(n.name for n in c.nodes))}"
    )
    # A node gone: hivectl hears that it cannot be reached, within its own wait.
    victim.kill9()
    out = hivectl("drain", victim.name, address=asked.control)
    assert out.returncode == 1, out.stdout
    assert f"{victim.name} at {victim.address}" in out.stderr
    assert "did not answer within" in out.stderr or "cannot be reached" in out.stderr, out.stderr


def test_every_node_shows_every_row_with_an_uptime(cluster):
    c = cluster
    for node in c.nodes:
        rows = node.status()["nodes"]
        assert len(rows) == 3 and all(type(r["uptime"]) is float and r["uptime"] >= 0
                                      for r in rows), rows
        lines = hivectl("status", address=node.control).stdout.splitlines()
        header = lines[1].split()
        shown = [dict(zip(header, line.split(), strict=True))["UPTIME"] for line in lines[2:]]
        assert len(shown) == 3 and all(re.fullmatch(r"\d+\.\ds", u) for u in shown), lines


def test_a_job_cancelled_from_another_node_fails_its_map_at_once(cluster):
    c = cluster
    owner, asked = c[0], c[1]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with hived.connect(owner.control) as h:
                list(h.map(nap, [60] * 9, chunksize=1))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    client = threading.Thread(target=run)
    client.start()
    try:
        eventually(c, lambda: all(busy(n) == 1 for n in c.nodes), 20,
                   "the job's tasks running on every node")
        jobs = json.loads(hivectl("jobs", "--json", address=asked.control).stdout)["jobs"]
        (job,) = [row["id"] for row in jobs]
        out = hivectl("cancel", job, address=asked.control)
        cancelled = time.monotonic()
        assert out.returncode == 0, out.stderr
        assert out.stdout == f"job {job} cancelled on its owner {owner.name}\n"
        client.join(10)
        assert not client.is_alive(), "the map went on after its job was cancelled"
        assert time.monotonic() - cancelled < 5
    finally:
        client.join(90)
    assert len(errors) == 1 and isinstance(errors[0], hived.JobCancelled), errors
    assert f"`hivectl cancel` on {asked.name}" in str(errors[0])
    assert f"cancelled (asked by {asked.name} via hivectl)" in owner.log
    # Every node drops its tasks long before they would end (60 s), and the
    # hive serves the next map.
    eventually(c, lambda: all(busy(n) == 0 for n in c.nodes), 10,
               "every node to drop the cancelled job's tasks")
    with hived.connect(owner.control) as h:
        check_squares(list(h.map(square_where, range(12), chunksize=1)), 12, c)

    out = hivectl("cancel", job, address=c[2].control)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.strip().endswith(
        f"no job '{job}' in this hive; the jobs it has: none (`hivectl jobs`)"), out.stderr


# A stopped coordinator resigns its term: the next voter in the back-off order
# stands within lease/8 of the RESIGN and wins in a round trip. Half a lease
# leaves room for a loaded machine and is still half of what a stop cost when
# the hive waited out the old lease (a lease or more after the drain ended).
HAND_OVER = TIMING["lease"] / 2
HANDED_OVER = re.compile(r"stepping down as coordinator \(term (\d+)\): stopping; the hive "
                         r"elects another now")


def test_systemctl_stop_of_a_worker_node_mid_job_loses_no_result(cluster):
    """SIGTERM (what `systemctl stop` sends) drains a worker node in the middle
    of a distributed map: its running task finishes and reports, what it had
    pulled goes back, it leaves, exits 0, and the job completes elsewhere.
    Not the coordinator, it hands nothing over: the lease stays where it is."""
    c = cluster
    held = c.wait_agreed()
    owner = pick(c, [c.node(held[0])])
    victim = pick(c, [c.node(held[0]), owner])
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where, range(60), chunksize=1):
            got.append(r)
            if len(got) == 15:
                victim.proc.terminate()
                stopped_at = time.monotonic()
        assert victim.proc.wait(30) == 0, victim.log
    # The drain ends when its running task does, not at drain_timeout (30 s).
    assert time.monotonic() - stopped_at < 15
    pids = check_squares(got, 60, c)
    assert victim.proc.pid in pids[:15], "the victim ran nothing before it was stopped"
    eventually(c, lambda: victim.name not in c.states(owner), 10,
               f"the owner to drop {victim.name}, which said goodbye")
    assert not HANDED_OVER.search(victim.log), victim.log
    # the same node; its term may have risen (a renewal round that a voter
    # refused and that timed out asks for the next term)
    assert c.wait_agreed([owner, c.node(held[0])])[0] == held[0]


def test_systemctl_stop_of_the_coordinator_hands_over_at_once_and_loses_no_result(cluster):
    """SIGTERM to the coordinator in the middle of a distributed map: it says
    it steps down, the others know a new coordinator within HAND_OVER (not
    the ~2 leases a lost coordinator costs), the leases never overlap, the
    old one drains and exits 0, and every result arrives exactly once."""
    c = cluster
    old, term = c.wait_agreed()
    coord = c.node(old)
    owner = pick(c, [coord])
    rest = [n for n in c.nodes if n is not coord]
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where, range(60), chunksize=1):
            got.append(r)
            if len(got) == 15:
                stopped_at = time.time()
                coord.proc.terminate()
                new, new_term = c.wait_agreed(rest, timeout=10, exclude=old)
                known = time.time() - stopped_at
        assert coord.proc.wait(30) == 0, coord.log
    pids = check_squares(got, 60, c)
    assert coord.proc.pid in pids, "the old coordinator ran nothing"
    assert [int(t) for t in HANDED_OVER.findall(coord.log)] == [term], coord.log
    assert new != old and new_term > term
    logs = {n.name: n.log for n in c.nodes}
    won = next(float(m.group(2)) for m in BECAME.finditer(logs[new]) if int(m.group(1)) == new_term)
    assert won - stopped_at < HAND_OVER, f"{new} won {won - stopped_at:.3f}s after the SIGTERM"
    assert known < HAND_OVER, f"the others knew {new} {known:.3f}s after the SIGTERM"
    report = Report(0, [], [])
    check_leases(leases(logs, [], time.time(), report), report)
    assert report.ok, report.violations
    print(f"hand-over: {new} won {won - stopped_at:.3f}s and the others knew it "
          f"{known:.3f}s after the SIGTERM")


def test_two_clients_on_two_owners_share_the_slots_about_evenly(cluster):
    """Two jobs submitted at once to different owners: each owner runs its own
    job locally, and the third node's slot is shared between the two."""
    c = cluster
    n = 40
    got: dict[str, list[tuple]] = {}

    def run(node: MeshNode, job: str, ready: threading.Barrier) -> None:
        with hived.connect(node.control) as h:
            ready.wait(10)
            got[job] = list(h.map(square_where_when, range(n), chunksize=1))

    ready = threading.Barrier(2)
    threads = [threading.Thread(target=run, args=(c[i], job, ready)) for i, job in ((0, "a"), (1, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(got) == {"a", "b"}, "a client did not finish"
    for job in ("a", "b"):
        check_squares(got[job], n, c)
    # While both jobs had work queued, both made progress at about the same rate.
    until = min(max(r[2] for r in got[job]) for job in ("a", "b"))
    started = {job: sum(r[2] <= until for r in got[job]) for job in ("a", "b")}
    assert 0.6 <= started["a"] / started["b"] <= 1.67, started
    # And the node that owns neither job served both.
    third = c[2].proc.pid
    on_third = {job: sum(r[1] == third and r[2] <= until for r in got[job]) for job in ("a", "b")}
    assert min(on_third.values()) >= 0.25 * sum(on_third.values()), on_third


def test_gpu_tasks_run_only_on_the_node_with_a_gpu_slot(gpu_cluster):
    """gpus=1 tasks submitted on a node without GPUs go to the one node that
    has a GPU slot, into its GPU worker; CPU tasks meanwhile run everywhere
    and never see that GPU."""
    c = gpu_cluster
    owner, gpu_node = c[0], c[2]
    with hived.connect(owner.control) as h:
        assert h.slots == 4  # three CPU slots and one GPU slot
        gpu_results = h.map(square_where_when, range(10), chunksize=1, gpus=1)
        cpu_got = list(h.map(square_where_when, range(30), chunksize=1))
        gpu_got = list(gpu_results)
    check_squares(gpu_got, 10, c)
    assert {(r[1], r[3]) for r in gpu_got} == {(gpu_node.proc.pid, "0")}
    check_squares(cpu_got, 30, c)
    assert {r[1] for r in cpu_got} == {n.proc.pid for n in c.nodes}
    assert {r[3] for r in cpu_got if r[1] == gpu_node.proc.pid} == {""}


def test_a_slow_node_takes_fewer_tasks_with_no_tuning(slow_node_cluster):
    """Nodes pull work as their slots free up, so a node whose tasks run four
    times slower ends up with about a quarter of a fast node's share."""
    c = slow_node_cluster
    with hived.connect(c[0].control) as h:
        pids = check_squares(list(h.map(square_where_paced, range(90), chunksize=1)), 90, c)
    ran = {n.name: pids.count(n.proc.pid) for n in c.nodes}
    fast = min(ran[c[0].name], ran[c[1].name])
    assert 0 < ran[c[2].name] <= fast / 2, ran



def square_where_in(args):
    """x² in `seconds`, and the daemon whose worker ran it."""
    x, seconds = args
    time.sleep(seconds)
    return x * x, os.getppid()


def pause(node: MeshNode, seconds: float) -> threading.Timer:
    """SIGSTOP the node's daemon now, SIGCONT it after `seconds` (in the background)."""
    os.kill(node.proc.pid, signal.SIGSTOP)
    timer = threading.Timer(seconds, os.kill, (node.proc.pid, signal.SIGCONT))
    timer.start()
    return timer


def map_pausing(c: Cluster, owner: MeshNode, victim: MeshNode, n: int, seconds: float,
                at: int) -> tuple[list[tuple], float]:
    """Map n tasks of `seconds` from `owner`, pausing `victim` for twice
    dead_after once `at` results came; the results, and how long the map
    took from the pause."""
    got, stall = [], 2 * TIMING["dead_after"]
    with hived.connect(owner.control) as h:
        for r in h.map(square_where_in, [(x, seconds) for x in range(n)], chunksize=1,
                       timeout=30):
            got.append(r)
            if len(got) == at:
                timer = pause(victim, stall)
                paused_at = time.monotonic()
    timer.join()
    return got, time.monotonic() - paused_at


# 0.1 s tasks: on SIGCONT the owner first answers the PULLs queued meanwhile,
# while its links are still down (the RANGE never leaves; it used to wait on it
# for ever). 1.5 s tasks, paused as the second round starts: on SIGCONT the
# owner's timers fire first, it sees every node dead and requeues, and their
# late DONEs are dropped.
@pytest.mark.parametrize(("seconds", "at"), [(0.1, 15), (1.5, 1)], ids=["pulls", "requeues"])
def test_an_owner_paused_past_dead_after_finishes_its_map(cluster, seconds, at):
    """The owner (and coordinator) stops for longer than dead_after while the
    other nodes run its ranges; once it runs again the map completes, every
    item exactly once, in bounded time. Its client, on the owner's control
    socket with no key for the others, takes the owner as lost after
    dead_after too, greets it again once it answers and sends what was not
    delivered once more."""
    c = cluster
    owner = coordinator(c)
    n = 45 if seconds < 1 else 9
    got, took = map_pausing(c, owner, owner, n, seconds, at)
    pids = check_squares(got, n, c)
    assert {node.proc.pid for node in c.nodes} <= set(pids)
    # The stall, then the rest on three slots (what was running at the pause
    # runs again for the client that came back), a round of pulls and a heartbeat.
    bound = 2 * TIMING["dead_after"] + n * seconds / 3 + seconds + 3.0
    assert took < bound, f"{took:.1f} s from the pause to the last result (bound {bound:.1f} s)"


def test_a_worker_node_paused_past_dead_after_loses_and_doubles_nothing(cluster):
    """A worker node stops mid-map for longer than dead_after: the owner
    requeues its ranges, and what it finishes late is dropped, not delivered
    twice; the map completes in bounded time."""
    c = cluster
    owner = c[0]
    victim = pick(c, [owner, coordinator(c)])
    got, took = map_pausing(c, owner, victim, 30, 0.5, 3)
    check_squares(got, 30, c)
    bound = 2 * TIMING["dead_after"] + 30 * 0.5 / 2 + 3.0  # at worst on two slots after it
    assert took < bound, f"{took:.1f} s from the pause to the last result (bound {bound:.1f} s)"


def test_a_link_cut_shorter_than_dead_after_loses_no_range(cluster):
    """The link between the owner and a worker node is cut for longer than
    the suspect time and shorter than dead_after, while that node runs the
    owner's ranges and reports one: both ends re-dial their DEALERs (what
    the old ones still held is dropped), neither ever sees the other dead,
    and the map completes, every item exactly once, in bounded time."""
    c = cluster
    owner, worker = c[0], c[1]
    cut = (2 * TIMING["heartbeat"] + TIMING["dead_after"]) / 2  # suspect, never dead
    n, seconds = 12, 0.6  # a task ends, and its report leaves, during the cut
    got = []
    with hived.connect(owner.control) as h:
        for r in h.map(square_where_in, [(x, seconds) for x in range(n)], chunksize=1,
                       timeout=30):
            got.append(r)
            if len(got) == 3:
                c.net.drop_between([owner.host], [worker.host])
                cut_at = time.monotonic()
                threading.Timer(cut, c.net.heal_all).start()
    took = time.monotonic() - cut_at
    pids = check_squares(got, n, c)
    assert worker.proc.pid in pids
    assert f"{worker.name} is suspect" in owner.log and f"{owner.name} is suspect" in worker.log
    assert c.states(owner).get(worker.name) != "dead"
    # The cut, a HELD? round (each dead_after) should a report be lost, the rest on three slots.
    bound = cut + TIMING["dead_after"] + n * seconds / 3 + 3.0
    assert took < bound, f"{took:.1f} s from the cut to the last result (bound {bound:.1f} s)"


@pytest.fixture
def node_and_peer(testnet):
    """A daemon on h0, and on h1 a peer driven by hand (tests/meshpeer.py) that
    joined it and keeps beating."""
    tmp = tempfile.TemporaryDirectory(prefix="hived-dist-")
    c = Cluster(testnet(2), tmp.name, voters=1)
    node = c[0].start()
    peer = None
    try:
        c.wait_agreed([node])
        peer = MeshPeer(c.net[1], PORT, load_key(c.key_path), "by-hand", node.address,
                        beat=TIMING["heartbeat"] / 2)
        eventually(c, lambda: c.states(node).get("by-hand") == "alive", 10, "the peer joined")
        # and the node's own link to the peer is up: its DEALER queues only
        # for a connected peer (ZMQ_IMMEDIATE), so an answer sent while its
        # handshake is under way is dropped, for the protocol's HELD? to mend
        peer.expect(Beat, 10)
        yield c, node, peer
    finally:
        print(c.logs())
        if peer is not None:
            peer.close()
        node.kill9()
        c.net.close()
        tmp.cleanup()


def test_a_range_its_node_does_not_hold_runs_again(node_and_peer):
    """A peer pulls a range and never reports it, as when a RANGE or its
    report is dropped with a connection. The owner asks every dead_after
    which of its ranges that node holds (HELD?): a question left unanswered
    gets the link dialled again; while the node says it holds the range the
    owner waits; once the node says it lacks it, it runs again.
    The peer is driven by hand (tests/meshpeer.py) and stays alive throughout."""
    _, owner, peer = node_and_peer
    got, n = [], 6
    mapping = threading.Thread(target=lambda: got.extend(hived.connect(owner.control).map(
        square_where_in, [(x, 0.3) for x in range(n)], chunksize=1, timeout=30)))
    mapping.start()
    deadline = time.monotonic() + 10
    while True:  # pull until the job is there and gives us a range
        peer.send(Pull(1, 0, []))
        msg, _ = peer.expect((RangeMsg, Nothing), 2)
        if isinstance(msg, RangeMsg):
            break
        assert time.monotonic() < deadline, "no RANGE for the peer's PULLs"
        time.sleep(0.05)
    held = msg.assignment
    ask_every = TIMING["dead_after"] + 2 * TIMING["heartbeat"]  # a HELD? per dead_after
    first, _ = peer.expect(HeldAsk, ask_every)
    assert held in first.assignments  # left unanswered: the owner re-dials us
    second, _ = peer.expect(HeldAsk, 2 * ask_every)  # a round to re-dial, then asked
    assert held in second.assignments
    assert f"no answer from {peer.address} to the last HELD?" in owner.log
    peer.send(HeldTell([]))  # we hold it: the owner must go on waiting
    third, _ = peer.expect(HeldAsk, ask_every)
    assert held in third.assignments
    assert "lost it or its report" not in owner.log
    peer.send(HeldTell([held]))  # we lack it: it runs again, on the owner
    mapping.join(30)
    assert not mapping.is_alive(), "the map did not end"
    assert got == [(x * x, owner.proc.pid) for x in range(n)]
    assert "requeued 1 range(s)" in owner.log and "lost it or its report" in owner.log


def test_a_range_whose_blob_does_not_match_its_hash_never_runs(node_and_peer):
    """A peer (an owner, here driven by hand) sends a RANGE whose function
    blob is not the one its hash names: the node refuses it (FAIL, saying
    why) and runs nothing."""
    _, node, peer = node_and_peer
    claimed = function_digest(b"the function it claims to be")
    peer.send(RangeMsg(7, 1, claimed, True, 0, 1, 1, 0, False), [b"something else", b"[]"])
    failed, _ = peer.expect(RangeFailed, 5)
    assert failed.assignment == 7 and "does not match its hash" in failed.text
    assert "does not match its hash" in node.log
    assert (node.status() or {"nodes": [{}]})["nodes"][0].get("tasks_done") == 0
