"""Fuzzing the mesh surface: a key holder sends real daemons hostile mesh messages.

Three daemons (CURVE, the real-host timings) and a fourth host holding the
cluster key that runs no daemon: it dials every daemon from its own address
and sends batches of messages drawn from the message definitions
(tests/hostile.py), so a new message type is fuzzed with no new code. After
every batch each daemon must be alive, answer `status` within 2 s, elect an
honest coordinator within 2 x lease + heartbeat of the batch's end, run a map
correctly, have logged no traceback, and stay within a memory bound.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections import Counter

import pytest
import zmq
from hostile import mesh_messages
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import hived
from hived.mesh.gossip import PeerHello
from hived.net.security import load_key
from hived.protocol.wire import encode
from hived.testing.meshnet import PORT, Cluster
from hived.testing.waiting import wait_for

BATCHES = 25
MEMORY_GROWTH = 64 << 20  # bytes a daemon's resident memory may grow over the whole run


@pytest.fixture
def hive(testnet):
    tmp = tempfile.TemporaryDirectory(prefix="hived-fuzz-")
    net = testnet(4)
    c = Cluster(net, tmp.name, voters=3)
    c.nodes, attacker = c.nodes[:3], net[3]
    c.seeds = c.seeds[:3]
    c.start()
    try:
        yield c, attacker
    finally:
        for node in c.nodes:
            if node.alive():
                node.kill9()
        net.close()
        tmp.cleanup()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_hostile_mesh_messages_from_a_key_holder_do_no_lasting_harm(hive):
    c, attacker = hive
    c.wait_agreed()
    me = f"tcp://{attacker.addr}:{PORT}"
    names = [n.name for n in c.nodes] + ["m"]
    addresses = [n.address for n in c.nodes] + [me]
    bound = 2 * c.timing["lease"] + c.timing["heartbeat"]
    baseline = {n.name: rss(n.proc.pid) for n in c.nodes}
    introduce = PeerHello("m", me, hived.__version__, 1, 1, 0, 1, 0.0, "alive", 0, 0, False, [], [], [])
    sent: Counter[str] = Counter()
    took: list[float] = []
    rng = random.Random(9)

    with attacker.enter():
        ctx = zmq.Context()
        dealers = []
        for node in c.nodes:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.identity = me.encode()  # its own address: it speaks as itself
            sock.sndhwm = 100_000
            load_key(c.key_path).client(sock)
            sock.connect(node.address)
            dealers.append(sock)

    def check(ended: float) -> None:
        for node in c.nodes:
            assert node.alive(), f"{node.name} died\n{c.logs()}"
            started = time.monotonic()
            assert node.status(timeout=2.0) is not None, f"{node.name} did not answer\n{c.logs()}"
            assert time.monotonic() - started <= 2.0
        name, _ = wait_for(
            lambda: (got := c.agreed_coordinator()) and got[0] in names[:-1] and got,
            bound + 5, interval=0.05, what=f"an honest coordinator\n{c.logs()}",
        )  # fmt: skip
        took.append(time.monotonic() - ended)
        assert took[-1] <= bound, f"agreed {took[-1]:.2f}s after the batch (bound {bound}s)"
        with hived.connect(c.nodes[len(took) % 3].control) as h:
            assert list(h.map(abs, range(-40, 0), timeout=20)) == list(range(40, 0, -1))
        for node in c.nodes:
            assert "Traceback" not in node.log, f"{node.name} logged a traceback\n{node.log[-4000:]}"
            grown = rss(node.proc.pid) - baseline[node.name]
            assert grown <= MEMORY_GROWTH, f"{node.name} grew {grown >> 20} MiB"

    batch_of = st.lists(
        st.tuples(st.integers(0, len(c.nodes) - 1), mesh_messages(names, addresses)),
        min_size=100, max_size=300,
    )

    @settings(max_examples=BATCHES, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(batch=batch_of)
    def one_batch(batch):
        for sock in dealers:
            sock.send_multipart(encode(introduce))
        for to, (msg, payload) in batch:
            frames = encode(msg, payload)
            if rng.random() < 0.1:  # now and then a header that is not msgpack at all
                frames[0] = frames[0].split(b"\n", 1)[0] + b"\n" + rng.randbytes(12)
            dealers[to].send_multipart(frames)
            sent[type(msg).__name__] += 1
        check(time.monotonic())

    try:
        one_batch()
    finally:
        for sock in dealers:
            sock.close()
        ctx.term()
    total = sum(sent.values())
    print(f"mesh fuzz: {total} hostile messages in {len(took)} batches, "
          f"{len(sent)} types: {dict(sorted(sent.items()))}; "
          f"honest coordinator agreed {max(took):.2f}s at most after a batch (bound {bound}s)")
    assert len(took) == BATCHES and total >= 100 * BATCHES
