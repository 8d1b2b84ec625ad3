"""A job survives the loss of the node its client talks to (its owner).

Three hosts with a hived each (CURVE, the short timings of `meshnet.TIMING`)
and a fourth host with only a client (tests/failover_client.py, its own
process), which is given the first node's address alone and learns the
others from it. The test kills that node with kill -9, or cuts the client's
host off from it, in the middle of the client's work; the client must move
to another node and deliver every result exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import hived
from hived.caller import progress
from hived.caller.failover import TRIED_AT_ONCE, AddressBook, parse_addresses
from hived.testing.childenv import child_env
from hived.testing.meshnet import TIMING, Cluster, MeshNode
from hived.testing.waiting import wait_for

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failover_client.py")
TASK = 0.1  # seconds per task: a map of 45 runs ~1.5 s on three slots
N = 45


class Client:
    """failover_client.py on its own host; its lines as they come."""

    def __init__(self, c: Cluster, mode: str, n: int = N, reconnect_timeout: float = 20) -> None:
        self.lines: list[str] = []
        args = [sys.executable, CLIENT, mode, c[0].address, str(n), str(TASK),
                str(reconnect_timeout)]
        self.proc = c.net[3].popen(args, env=child_env(HIVED_KEY_FILE=c.key_path),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def results(self) -> list[list[int]]:
        return [json.loads(line) for line in self.lines if line.startswith("[")]

    def wait_results(self, count: int, c: Cluster) -> None:
        eventually(c, lambda: len(self.results()) >= count, 30, f"{count} results\n{self}")

    def end(self, timeout: float, c: Cluster) -> str:
        """The last line, once the client exited (within `timeout`)."""
        eventually(c, lambda: self.proc.poll() is not None, timeout, f"the client to end\n{self}")
        self._reader.join(5)
        return self.lines[-1] if self.lines else ""

    def node(self, c: Cluster) -> MeshNode:
        eventually(c, lambda: any(line.startswith("node ") for line in self.lines), 20,
                   f"the client to connect\n{self}")
        name = next(line.split()[1] for line in self.lines if line.startswith("node "))
        return c.node(name)

    def __str__(self) -> str:
        return "client output:\n" + "\n".join(self.lines[-40:])


def eventually(c: Cluster, predicate, timeout: float, what: str):
    try:
        return wait_for(predicate, timeout, interval=0.05, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{c.logs()}") from None


@pytest.fixture
def cluster(testnet):
    """Three hosts with a hived each, every node seeing the others, and a
    fourth host for the client."""
    tmp = tempfile.TemporaryDirectory(prefix="hived-failover-")
    c = Cluster(testnet(4), tmp.name, voters=3)
    nodes = c.nodes[:3]
    try:
        for node in nodes:
            node.start()
        names = {n.name for n in nodes}
        eventually(c, lambda: all({k for k, s in c.states(n).items() if s == "alive"} == names
                                  for n in nodes), 30, "full membership")
        c.wait_agreed(nodes)
        yield c
    finally:
        print(c.logs())
        for node in nodes:
            if node.alive():
                node.kill9()
        c.net.close()
        tmp.cleanup()


def check_exactly_once(results: list[list[int]], n: int, ordered: bool) -> None:
    values = [r[1] for r in results]
    expected = [x * x for x in range(n)]
    assert (values if ordered else sorted(values)) == expected, values


@pytest.mark.parametrize("mode", ["ordered", "unordered", "endless", "submit"])
def test_the_clients_node_killed_mid_work_loses_and_doubles_nothing(cluster, mode):
    c = cluster
    client = Client(c, mode)
    owner = client.node(c)
    assert owner is c[0]
    client.wait_results(10, c)
    owner_pid = owner.proc.pid
    owner.kill9()
    # dead_after to notice, a round to greet another node, then the rest on two slots
    assert client.end(TIMING["dead_after"] + 2.0 + N * TASK / 2 + 10, c) == "done", client
    results = client.results()
    check_exactly_once(results, N, ordered=mode in ("ordered", "endless"))
    later = [r[2] for r in results[15:]]  # well after the kill: from the other nodes only
    assert owner_pid not in later, f"results from the killed node after it was killed\n{client}"


def test_a_client_cut_off_from_its_node_moves_to_another(cluster):
    """The node lives on (it is cut off from the client's host only); the
    client moves, the old node drops the job once the client is silent."""
    c = cluster
    client = Client(c, "ordered")
    owner = client.node(c)
    client.wait_results(10, c)
    c.net.drop_between([c.net[3]], [owner.host])
    assert client.end(TIMING["dead_after"] + 2.0 + N * TASK / 2 + 10, c) == "done", client
    check_exactly_once(client.results(), N, ordered=True)
    assert owner.alive()
    eventually(c, lambda: "dropping its 1 job" in owner.log, 15,
               "the old owner to drop the silent client's job")


def test_every_node_lost_ends_with_hive_unavailable_naming_them(cluster):
    c = cluster
    reconnect_timeout = 2.0
    client = Client(c, "ordered", n=400, reconnect_timeout=reconnect_timeout)
    client.node(c)
    client.wait_results(3, c)
    nodes = c.nodes[:3]
    for node in nodes:
        node.kill9()
    killed = time.monotonic()
    last = client.end(reconnect_timeout + 10, c)
    took = time.monotonic() - killed
    assert last.startswith("error HiveUnavailable"), client
    for node in nodes:
        assert node.address in last, f"{node.address} not named: {last}"
    # counted from the last answer, so at most a ping's period (and a
    # loaded machine's slack) past reconnect_timeout from the kills
    assert took <= reconnect_timeout + TIMING["heartbeat"] + 1.5, (took, last)


# -- the sans-IO parts -------------------------------------------------------------------


@pytest.mark.parametrize("given, expected", [
    ("tcp://a:1", ["tcp://a:1"]),
    ("tcp://a:1, ipc:///run/hived/hived.sock", ["tcp://a:1", "ipc:///run/hived/hived.sock"]),
    (["tcp://a:1", "tcp://b:2", "tcp://a:1"], ["tcp://a:1", "tcp://b:2"]),
    ("embedded", ["embedded"]),
])
def test_addresses_are_a_list_or_commas(given, expected):
    assert parse_addresses(given) == expected


@pytest.mark.parametrize("given, match", [
    ("tcp://a:1,", "an empty address"),
    ([], "an empty address"),
    ("embedded,tcp://a:1", "'embedded' cannot be one of several"),
    ("http://a:1", "expected 'embedded', 'ipc://PATH' or 'tcp://HOST:PORT'"),
    (7, "expected a string or a list of strings"),
    (["tcp://a:1", None], "expected a string or a list of strings"),
])
def test_bad_addresses_get_one_clear_error(given, match):
    with pytest.raises(hived.HiveError, match=match):
        hived.connect(given)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "30", True, None])
def test_a_bad_reconnect_timeout_gets_one_clear_error(value):
    with pytest.raises(ValueError, match="reconnect_timeout must be a finite number of seconds >= 0"):
        hived.connect("embedded", reconnect_timeout=value)


def test_the_address_book_tries_the_lost_address_last_and_skips_what_it_cannot_dial():
    book = AddressBook(["tcp://a:1"], dialable=lambda address: address != "tcp://nokey:1")
    book.learn(["tcp://a:1", "tcp://b:1", "tcp://nokey:1", "tcp://c:1"])
    assert book.learned == ["tcp://b:1", "tcp://nokey:1", "tcp://c:1"]
    assert book.candidates() == ["tcp://a:1", "tcp://b:1", "tcp://c:1"]
    assert book.candidates("tcp://a:1") == ["tcp://b:1", "tcp://c:1", "tcp://a:1"]
    book.learn([f"tcp://n{i}:1" for i in range(40)])
    assert len(book.candidates("tcp://a:1")) == TRIED_AT_ONCE
    assert book.candidates("tcp://a:1")[-1] == "tcp://a:1"


def test_the_progress_bar_says_when_the_client_is_reconnecting(monkeypatch, capsys):
    monkeypatch.setattr(progress, "progress_bar", lambda total: progress.TextBar(total, sys.stderr))
    bar = progress.Progress(10)
    bar.note("reconnecting: hived at tcp://a:1 answered no ping for 3s")
    bar.close()
    assert "hived reconnecting: hived at tcp://a:1 answered no ping for 3s\n" in capsys.readouterr().err
