"""A seed that is unreachable or refuses us is shown, with why: status, doctor, STATUS=.

Real daemons on loopback: one whose seed holds another cluster key, one whose
seed's port is closed, and one whose seed speaks another protocol major (a
fake peer's own connection sends it what such a node would).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import free_port
from test_daemon import NotifySocket

import hived.doctor
from hived.doctor import diagnose
from hived.mesh.seeds import NO_CONNECTION, REFUSAL_KEPT, WRONG_KEY, SeedWatch
from hived.net.security import write_key
from hived.protocol.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for


def seed_row(daemon, address: str) -> dict | None:
    rows = [r for r in daemon.status().get("seeds", []) if r["address"] == address]
    return rows[0] if rows and rows[0]["state"] not in ("joining", "member") else None


SEED = "tcp://10.0.0.1:7000"


def seed_state(events: list[int]) -> tuple[str, str]:
    watch = SeedWatch([SEED], "tcp://10.0.0.2:7000")
    for event in events:
        watch.dealer_event(SEED, event)
    (row,) = watch.rows(alive=())
    return row["state"], row["why"]


@pytest.mark.parametrize("events, expected", [
    ([zmq.EVENT_CONNECT_RETRIED], ("unreachable", NO_CONNECTION)),
    ([zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_CONNECT_RETRIED],
     ("refusing", WRONG_KEY)),
    # The first CONNECTED before anyone watched: the failed handshake says there was one.
    ([zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_CONNECT_RETRIED], ("refusing", WRONG_KEY)),
    ([zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_CONNECT_RETRIED, zmq.EVENT_CONNECT_RETRIED],
     ("unreachable", NO_CONNECTION)),
    ([zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED],
     ("joining", "not heard from yet")),
])
def test_the_seed_table_reads_the_monitor_events(events: list[int], expected: tuple[str, str]) -> None:
    assert seed_state(events) == expected


def test_a_seed_with_another_key_is_refusing_in_status_doctor_and_status_line(
    make_daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = tmp_path / "ours.key", tmp_path / "theirs.key"
    write_key(str(ours))
    write_key(str(theirs))
    seed = f"tcp://127.0.0.1:{free_port()}"
    make_daemon("--bind", seed, "--key-file", str(theirs), "--name", "stranger")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = make_daemon("--seed", seed, "--key-file", str(ours),
                             env=child_env(NOTIFY_SOCKET=notify.path))
        row = wait_for(lambda: seed_row(daemon, seed), 20, what="the seed's refusal in status")
        assert row == {"address": seed, "state": "refusing", "why": WRONG_KEY}
        out = subprocess.run([sys.executable, "-m", "hived.cli", "--connect", daemon.address, "status"],
                             env=child_env(), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[-1] == f"seed {seed} is refusing: {WRONG_KEY}"
        monkeypatch.setattr(hived.doctor, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
        fails = [f for f in diagnose(None, connect=daemon.address, stop_timeout=lambda: None)
                 if f.level == "FAIL"]
        assert [f.what for f in fails] == [f"the daemon's seed {seed} is refusing: {WRONG_KEY}"]
        wait_for(lambda: any(f"seed {seed} refusing: {WRONG_KEY}" in line for line in notify.pump()),
                 15, what="the refusal on the STATUS= line")
    finally:
        notify.close()


def test_a_seed_nobody_answers_at_is_unreachable(make_daemon) -> None:
    with socket.socket() as held:  # bound, not listening: connections are refused
        held.bind(("127.0.0.1", 0))
        seed = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        daemon = make_daemon("--seed", seed)
        row = wait_for(lambda: seed_row(daemon, seed), 20, what="the seed unreachable in status")
    assert row == {"address": seed, "state": "unreachable", "why": NO_CONNECTION}


def test_a_seed_of_another_protocol_major_is_refusing_and_hears_why(make_daemon) -> None:
    ctx = zmq.Context()
    try:
        inbox = ctx.socket(zmq.ROUTER)  # the seed's address answers, as a newer node's would
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        seed = f"tcp://127.0.0.1:{port}"
        daemon = make_daemon("--seed", seed)
        mesh = next(r["address"] for r in daemon.status()["nodes"] if r["name"] == "testnode")
        outbox = ctx.socket(zmq.DEALER)
        outbox.identity = seed.encode()  # what the seed's own DEALER presents
        outbox.connect(mesh)
        newer = PROTOCOL_MAJOR + 1

        def refused() -> dict | None:
            outbox.send_multipart([b"HV%d.0 M.BEAT\n" % newer + msgpack.packb({})])
            return seed_row(daemon, seed)

        row = wait_for(refused, 20, what="the seed's protocol in status")
        assert row == {
            "address": seed, "state": "refusing",
            "why": f"peer speaks protocol {newer}.0, this node {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; "
                   "nodes of another major version do not interoperate: upgrade this node",
        }
        # and the seed's side is told, on the connection its message came by
        assert outbox.poll(5000), "no answer to a message of another major"
        assert outbox.recv_multipart() == [b"HV%d.%d M.REFUSED\n\x80" % (PROTOCOL_MAJOR, PROTOCOL_MINOR)]
    finally:
        ctx.destroy(linger=0)


def test_a_seed_that_refuses_our_major_is_refusing_naming_both_versions(make_daemon) -> None:
    """The seed never sends us a message of its own: its REFUSED, the answer
    to our HELLO, is all this node hears, and enough."""
    ctx = zmq.Context()
    try:
        inbox = ctx.socket(zmq.ROUTER)
        port = inbox.bind_to_random_port("tcp://127.0.0.1")
        seed = f"tcp://127.0.0.1:{port}"
        daemon = make_daemon("--seed", seed)
        assert inbox.poll(20_000), "no HELLO from the daemon"
        sender, envelope = inbox.recv_multipart()
        assert envelope.startswith(b"HV%d.%d M.HELLO\n" % (PROTOCOL_MAJOR, PROTOCOL_MINOR))
        older = PROTOCOL_MAJOR - 1
        inbox.send_multipart([sender, b"HV%d.3 M.REFUSED\n\x80" % older])
        row = wait_for(lambda: seed_row(daemon, seed), 20, what="the seed's refusal in status")
        assert row == {
            "address": seed, "state": "refusing",
            "why": f"peer speaks protocol {older}.3, this node {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; "
                   "nodes of another major version do not interoperate: upgrade that node",
        }
        assert f"seed {seed} is refusing: peer speaks protocol {older}.3" in daemon.log
    finally:
        ctx.destroy(linger=0)


def test_a_peer_that_is_no_seed_is_kept_while_it_refuses() -> None:
    watch = SeedWatch([SEED], "tcp://10.0.0.2:7000")
    other = "tcp://10.0.0.9:7000"
    watch.refused(other, "peer speaks protocol 2.0, this node 1.0; ...", now=100.0)
    assert watch.rows(alive=()) == [{"address": SEED, "state": "joining", "why": "not heard from yet"}]
    assert watch.other_rows(alive=(), now=100.0 + REFUSAL_KEPT) == [
        {"address": other, "state": "refusing", "why": "peer speaks protocol 2.0, this node 1.0; ..."}
    ]
    assert watch.other_rows(alive=(), now=100.1 + REFUSAL_KEPT) == []  # switched off, say
    watch.refused(other, "again", now=200.0)
    assert watch.other_rows(alive=[other], now=200.0) == []  # upgraded: a member now
