"""hived.service.sdnotify: datagrams received on a real AF_UNIX socket of our own, as systemd would."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hived.service.sdnotify import EXTEND_AHEAD, Notifier, stop_extension

RECV_TIMEOUT = 5.0  # seconds; a datagram on a local socket arrives at once, or never
ROOT = Path(__file__).resolve().parents[1]


class Receiver:
    """The systemd side: a datagram socket that reads messages and their sender's pid."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        # Like systemd: ask the kernel to attach the sender's credentials.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(RECV_TIMEOUT)

    def receive(self) -> tuple[list[str], int]:
        """(the lines, the sender's pid)."""
        ucred = struct.calcsize("iII")
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(ucred))
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iII", payload[:ucred])
        return data.decode().split("\n"), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Receiver]:
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@hived-test-{uuid.uuid4().hex}"
    r = Receiver(address)
    yield r
    r.close()


def test_notify_sends_one_datagram_of_lines(receiver: Receiver) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": receiver.address}) as notifier:
        assert notifier.enabled
        assert notifier.notify("READY=1", "STATUS=coordinator, 2 peers, 3/8 slots busy")
        lines, pid = receiver.receive()
        assert lines == ["READY=1", "STATUS=coordinator, 2 peers, 3/8 slots busy"]
        # systemd attributes the message by the kernel-attached pid (NotifyAccess=main).
        assert pid == os.getpid()
        assert notifier.notify("WATCHDOG=1")
        assert receiver.receive()[0] == ["WATCHDOG=1"]
        assert notifier.notify("STOPPING=1")
        assert receiver.receive()[0] == ["STOPPING=1"]


def test_notify_from_another_process_carries_that_process_pid(receiver: Receiver) -> None:
    code = "from hived.service.sdnotify import Notifier; import sys; sys.exit(0 if Notifier.from_env().notify('READY=1') else 1)"
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "NOTIFY_SOCKET": receiver.address, "PYTHONPATH": str(ROOT)},
    )
    try:
        lines, pid = receiver.receive()
    finally:
        assert child.wait(timeout=30) == 0
    assert lines == ["READY=1"] and pid == child.pid


def test_without_notify_socket_it_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog_interval() is None


def test_unusable_addresses_are_ignored() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_a_vanished_socket_returns_false_and_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.notify("WATCHDOG=1") is False
    assert notifier.notify("WATCHDOG=1") is False  # and again, quietly
    notifier.close()


def test_lines_must_be_single_assignments(receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
    with pytest.raises(ValueError, match="without newlines"):
        notifier.notify("STATUS=ok\nREADY=1")
    with pytest.raises(ValueError):
        notifier.notify("READY")
    assert notifier.notify() is False
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "10000000"}, 5.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_period(
    environ: dict[str, str], interval: float | None
) -> None:
    assert Notifier.from_env(environ).watchdog_interval() == interval


def test_unset_environment_hides_systemd_from_children(receiver: Receiver) -> None:
    environ = {
        "NOTIFY_SOCKET": receiver.address,
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "kept",
    }
    notifier = Notifier.from_env(environ, unset_environment=True)
    assert environ == {"OTHER": "kept"}
    # The notifier itself still works from what it read.
    assert notifier.watchdog_interval() == 1.0
    assert notifier.notify("READY=1")
    assert receiver.receive()[0] == ["READY=1"]
    notifier.close()


def test_notify_never_blocks_on_a_full_receiver(tmp_path: Path) -> None:
    # Nobody reads: the receiver's queue fills, and sends fail fast instead of
    # stalling the daemon's event loop (which would also starve the watchdog).
    receiver = Receiver(str(tmp_path / "full.sock"))
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.address})
    try:
        results = [notifier.notify("STATUS=" + "x" * 1000) for _ in range(5000)]
        assert results[0] is True
        assert results[-1] is False
    finally:
        notifier.close()
        receiver.close()


def test_stop_extension_asks_ahead_but_never_past_the_stops_own_end() -> None:
    # A stop at 100 s that may run until 140 s (drain_timeout 30 s plus 10 s to stop the workers).
    until = 140.0
    assert stop_extension(100.0, until) == int(EXTEND_AHEAD * 1_000_000)
    assert stop_extension(130.0, until) == int(EXTEND_AHEAD * 1_000_000)
    assert stop_extension(135.5, until) == 4_500_000  # what is left, no more
    assert stop_extension(140.0 - 1e-7, until) == 1  # a last moment still asks for something
    assert stop_extension(140.0, until) is None  # past its end the daemon asks for nothing:
    assert stop_extension(151.0, until) is None  # systemd's own deadline stands
    for now in (100.0, 120.0, 131.0, 139.0):  # every answer ends by `until`
        assert now + stop_extension(now, until) / 1_000_000 <= until + 1e-6

