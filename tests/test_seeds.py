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
from conftest import child_env
from netns import wait_for
from test_daemon import NotifySocket

import hived.doctor
from hived.doctor import diagnose
from hived.security import write_key
from hived.seeds import NO_CONNECTION, WRONG_KEY, SeedWatch
from hived.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_a_seed_of_another_protocol_major_is_refusing(make_daemon) -> None:
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
            "why": f"protocol version {newer}.0 is not ours ({PROTOCOL_MAJOR}.{PROTOCOL_MINOR}); "
                   "upgrade the older side",
        }
    finally:
        ctx.destroy(linger=0)
