"""Upgrades across real hosts: minors of one major interoperate, majors refuse each other.

Real daemons on test hosts (network namespaces, CURVE on, the short
timings of `meshnet.TIMING`); tests/speak.py runs a daemon, or hivectl, as
a release of another protocol version would be: protocol 1.1 (with a
message type and a BEAT field of minor 1's) or 2.0. The test process is the
client, of this checkout's protocol (1.0).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading

from test_cli import hivectl
from test_distributed import check_squares, eventually, running_cluster, square_where

import hived
from hived.protocol.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR
from hived.testing.childenv import child_env
from hived.testing.meshnet import Cluster, MeshNode

SPEAK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "speak.py")
OURS = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
NEWER_MINOR = f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR + 1}"
NEWER_MAJOR = f"{PROTOCOL_MAJOR + 1}.0"


def speaking(version: str) -> list[str]:
    """MeshNode.launch for a daemon of protocol `version`."""
    return [SPEAK, version, "daemon"]


def hivectl_of(version: str, *args: str, address: str) -> subprocess.CompletedProcess:
    """hivectl of protocol `version`."""
    return subprocess.run([sys.executable, SPEAK, version, "cli", "--connect", address, *args],
                          env=child_env(), capture_output=True, text=True, timeout=30)  # fmt: skip


def protocols(node: MeshNode) -> dict[str, str | None] | None:
    """What `node` says each live node speaks, by name."""
    view = node.status()
    if view is None:
        return None
    return {r["name"]: r.get("protocol") for r in view["nodes"] if r["state"] == "alive"}


def own_row(node: MeshNode) -> dict:
    return next(r for r in node.status()["nodes"] if "last_heard" not in r)


def protocol_errors(node: MeshNode) -> list[str]:
    return [line for line in node.log.splitlines() if "mesh: dropped a" in line]


def test_a_node_of_a_newer_minor_runs_its_share_of_a_map(testnet) -> None:
    with running_cluster(testnet, launch={2: speaking(NEWER_MINOR)}) as c:
        with hived.connect(c[0].control) as h:
            pids = check_squares(list(h.map(square_where, range(40), chunksize=1)), 40, c)
        others = {n.proc.pid for n in c.nodes[1:]}
        assert others <= set(pids), f"ran on {sorted(set(pids))}, expected {sorted(others)} too"
        expected = {"h0": OURS, "h1": OURS, "h2": NEWER_MINOR}
        for node in c.nodes:
            assert protocols(node) == expected, node.name
            assert protocol_errors(node) == [], node.log
        for node in c.nodes[:2]:  # the newer node's type and field never reached them
            row = own_row(node)
            assert row["mesh_ignored"] == {} and "M.NEWS" not in row["mesh_bytes_in"], row
        assert "M.NEWS" not in own_row(c[2])["mesh_bytes_in"]  # no peer of minor 1 to send it


def test_a_rolling_upgrade_under_a_running_map_delivers_every_result_once(testnet) -> None:
    """SIGTERM (a drain), then the same config under a release of minor 1,
    one node at a time, the client's own node included, while a map over an
    endless input runs; then the input ends and the map completes."""
    with running_cluster(testnet) as c:
        stop, sent, got, failed = threading.Event(), [], [], []

        def inputs():
            for x in itertools.count():
                if stop.is_set():
                    return
                sent.append(x)
                yield x

        def client() -> None:
            try:
                with hived.connect(",".join(n.control for n in c.nodes)) as h:
                    got.extend(h.map(square_where, inputs(), chunksize=1))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failed.append(exc)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        pids, mixes = {n.proc.pid for n in c.nodes}, []
        try:
            upgraded: set[str] = set()
            for node in (c[1], c[2], c[0]):
                mark = len(sent)
                eventually(c, lambda mark=mark: len(sent) > mark + 5, 20, "the map going on")
                assert own_row(node)["mesh_ignored"] == {}, "a newer minor's type reached a 1.0 node"
                node.proc.terminate()
                assert node.proc.wait(30) == 0, node.log
                node.launch = speaking(NEWER_MINOR)
                node.start()
                upgraded.add(node.name)
                expected = {n.name: NEWER_MINOR if n.name in upgraded else OURS for n in c.nodes}
                eventually(c, lambda e=expected: all(protocols(n) == e for n in c.nodes), 30,
                           f"every node to see {expected}")
                pids.add(node.proc.pid)
                out = hivectl("status", "--json", address=c[0].control)
                assert out.returncode == 0, out.stderr
                mixes.append({r["name"]: r["protocol"] for r in json.loads(out.stdout)["nodes"]})
            mark = len(sent)
            eventually(c, lambda: len(sent) > mark + 5, 20, "the map going on after the upgrade")
        finally:
            stop.set()
            thread.join(60)
        assert not failed, failed
        assert not thread.is_alive(), "the map did not finish"
        assert mixes == [
            {"h0": OURS, "h1": NEWER_MINOR, "h2": OURS},
            {"h0": OURS, "h1": NEWER_MINOR, "h2": NEWER_MINOR},
            {"h0": NEWER_MINOR, "h1": NEWER_MINOR, "h2": NEWER_MINOR},
        ]
        assert len(got) == len(sent) > 30
        assert [r[0] for r in got] == [x * x for x in sent], "a result lost, doubled or out of order"
        assert {r[1] for r in got} <= pids, "a result from an unknown process"
        for node in c.nodes:
            assert protocol_errors(node) == [], node.log
            # minor 1's type and field went between the upgraded nodes, both ways
            for other in c.nodes:
                if other is not node:
                    for what in ("M.NEWS", "M.BEAT.news"):
                        eventually(c, lambda n=node, w=what, o=other: f"speak: got {w} from {o.name}"
                                   in n.log, 10, f"{node.name} to get {what} from {other.name}")


def test_nodes_of_two_majors_refuse_each_other_and_both_say_so(testnet) -> None:
    """h1, a release of the next major, has h0 as its seed; h0 has none. h0
    refuses h1's HELLOs and answers each with REFUSED; h1 learns from that.
    Each side's own hivectl shows it, in status and doctor."""
    tmp = tempfile.TemporaryDirectory(prefix="hived-major-")
    c = Cluster(testnet(2), tmp.name, voters=1, launch={1: speaking(NEWER_MAJOR)})
    try:
        old, new = c.start().nodes
        theirs = (f"peer speaks protocol {NEWER_MAJOR}, this node {OURS}; nodes of another major "
                  "version do not interoperate: upgrade this node")  # fmt: skip
        ours = (f"peer speaks protocol {OURS}, this node {NEWER_MAJOR}; nodes of another major "
                "version do not interoperate: upgrade that node")  # fmt: skip

        def shown(version: str, node: MeshNode, line: str) -> bool:
            out = hivectl_of(version, "status", address=node.control)
            return out.returncode == 0 and out.stdout.splitlines()[-1] == line

        eventually(c, lambda: shown(OURS, old, f"peer {new.address} is refusing: {theirs}"), 20,
                   "the old node's status to show the new one refusing")
        eventually(c, lambda: shown(NEWER_MAJOR, new, f"seed {old.address} is refusing: {ours}"),
                   20, "the new node's status to show its seed refusing")
        body = json.loads(hivectl_of(NEWER_MAJOR, "status", "--json", address=new.control).stdout)
        assert [r["protocol"] for r in body["nodes"]] == [NEWER_MAJOR]
        for version, node, kind, other, why in ((OURS, old, "peer", new, theirs),
                                                (NEWER_MAJOR, new, "seed", old, ours)):
            out = hivectl_of(version, "doctor", address=node.control)
            assert out.returncode == 1, out.stdout + out.stderr
            assert (f"FAIL  the daemon's {kind} {other.address} is refusing: {why} — "
                    in out.stdout), out.stdout
        assert f"mesh: peer {new.address} is refusing: {theirs}" in old.log
        assert f"mesh: dropped a M.HELLO from {new.address}: {theirs}" in old.log
        assert f"mesh: seed {old.address} is refusing: {ours}" in new.log
    finally:
        print(c.logs())
        for node in c.nodes:
            if node.alive():
                node.kill9()
        c.net.close()
        tmp.cleanup()
