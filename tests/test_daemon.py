"""The daemon as systemd and users meet it: a real `hived` subprocess, real workers.

Covers issue 2 items 3 and 6: maps through a daemon, a client that dies
mid-job, malformed control frames, SIGTERM/SIGINT draining, sd_notify, and
the ways the daemon refuses to start.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import psutil
import pytest
import zmq
from conftest import free_port

import hived
from hived.config import load_config
from hived.daemon import STATUS_EVERY, Daemon
from hived.net.security import write_key
from hived.node.pool import STOP_MARGIN
from hived.node.resources import detect_gpus, usable_cpus
from hived.protocol import serialization
from hived.protocol.control import (
    Answer,
    Call,
    DrainRequest,
    Hello,
    JobRefused,
    JobsQuery,
    OpenJob,
    Ping,
    StatusQuery,
    Stranger,
    Unwelcome,
    Welcome,
    ask,
)
from hived.protocol.wire import MAX_HEADER_BYTES, decode, encode
from hived.service.sdnotify import EXTEND_EVERY, Notifier
from hived.testing.childenv import REPO, child_env
from hived.testing.waiting import wait_for

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


def square(x: int) -> int:
    return x * x


def rendezvous(directory: str, n: int) -> int | None:
    """Check in, then wait until `n` tasks have: proves `n` run at the same time."""
    open(os.path.join(directory, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(os.listdir(directory)) >= n:
            return os.getpid()
        time.sleep(0.02)
    return None


def node_row(daemon) -> dict:
    return daemon.status()["nodes"][0]


def jobs(daemon) -> list[dict]:
    answer = ask(daemon.address, JobsQuery(7), timeout=3)
    assert answer is not None, f"hived did not answer; log:\n{daemon.log}"
    return answer.body["jobs"]


def all_slots_at_once(address: str, tmp_path, n: int = 2) -> None:
    """A fresh client gets `n` tasks running together."""
    directory = tmp_path / f"rendezvous-{time.monotonic_ns()}"
    directory.mkdir()
    with hived.connect(address) as h:
        pids = list(h.map(rendezvous, [str(directory)] * n, [n] * n, chunksize=1, timeout=60))
    assert None not in pids, "the tasks never ran at the same time: not every slot was free"
    assert len(set(pids)) == n


def client_script(tmp_path, body: str) -> str:
    """A client program (its functions pickle by value, as __main__'s do)."""
    path = tmp_path / f"client-{time.monotonic_ns()}.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def start_client(script: str, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, script],
        env=child_env(HIVED_ADDRESS=address),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


# -- serving ---------------------------------------------------------------------


def test_map_through_a_daemon(daemon) -> None:
    with hived.connect(daemon.address) as h:
        assert h.node_name == "testnode"
        assert list(h.map(square, range(200))) == [x * x for x in range(200)]
        assert h.submit(square, 12).result(timeout=30) == 144
    assert node_row(daemon)["tasks_done"] >= 201


def test_hived_address_env_reaches_the_daemon(daemon, tmp_path) -> None:
    script = client_script(
        tmp_path,
        """
        from hived import hive

        def cube(x):
            return x ** 3

        print("sum", sum(hive.map(cube, range(100))))
        print("node", hive.node_name)
        """,
    )
    out = subprocess.run(
        [sys.executable, script],
        env=child_env(HIVED_ADDRESS=daemon.address),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"sum {sum(x**3 for x in range(100))}" in out.stdout
    assert "node testnode" in out.stdout  # the daemon's node, not an embedded one
    assert node_row(daemon)["tasks_done"] >= 100


def test_client_killed_mid_job_frees_its_slots(daemon, tmp_path) -> None:
    script = client_script(
        tmp_path,
        """
        import time
        from hived import hive

        def slow(x):
            time.sleep(120)
            return x

        for r in hive.map(slow, range(20), chunksize=1):
            print(r, flush=True)
        """,
    )
    client = start_client(script, daemon.address)
    try:
        wait_for(lambda: node_row(daemon)["slots_busy"] == 2, 30, what="both slots busy")
        assert len(jobs(daemon)) == 1
    finally:
        client.kill()
        client.communicate()
    # The client's heartbeats stop; the daemon drops its job within seconds.
    wait_for(lambda: not jobs(daemon), 15, what=f"the dead client's job to go; log:\n{daemon.log}")
    wait_for(lambda: node_row(daemon)["slots_busy"] == 0, 10, what="slots freed")
    assert "dropping its 1 job" in daemon.log
    wait_for(lambda: len(daemon.worker_pids()) == 2, 20, what="workers replaced")
    all_slots_at_once(daemon.address, tmp_path)


# -- malformed frames ------------------------------------------------------------

BAD_FRAMES = [
    # (frames, what the log must say)
    ([random.Random(7).randbytes(64)], "not a hived message"),
    ([b""], "not a hived message"),
    ([b"HV1.0 C.JOB"], "truncated envelope"),
    ([b"HV9.9 C.PING\n" + msgpack.packb({})], "peer speaks protocol 9.9, this node 1.0"),
    ([b"HV1.0 C.NOSUCH\n" + msgpack.packb({})], "unknown message type"),
    ([b"HV1.0 C.STATUS\n" + msgpack.packb({"request": "seven"})], "field 'request' should be int"),
    ([b"HV1.0 C.STATUS\n" + msgpack.packb({})], "lacks field 'request'"),
    ([b"HV1.0 C.STATUS\n\xc1\xff\x00"], "header is not msgpack"),
    ([b"HV1.0 C.STATUS\n" + msgpack.packb([1, 2])], "header is not a map"),
    ([b"HV1.0 C.PING\n" + b"\x00" * (MAX_HEADER_BYTES + 1)], "is too large"),
]


def test_malformed_frames_are_logged_and_ignored(daemon) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def good_client() -> None:
        try:
            with hived.connect(daemon.address) as h:
                results.extend(h.map(square, range(300), chunksize=3, timeout=60))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=good_client)
    worker.start()
    ctx = zmq.Context()
    try:
        hostile = ctx.socket(zmq.DEALER)
        hostile.linger = 5000  # closing must not drop what is still queued
        hostile.connect(daemon.address)
        for _ in range(3):
            for frames, _ in BAD_FRAMES:
                hostile.send_multipart(frames)
        # A valid job from a client that never said HELLO, and a wrongly typed one after HELLO.
        hostile.send_multipart([b"HV1.0 C.CLOSE\n" + msgpack.packb({"job": 1})])
        hostile.close()
        worker.join(90)
    finally:
        ctx.term()
    assert not worker.is_alive()
    assert not errors, errors
    assert results == [x * x for x in range(300)]  # nothing lost for the good client

    def all_logged() -> bool:
        log = daemon.log
        return all(say in log for _, say in BAD_FRAMES) and "from an unknown client" in log

    wait_for(all_logged, 10, what=f"every problem to be logged; log:\n{daemon.log}")
    assert "Traceback" not in daemon.log
    with hived.connect(daemon.address) as h:  # still serving
        assert list(h.map(square, range(20))) == [x * x for x in range(20)]


# -- signals ---------------------------------------------------------------------

DRAIN_CLIENT = """
import sys, time
import hived
from hived import HiveError

def slow(x):
    time.sleep(1.5)
    return x

try:  # no daemon comes back: the map ends at once
    for r in hived.connect(reconnect_timeout=0).map(slow, range(8), chunksize=1):
        print("result", r, flush=True)
    print("complete", flush=True)
except HiveError as exc:
    print("error", type(exc).__name__, exc, flush=True)
"""


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_running_tasks_then_exits(make_daemon, tmp_path, sig) -> None:
    daemon = make_daemon()
    client = start_client(client_script(tmp_path, DRAIN_CLIENT), daemon.address)
    try:
        wait_for(lambda: node_row(daemon)["slots_busy"] == 2, 30, what="both slots busy")
        pids = daemon.worker_pids()
        assert len(pids) == 2
        assert daemon.stop(sig, timeout=40) == 0, daemon.log
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, out
    lines = out.splitlines()
    # The two tasks running at the signal finished and their results arrived;
    # the six that had not started never will, and the client is told so.
    assert lines[:2] == ["result 0", "result 1"], out
    assert len(lines) == 3, out
    assert lines[2].startswith("error HiveUnavailable"), out
    assert "testnode" in lines[2] and "stopped" in lines[2], out
    assert f"{signal.Signals(sig).name}: draining" in daemon.log
    wait_for(lambda: gone(pids), 10, what=f"workers {pids} to exit")


def test_second_signal_stops_at_once(make_daemon, tmp_path) -> None:
    daemon = make_daemon()
    script = client_script(
        tmp_path,
        """
        import time
        import hived
        from hived import HiveError

        def forever(x):
            time.sleep(300)

        try:
            list(hived.connect(reconnect_timeout=0).map(forever, range(4), chunksize=1))
        except HiveError as exc:
            print("error", type(exc).__name__, exc, flush=True)
        """,
    )
    client = start_client(script, daemon.address)
    try:
        wait_for(lambda: node_row(daemon)["slots_busy"] == 2, 30, what="both slots busy")
        pids = daemon.worker_pids()
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM: draining" in daemon.log, 10, what="the drain to begin")
        began = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0, daemon.log
        # The drain would wait 30 s for tasks that sleep 300 s; the second signal
        # kills the busy workers at once (they cannot hear a polite exit).
        assert time.monotonic() - began < 4.5
        assert "stopping now" in daemon.log
        wait_for(lambda: gone(pids), 10, what=f"workers {pids} to exit")
        out, _ = client.communicate(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert "error HiveUnavailable" in out, out


# -- sd_notify -------------------------------------------------------------------


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: collects datagrams."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.lines: list[str] = []
        # Each datagram as it came: (time.monotonic() when read, its lines).
        self.datagrams: list[tuple[float, list[str]]] = []

    def pump(self) -> list[str]:
        """Everything that has arrived so far (also kept in `lines`)."""
        new: list[str] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            lines = data.decode().split("\n")
            self.datagrams.append((time.monotonic(), lines))
            new += lines
        self.lines += new
        return new

    def with_line(self, line: str) -> list[tuple[float, list[str]]]:
        """The datagrams so far that hold `line`, in order (each as `datagrams` keeps it)."""
        self.pump()
        return [(at, lines) for at, lines in self.datagrams if line in lines]

    def count(self, line: str) -> int:
        """How often `line` has arrived (since `lines` was last cleared)."""
        self.pump()
        return self.lines.count(line)

    def wait_line(self, line: str, timeout: float, times: int = 1) -> None:
        wait_for(lambda: self.count(line) >= times, timeout, what=f"{line} via sd_notify")

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_status_watchdog_stopping(make_daemon, tmp_path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        env = child_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000")
        daemon = make_daemon(start=False, env=env)
        daemon.start(wait=False)
        notify.wait_line("READY=1", 30)
        assert daemon.status()["nodes"][0]["name"] == "testnode"  # READY means it answers
        status = [line for line in notify.lines if line.startswith("STATUS=")]
        assert status and "slots" in status[0], notify.lines
        assert notify.count("READY=1") == 1

        # WATCHDOG=1 every 0.1 s (half of WATCHDOG_USEC), and it keeps coming.
        notify.lines.clear()
        notify.wait_line("WATCHDOG=1", 10, times=4)

        # Frozen, the daemon falls silent: what systemd's watchdog is for.
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            wait_for(
                lambda: psutil.Process(daemon.proc.pid).status() == psutil.STATUS_STOPPED,
                10,
                what="the daemon to stop",
            )
            notify.pump()  # what was sent before it froze
            notify.lines.clear()
            deadline = time.monotonic() + 1.0  # ten watchdog periods
            while time.monotonic() < deadline:
                notify.pump()
            assert "WATCHDOG=1" not in notify.lines, "a frozen daemon must not ping the watchdog"
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        notify.wait_line("WATCHDOG=1", 10)  # thawed, it pings again

        assert daemon.stop(signal.SIGTERM) == 0, daemon.log
        assert notify.count("STOPPING=1") == 1
        assert "STATUS=draining" in notify.lines
    finally:
        notify.close()


def test_the_status_line_follows_a_peer_joining_and_leaving(make_daemon, tmp_path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        port = free_port()
        first = make_daemon("--bind", f"tcp://127.0.0.1:{port}", start=False,
                            env=child_env(NOTIFY_SOCKET=notify.path))
        first.start()
        notify.wait_line("READY=1", 30)
        assert any("; 0 peers;" in line for line in notify.lines if line.startswith("STATUS=")), notify.lines
        peer = make_daemon("--name", "peer", "--seed", f"tcp://127.0.0.1:{port}")

        def status_says(peers: int) -> bool:
            notify.pump()
            sent = [line for line in notify.lines if line.startswith("STATUS=")]
            return bool(sent) and f"; {peers} peers" in sent[-1]

        def members() -> int:
            return sum(row["state"] == "alive" for row in first.status()["nodes"])

        # The line is looked at every STATUS_EVERY and sent when it changed:
        # well within the 5 s it took when it was only sent now and then.
        wait_for(lambda: members() == 2, 20, what="the peer to join")
        wait_for(lambda: status_says(1), 4 * STATUS_EVERY + 1, what="STATUS= to count the peer")
        notify.lines.clear()
        assert peer.stop(signal.SIGTERM) == 0, peer.log
        wait_for(lambda: members() == 1, 20, what="the peer to leave")  # suspect, then dead
        wait_for(lambda: status_says(0), 4 * STATUS_EVERY + 1, what="STATUS= to drop the peer")
    finally:
        notify.close()


def test_a_long_drain_asks_systemd_for_more_time_within_its_own_bound(make_daemon, tmp_path) -> None:
    drain_timeout = 4.5  # two extensions, EXTEND_EVERY apart, before the drain gives up
    config = tmp_path / "hived.toml"
    config.write_text(f"[timing]\ndrain_timeout = {drain_timeout}\n")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = make_daemon("--config", str(config), env=child_env(NOTIFY_SOCKET=notify.path))
        notify.wait_line("READY=1", 30)
        with hived.connect(daemon.address, reconnect_timeout=0) as h:
            stuck = h.submit(time.sleep, 60)
            wait_for(lambda: node_row(daemon)["slots_busy"] == 1, 20, what="the task running")
            signalled = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)

            def stopped() -> bool:  # read as they come: a datagram's time is when it was sent
                notify.pump()
                return daemon.proc.poll() is not None

            wait_for(stopped, 30, interval=0.01, what="the daemon to stop")
            exited = time.monotonic()
            assert daemon.proc.returncode == 0, daemon.log
            with pytest.raises(hived.HiveUnavailable):
                stuck.result(timeout=30)
        [(stopping_at, _)] = notify.with_line("STOPPING=1")
        extensions = [
            (at, int(line.split("=", 1)[1]) / 1e6)
            for at, lines in notify.datagrams
            for line in lines
            if line.startswith("EXTEND_TIMEOUT_USEC=")
        ]
    finally:
        notify.close()
    assert len(extensions) == 2, (extensions, daemon.log)
    # None within the first EXTEND_EVERY (a short drain needs none), then one every EXTEND_EVERY.
    assert extensions[0][0] - stopping_at >= EXTEND_EVERY - 0.1, (stopping_at, extensions)
    assert EXTEND_EVERY - 0.5 <= extensions[1][0] - extensions[0][0] <= EXTEND_EVERY + 0.5
    for at, seconds in extensions:
        assert at <= exited
        # Ahead of the next one, but never past the stop's own end: the drain and
        # the workers' exit (a read's delay of slack, since `at` is when we read it).
        assert seconds >= EXTEND_EVERY
        assert at + seconds <= signalled + drain_timeout + STOP_MARGIN + 0.5, (at, seconds)


def test_sighup_reloads_what_it_can_and_names_what_needs_a_restart(make_daemon, tmp_path) -> None:
    config = tmp_path / "hived.toml"
    config.write_text("[pool]\nmax_tasks_per_worker = 0\n")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = make_daemon("--config", str(config), env=child_env(NOTIFY_SOCKET=notify.path))
        notify.wait_line("READY=1", 30)
        with hived.connect(daemon.address) as h:
            kept = {h.submit(os.getpid).result(timeout=30) for _ in range(6)}
            assert len(kept) <= 2  # two slots, workers kept

            config.write_text("[pool]\nmax_tasks_per_worker = 1\n[timing]\nheartbeat = 0.25\n")
            notify.pump()
            signalled = time.monotonic_ns() // 1000
            daemon.proc.send_signal(signal.SIGHUP)
            notify.wait_line("READY=1", 10, times=2)
            assert notify.count("RELOADING=1") == 1
            # What Type=notify-reload (systemd >= 253) waits for: RELOADING=1 in one
            # datagram with MONOTONIC_USEC stamped after its SIGHUP (CLOCK_MONOTONIC
            # is one clock for every process), then READY=1 in a later one.
            (reloading_at, reloading), = notify.with_line("RELOADING=1")
            stamp = next(int(x.split("=", 1)[1]) for x in reloading if x.startswith("MONOTONIC_USEC="))
            assert signalled <= stamp <= time.monotonic_ns() // 1000, (signalled, stamp)
            assert notify.with_line("READY=1")[-1][0] >= reloading_at
            assert notify.datagrams.index((reloading_at, reloading)) < len(notify.datagrams) - 1
            assert "applied pool.max_tasks_per_worker = 1" in daemon.log
            assert "timing.heartbeat changed but only take effect on a restart" in daemon.log
            fresh = [h.submit(os.getpid).result(timeout=30) for _ in range(4)]
            # Each worker now runs one task and is replaced (those from before
            # the reload run one more first).
            assert len(set(fresh)) == 4, fresh

            # A config that does not load changes nothing; the daemon serves on.
            config.write_text("[pool]\nmax_tasks_per_worker = -3\n")
            daemon.proc.send_signal(signal.SIGHUP)
            notify.wait_line("READY=1", 10, times=3)
            assert "max_tasks_per_worker" in daemon.log.split("SIGHUP: ")[-1]
            assert "the running configuration stays" in daemon.log
            assert h.submit(pow, 2, 10).result(timeout=30) == 1024
        assert daemon.proc.poll() is None
    finally:
        notify.close()


def reload_as_the_unit_does(daemon, config) -> subprocess.CompletedProcess:
    """systemd/hived.service's ExecReload, run with this checkout's hived and
    `config` in place of /etc/hived/hived.toml, in the unit's environment
    (HIVED_CONTROL names the daemon's control socket) and MAINPID set as
    systemd sets it."""
    unit = (Path(REPO) / "systemd" / "hived.service").read_text()
    (line,) = [line[len("ExecReload="):] for line in unit.splitlines() if line.startswith("ExecReload=")]
    command = line.replace("/usr/local/bin/hived", f"{sys.executable} -m hived.daemon")
    command = command.replace("/etc/hived/hived.toml", str(config))
    env = child_env(MAINPID=str(daemon.proc.pid), HIVED_CONTROL=daemon.address)
    return subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=60)


def test_the_units_reload_waits_for_the_daemon_and_fails_when_the_file_is_refused(
    make_daemon, tmp_path
) -> None:
    config = tmp_path / "hived.toml"
    config.write_text("[pool]\nmax_tasks_per_worker = 0\n")
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = make_daemon("--config", str(config), env=child_env(NOTIFY_SOCKET=notify.path))
        notify.wait_line("READY=1", 30)

        # A file that does not load: the reload fails with its reason, the daemon is not asked.
        config.write_text("[pool]\nmax_tasks_per_worker = -3\n")
        out = reload_as_the_unit_does(daemon, config)
        assert out.returncode == 2, out  # systemctl reload fails, and says why
        assert out.stderr.splitlines() == [
            f"hived: {config}: pool.max_tasks_per_worker: expected an integer >= 0 (0 = never "
            "recycle), got -3"
        ], out.stderr
        assert "reload" not in daemon.log and notify.count("RELOADING=1") == 0  # never asked

        # A good one: the command returns once the daemon has applied it, so the
        # reload job covers the whole reload (under Type=notify, on systemd 252 too).
        config.write_text("[pool]\nmax_tasks_per_worker = 1\n[timing]\nheartbeat = 0.25\n")
        out = reload_as_the_unit_does(daemon, config)
        assert out.returncode == 0, out
        assert out.stdout == (
            "hived: reloaded; applied pool.max_tasks_per_worker = 1; timing.heartbeat only take "
            "effect on a restart (`systemctl restart hived`)\n"
        ), out
        assert "configuration reloaded; applied pool.max_tasks_per_worker = 1" in daemon.log
        assert (notify.count("RELOADING=1"), notify.count("READY=1")) == (1, 2)  # no waiting

        # The daemon reads its own file; one it refuses fails the command with its reason.
        other = tmp_path / "checked.toml"
        other.write_text("")
        config.write_text("[pool]\nmax_tasks_per_worker = -3\n")
        out = reload_as_the_unit_does(daemon, other)
        assert out.returncode == 1, out
        assert out.stderr == (
            f"hived: the running hived did not reload: {config}: pool.max_tasks_per_worker: "
            "expected an integer >= 0 (0 = never recycle), got -3; the running configuration "
            "stays\n"
        ), out
        assert (notify.count("RELOADING=1"), notify.count("READY=1")) == (2, 3)
        with hived.connect(daemon.address) as h:  # serving on
            assert h.submit(pow, 2, 10).result(timeout=30) == 1024
    finally:
        notify.close()
    daemon.stop()

    # Nobody at the control socket: one line, and not a hang.
    out = reload_as_the_unit_does(daemon, other)
    assert out.returncode == 1 and out.stderr.startswith(
        f"hived: no hived listens at {daemon.address}: it is not running"), out


def test_workers_do_not_inherit_notify_socket(make_daemon, tmp_path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    try:
        daemon = make_daemon(env=child_env(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="200000"))
        with hived.connect(daemon.address) as h:
            seen = h.submit(os.environ.get, "NOTIFY_SOCKET").result(timeout=30)
            watchdog = h.submit(os.environ.get, "WATCHDOG_USEC").result(timeout=30)
        assert seen is None and watchdog is None
    finally:
        notify.close()


# -- refusing to start -----------------------------------------------------------


def run_hived(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hived.daemon", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_second_daemon_on_the_same_control_address_refuses(daemon, make_daemon) -> None:
    second = make_daemon("--control", daemon.address, start=False)
    second.start(wait=False)
    assert second.proc.wait(30) != 0
    assert f"another hived already serves {daemon.address}" in second.log
    # The first one is undisturbed.
    with hived.connect(daemon.address) as h:
        assert list(h.map(square, range(10))) == [x * x for x in range(10)]


def test_bad_cpus_flag_exits_2_naming_the_key(tmp_path) -> None:
    out = run_hived("--cpus", "-1", "--control", f"ipc://{tmp_path}/s")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "cpus" in lines[0] and "-1" in lines[0]


def test_unknown_config_key_exits_2_naming_file_and_key(tmp_path) -> None:
    config = tmp_path / "hived.toml"
    config.write_text("[pool]\ncpus = 2\nmax_taks_per_worker = 5\n")
    out = run_hived("--config", str(config), "--control", f"ipc://{tmp_path}/s")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(config) in lines[0] and "max_taks_per_worker" in lines[0]


def test_check_config_prints_toml(tmp_path) -> None:
    config = tmp_path / "hived.toml"
    config.write_text('[node]\nname = "from-file"\n[pool]\nmax_tasks_per_worker = 7\n')
    out = run_hived("--config", str(config), "--cpus", "3", "--check-config")
    assert out.returncode == 0, out.stderr
    parsed = tomllib.loads(out.stdout)
    assert parsed["node"]["name"] == "from-file"
    assert parsed["pool"]["cpus"] == 3
    assert parsed["pool"]["max_tasks_per_worker"] == 7
    assert {"node", "pool", "timing", "security"} <= set(parsed)


def test_check_config_shows_what_auto_comes_to(tmp_path) -> None:
    config = tmp_path / "hived.toml"
    config.write_text('[pool]\ncpus = "auto"\n')
    out = run_hived("--config", str(config), "--gpus", "auto", "--check-config")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f'cpus = "auto"  # auto: {usable_cpus()} on this machine' in lines
    gpus = detect_gpus()
    assert any(line.startswith('gpus = "auto"  # flag --gpus; auto: ' f"{len(gpus)} on this machine")
               for line in lines), out.stdout
    assert tomllib.loads(out.stdout)["pool"]["cpus"] == "auto"  # still the same configuration


@pytest.mark.parametrize("where", ["file", "flag"])
def test_check_config_fails_on_a_key_file_that_is_not_there(tmp_path, where) -> None:
    # Checking the config before making the key must not pass.
    key, config = tmp_path / "cluster.key", tmp_path / "hived.toml"
    config.write_text(f'[security]\nkey_file = "{key}"\n' if where == "file" else "")
    flags = ["--key-file", str(key)] if where == "flag" else []
    out = run_hived("--config", str(config), *flags, "--check-config")
    assert (out.returncode, out.stdout) == (2, ""), out
    origin = str(config) if where == "file" else "flag --key-file"
    assert out.stderr == (
        f"hived: {origin}: security.key_file: {key}: cannot read the cluster key: no such file "
        f"(`hivectl keygen {key}` makes one; every node needs the same file)\n"
    )
    write_key(str(key))
    assert run_hived("--config", str(config), *flags, "--check-config").returncode == 0


def test_public_bind_without_key_refuses_to_start(tmp_path) -> None:
    out = run_hived("--bind", "tcp://0.0.0.0:7700", "--control", f"ipc://{tmp_path}/s")
    assert out.returncode != 0
    assert "hivectl keygen" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not os.path.exists(tmp_path / "s")


# -- a node that goes away under its client ----------------------------------------


def slow_square(x: int) -> int:
    time.sleep(0.1)
    return x * x


RECONNECT_TIMEOUT = 1.0  # short: nothing comes back for the client in these tests


@pytest.mark.parametrize("fault", ["killed", "paused"])
def test_a_map_whose_node_goes_away_for_good_ends_with_hive_unavailable(make_daemon, fault) -> None:
    daemon = make_daemon()
    with hived.connect(daemon.address, reconnect_timeout=RECONNECT_TIMEOUT) as h:
        results = h.map(slow_square, range(200), chunksize=1)
        assert next(results) == 0
        if fault == "paused":
            os.kill(daemon.proc.pid, signal.SIGSTOP)
        else:
            daemon.kill()
        gone = time.monotonic()
        try:
            with pytest.raises(hived.HiveUnavailable) as raised:
                for _ in results:
                    pass
            took = time.monotonic() - gone
        finally:
            if fault == "paused":
                os.kill(daemon.proc.pid, signal.SIGCONT)
        # the node's dead_after (3 s) without a pong, a ping's period, then
        # what is left of reconnect_timeout, counted from the last pong
        assert "answered no ping for 3s" in str(raised.value)
        assert f"reconnect_timeout={RECONNECT_TIMEOUT:g}s" in str(raised.value)
        assert daemon.address in str(raised.value)  # among the addresses tried
        assert took <= 3.0 + 1.0 + 1.0, took
        with pytest.raises(hived.HiveUnavailable, match="connect again"):
            h.submit(square, 3)
        assert h.link.lost  # no more pings to a node that is gone


@pytest.mark.parametrize("restart", ["kill -9", "SIGTERM"])
def test_a_map_goes_on_once_its_local_daemon_is_back(make_daemon, restart) -> None:
    """`systemctl restart hived` (SIGTERM, then start) or a crash and a
    restart, under a map from a client on the control socket: the client
    greets the new daemon and the map completes, every result exactly once,
    in order; a submitted call completes too."""
    daemon = make_daemon()
    n = 60
    with hived.connect(daemon.address, reconnect_timeout=20) as h:
        results = h.map(slow_square, range(n), chunksize=1)
        got = [next(results) for _ in range(5)]
        pending = h.submit(slow_square, 12)
        if restart == "SIGTERM":
            assert daemon.stop(signal.SIGTERM) == 0, daemon.log
        else:
            daemon.kill()
        daemon.start(wait=False)
        got.extend(results)
        assert got == [x * x for x in range(n)]
        assert pending.result(timeout=20) == 144
    assert node_row(daemon)["tasks_done"] > 0  # the new daemon ran the rest


def test_a_restarted_node_tells_a_stale_client_once_and_logs_it_once(make_daemon) -> None:
    daemon = make_daemon()
    raw = RawClient(daemon.address)  # a client that goes on pinging whatever it hears
    try:
        raw.send(Hello("stale pinger", hived.__version__))
        raw.expect(Welcome)
        # no moving: its call fails once the new process says it holds nothing of ours
        with hived.connect(daemon.address, reconnect_timeout=0) as h:
            h.link.timeout = 120  # the restart, however slow on a busy machine, comes first
            pending = h.submit(time.sleep, 60)
            wait_for(lambda: node_row(daemon)["slots_busy"] == 1, 20, what="the task running")
            daemon.kill()  # an unclean death: nothing told to anyone
            daemon.start()
            with pytest.raises(hived.HiveUnavailable) as raised:
                pending.result(timeout=60)
            assert str(raised.value).startswith(
                f"hived on testnode at {daemon.address} holds nothing of this client's"
            )
            assert h.link.lost  # it pings no more
        for _ in range(20):
            raw.send(Ping())
        raw.send(Call(1, b"f" * 16, False, 2, "abs"))
        raw.send(StatusQuery(9))  # answered after all the above: they came on one connection
        heard: list = []
        while not heard or not isinstance(heard[-1], Answer):
            assert raw.sock.poll(10_000), f"no answer; heard {heard}"
            heard.append(decode(raw.sock.recv_multipart())[0])
        assert [type(m) for m in heard] == [Stranger, Answer], heard
        assert heard[0].node == "testnode"
    finally:
        raw.close()
    told = [line for line in daemon.log.splitlines() if "from an unknown client" in line]
    assert len(told) == 2, told  # one line for each client, not one a message
    assert "told once that its calls here are lost" in told[0]


# -- what a local client may do (issue 9) ----------------------------------------


class RawClient:
    """A DEALER on the control socket that sends what it is told."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)

    def send(self, msg, payload=()) -> None:
        self.sock.send_multipart(encode(msg, list(payload)))

    def expect(self, kind, timeout: float = 5.0):
        """The next message of type `kind` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(int((deadline - time.monotonic()) * 1000), 1)):
            msg, _ = decode(self.sock.recv_multipart())
            if isinstance(msg, kind):
                return msg
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"no {kind.__name__} within {timeout}s")

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def test_a_client_that_has_not_said_hello_gets_only_an_error(daemon) -> None:
    raw = RawClient(daemon.address)
    try:
        raw.send(DrainRequest(5, "testnode"))
        assert "said HELLO first" in raw.expect(Answer).body["error"]
        raw.send(StatusQuery(6))
        assert raw.expect(Answer).body == {"error": "hived on testnode answers only clients that said HELLO first"}
        raw.send(Call(1, b"f" * 16, False, 2, "abs"))
        assert raw.expect(Stranger).node == "testnode"
    finally:
        raw.close()
    assert node_row(daemon)["state"] == "alive"  # not drained
    with hived.connect(daemon.address) as h:
        assert h.submit(abs, -3).result(timeout=30) == 3


def test_a_hello_of_another_version_may_ask_but_not_run(daemon) -> None:
    raw = RawClient(daemon.address)
    try:
        raw.send(Hello("old client", "7.1.0"))
        refused = raw.expect(Unwelcome)
        assert f"hived 7.1.0 cannot work with hived {hived.__version__}" in refused.text
        raw.send(StatusQuery(3))  # a newer hivectl may still look during an upgrade
        assert raw.expect(Answer).body["nodes"][0]["name"] == "testnode"
        blob, digest = serialization.dumps_function(abs)
        raw.send(Call(1, digest, True, 2, "abs"), [blob, *serialization.dumps((1, [(-3,)]), "a")])
        assert "cannot work with" in raw.expect(JobRefused).text
        raw.send(Hello("garbage", "x" * 1000))
    finally:
        raw.close()
    assert node_row(daemon)["tasks_done"] == 0
    raw = RawClient(daemon.address)
    try:
        raw.send(Hello("garbage", "x" * 1000))
        assert "is not a hived release" in raw.expect(Unwelcome).text
    finally:
        raw.close()


def evil() -> str:
    return "evil"


def test_a_blob_must_match_its_hash(daemon) -> None:
    """One client cannot register code under the hash of another's function."""
    blob, digest = serialization.dumps_function(abs)
    impostor, _ = serialization.dumps_function(evil)
    raw = RawClient(daemon.address)
    try:
        raw.send(Hello("impostor", hived.__version__))
        raw.expect(Welcome)
        raw.send(OpenJob(1, digest, True, 1, 0, 2, "abs"), [impostor])
        refused = raw.expect(JobRefused)
        assert (refused.kind, refused.text) == ("invalid", "the function blob does not match the hash the job names")
        # The victim, connected meanwhile, gets its own function's result.
        with hived.connect(daemon.address) as h:
            assert h.submit(abs, -3).result(timeout=30) == 3
    finally:
        raw.close()


def test_a_reload_before_ready_changes_nothing_and_tells_systemd_nothing(tmp_path) -> None:
    """A SIGHUP or `hived --reload` while the daemon starts: a READY=1 from the
    reload would tell systemd the daemon is up before its pool is."""
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    config = load_config(None, {"control": f"ipc://{tmp_path}/s", "cpus": "1", "gpus": "0"}, {})
    reads: list[int] = []
    daemon = Daemon(config, Notifier(notify.path), lambda: reads.append(1) or config)
    try:
        assert daemon.reload_now("SIGHUP") == {
            "error": "hived is still starting; ask again once it is ready"}
        assert reads == [] and notify.pump() == []
    finally:
        daemon.node.ctx.term()
        notify.close()


def test_a_mesh_port_in_use_stops_the_daemon_naming_the_key_before_it_answers(make_daemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = make_daemon("--bind", f"tcp://127.0.0.1:{port}", start=False)
        daemon.start(wait=False)
        assert daemon.proc.wait(30) == 2
    lines = [line for line in daemon.log.splitlines() if line.startswith("hived:")]
    assert lines == [f"hived: flag --bind: node.bind: cannot bind tcp://127.0.0.1:{port}: Address already in use"]
    # The mesh binds before the control socket: no client ever reached a node without its mesh.
    assert not os.path.exists(daemon.address[len("ipc://"):])
