"""The network-namespace test harness itself, proven with real traffic."""

from __future__ import annotations

import ipaddress
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from netns_fixtures import require_netns

from hived.testing import netns, netns_owners
from hived.testing.childenv import REPO
from hived.testing.netns import TestNet, sweep_stale
from hived.testing.waiting import wait_for

pytest_plugins = ["netns_fixtures"]

PORT = 7000
BLOCKED = 0.25  # s: how long a connect/recv must stay unanswered to count as blocked

ECHO_SERVER = r"""
import os, socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
def echo(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
print(os.getpid(), flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""

ECHO_CLIENT = r"""
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
    s.sendall(b"ping")
    print(s.recv(4).decode())
"""


@pytest.fixture
def netns_ok() -> None:
    require_netns()


needs_netns = pytest.mark.usefixtures("netns_ok")


def _readline(proc: subprocess.Popen, timeout: float = 10.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output from pid {proc.pid} within {timeout}s"
    line = proc.stdout.readline()
    assert line, f"pid {proc.pid} exited ({proc.poll()}) before it was ready"
    return line.strip()


def start_echo(host: netns.Host) -> tuple[subprocess.Popen, int]:
    """An echo server (a python process) on host:PORT; returns (proc, its own pid)."""
    proc = host.popen(
        [sys.executable, "-c", ECHO_SERVER, host.addr, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return proc, int(_readline(proc))


def connect(src: netns.Host, dst: netns.Host, timeout: float = BLOCKED) -> socket.socket:
    """A TCP connection from src to dst's echo server (in-process, from src's stack)."""
    with src.enter():
        s = socket.socket()
    s.settimeout(timeout)
    try:
        s.connect((dst.addr, PORT))
    except BaseException:
        s.close()
        raise
    return s


def reaches(src: netns.Host, dst: netns.Host, timeout: float = 5.0) -> bool:
    """src can open a connection to dst's echo server and get an echo."""
    try:
        s = connect(src, dst, timeout)
    except OSError:
        return False
    with s:
        return echoes(s, b"hi", timeout)


def blocked(src: netns.Host, dst: netns.Host) -> bool:
    """A connect from src to dst goes unanswered (silently dropped: no RST, no ICMP)."""
    try:
        connect(src, dst, BLOCKED).close()
    except TimeoutError:
        return True
    return False


def echoes(s: socket.socket, data: bytes, timeout: float = 5.0) -> bool:
    """Send on an established connection; True if the echo comes back in time."""
    s.settimeout(timeout)
    try:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(len(data) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == data
    except OSError:  # TimeoutError included
        return False


def all_pairs(net: TestNet) -> set[tuple[str, str]]:
    return {(a.name, b.name) for a in net for b in net if a is not b}


def leftovers(token: str) -> tuple[list[str], list[str]]:
    nss = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return (
        [line for line in nss.stdout.splitlines() if token in line],
        [line for line in links.stdout.splitlines() if token in line],
    )


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --------------------------------------------------------------------------- layout


def test_hosts_are_addressed_from_the_benchmark_range(net3: TestNet) -> None:
    assert [h.name for h in net3] == ["h0", "h1", "h2"]
    addrs = [h.addr for h in net3]
    assert len(set(addrs)) == 3
    for a in addrs:
        assert ipaddress.ip_address(a) in ipaddress.ip_network("198.18.0.0/15")
    ours = [n for n in os.listdir("/sys/class/net") if n.startswith(net3.token)]
    assert sorted(ours) == sorted([net3.bridge] + [h.veth for h in net3])
    assert all(len(n) <= 15 for n in ours)
    out = net3[1].run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert f"{net3[1].addr}/16" in out
    neigh = net3[1].run(["ip", "neigh", "show", "dev", "eth0"]).stdout
    assert f"{net3[0].addr} lladdr {net3[0].mac} PERMANENT" in neigh
    assert net3.connectivity() == all_pairs(net3)


@needs_netns
def test_dynamic_arp_works_too() -> None:
    with TestNet(3, static_neighbors=False) as net:
        assert net.connectivity() == all_pairs(net)
        assert "PERMANENT" not in net[0].run(["ip", "neigh", "show"]).stdout
        net.partition([0])
        assert net.connectivity(BLOCKED) == {("h1", "h2"), ("h2", "h1")}
        net.heal_all()
        assert net.connectivity() == all_pairs(net)


# --------------------------------------------------------------------------- traffic and faults


def test_echo_and_partition(net3: TestNet) -> None:
    a, b, c = net3
    start_echo(a)
    start_echo(c)
    # A subprocess client inside B reaches the server inside A.
    out = b.run([sys.executable, "-c", ECHO_CLIENT, a.addr, str(PORT), "5"]).stdout
    assert out.strip() == "ping"
    established = connect(b, a, timeout=5)
    assert echoes(established, b"before")

    net3.partition([a], [b, c])
    assert blocked(b, a), "B reached A across the partition"
    assert not echoes(established, b"during", BLOCKED), "an established B->A connection survived"
    assert reaches(b, c)
    assert net3.connectivity(BLOCKED) == {("h1", "h2"), ("h2", "h1")}
    res = b.run([sys.executable, "-c", ECHO_CLIENT, a.addr, str(PORT), str(BLOCKED)], check=False)
    assert res.returncode != 0 and "timed out" in res.stderr

    net3.heal_all()
    wait_for(lambda: reaches(b, a, 1.0), 5, what="B to reach A again after heal_all")
    assert net3.connectivity() == all_pairs(net3)
    established.close()


def test_cut_stops_new_and_established_traffic(net3: TestNet) -> None:
    a, b, c = net3
    start_echo(a)
    start_echo(c)
    established = connect(b, a, timeout=5)
    assert echoes(established, b"x" * 1000)

    net3.cut(a)
    assert not echoes(established, b"y" * 1000, BLOCKED), "an established connection to a cut host"
    assert blocked(b, a)
    assert blocked(a, c), "a cut host reached out"
    assert reaches(b, c)

    net3.heal(a)
    wait_for(lambda: reaches(b, a, 1.0), 5, what="B to reach A after heal")
    # The stalled connection resumes at TCP's next retransmission (backed off
    # exponentially: up to about as long again as the outage lasted), and the
    # bytes queued during the cut arrive first.
    established.settimeout(10)
    got = b""
    while len(got) < 1000:
        got += established.recv(1000 - len(got))
    assert got == b"y" * 1000
    assert echoes(established, b"z")
    established.close()


def test_kill9_hits_the_real_process(net3: TestNet) -> None:
    a, b, _ = net3
    proc, reported = start_echo(a)
    assert reported == proc.pid, "popen returned a wrapper, not the server"
    with open(f"/proc/{proc.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # our direct child
    assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(sys.executable)
    with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
        assert f.read().split(b"\0")[1:3] == [b"-c", ECHO_SERVER.encode()]
    st = os.stat(f"/proc/{proc.pid}/ns/net")
    assert (st.st_dev, st.st_ino) == a.ns_id != net3[1].ns_id
    assert os.getpgid(proc.pid) == proc.pid  # its own process group
    assert reaches(b, a)

    assert a.kill9(proc) == -signal.SIGKILL
    assert pid_gone(proc.pid)
    with pytest.raises(ConnectionRefusedError):  # the host is up, nothing listens
        connect(b, a)


def test_five_hosts_partitions(net5: TestNet) -> None:
    full = all_pairs(net5)
    names = [h.name for h in net5]

    def within(*groups: list[int]) -> set[tuple[str, str]]:
        return {(names[i], names[j]) for g in groups for i in g for j in g if i != j}

    net5.partition([0, 1], [2, 3, 4])
    assert net5.connectivity(BLOCKED) == within([0, 1], [2, 3, 4])
    # A new partition replaces the old one; hosts named in no group stay together.
    net5.partition([net5[0]], ["h1"], [2])
    assert net5.connectivity(BLOCKED) == within([3, 4])
    net5.cut(3)
    assert net5.connectivity(BLOCKED) == set()
    net5.heal_all()
    assert net5.connectivity() == full

    late = net5.add_host("late")
    assert late.name == "late" and late.addr not in [h.addr for h in net5.hosts[:5]]
    assert net5.connectivity() == all_pairs(net5)
    with pytest.raises(ValueError, match="more than one group"):
        net5.partition([0, 1], [1, 2])


@needs_netns
def test_thirty_hosts_mesh() -> None:
    with TestNet(30) as net:
        assert net.connectivity(2.0) == all_pairs(net)
        net.partition(range(15))
        assert len(net.connectivity(BLOCKED)) == 2 * 15 * 14
    assert leftovers(net.token) == ([], [])


# --------------------------------------------------------------------------- teardown


@needs_netns
def test_teardown_removes_everything_even_when_the_body_raises() -> None:
    escaped_script = (
        "import subprocess, sys;"
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True);"
        "print(p.pid, flush=True); sys.stdin.read()"
    )
    with pytest.raises(RuntimeError, match="boom"):
        with TestNet(3) as net:
            token = net.token
            a, b, _ = net
            server, _ = start_echo(a)
            established = connect(b, a, timeout=5)  # a socket that pins B's namespace
            # A grandchild in its own session: killed for being inside our namespace.
            helper = b.popen(
                [sys.executable, "-c", escaped_script],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            escaped = int(_readline(helper))
            assert os.getpgid(escaped) != os.getpgid(helper.pid)
            net.partition([a])
            net.cut(b)
            raise RuntimeError("boom")
    assert leftovers(token) == ([], [])
    assert server.returncode == -signal.SIGKILL
    assert helper.returncode == -signal.SIGKILL
    wait_for(lambda: pid_gone(escaped), 5, what="the escaped grandchild to die")
    assert not os.path.exists(os.path.join(netns_owners.MARKER_DIR, token))
    with pytest.raises(RuntimeError, match="closed"):
        a.popen(["true"])
    established.close()


def test_fixture_teardown_is_clean(testnet: Callable[..., TestNet]) -> None:
    net = testnet(2)
    proc, _ = start_echo(net[0])
    token = net.token
    net.close()
    net.close()  # idempotent
    assert proc.returncode == -signal.SIGKILL
    assert leftovers(token) == ([], [])


def _spawn_owner() -> tuple[subprocess.Popen, str, int]:
    """A separate python process that builds a TestNet and a process in it, then waits."""
    script = (
        "import subprocess, sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "from hived.testing.netns import TestNet\n"
        "net = TestNet(2)\n"
        "p = net[0].popen(['sleep', '60'])\n"
        "print(net.token, p.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    token, pid = _readline(owner).split()
    return owner, token, int(pid)


@needs_netns
def test_sweep_removes_only_runs_whose_owner_died() -> None:
    with TestNet(1) as mine:
        owner, token, sleeper = _spawn_owner()
        try:
            assert leftovers(token) != ([], [])
            assert token not in sweep_stale(), "swept a live owner's net"
            assert leftovers(token) != ([], [])
            owner.kill()  # SIGKILL: no teardown runs in the owner
            owner.wait(5)
            assert not pid_gone(sleeper), "the orphaned process should outlive its owner"
            assert token in sweep_stale()
            assert leftovers(token) == ([], [])
            wait_for(lambda: pid_gone(sleeper), 5, what="the orphan of a dead run to die")
            assert not os.path.exists(os.path.join(netns_owners.MARKER_DIR, token))
            assert mine.connectivity() == set()  # untouched: one host, no pairs
            assert leftovers(mine.token) != ([], [])
        finally:
            owner.kill()
            owner.wait(5)
            sweep_stale()


@needs_netns
def test_sweep_checks_the_owner_start_time_against_pid_reuse() -> None:
    # A live process that never made a TestNet, and names made as if it had.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        token = netns_owners.PREFIX + netns_owners.b36(bystander.pid, 5) + "zz"
        subprocess.run(["ip", "netns", "add", f"{token}-x"], check=True)
        marker = os.path.join(netns_owners.MARKER_DIR, token)
        with open(marker, "w") as f:
            f.write(f"{bystander.pid} {netns_owners.starttime(bystander.pid)}\n")
        assert token not in sweep_stale()
        assert leftovers(token)[0]
        with open(marker, "w") as f:  # a marker from an earlier process with that pid
            f.write(f"{bystander.pid} 1\n")
        assert token in sweep_stale()
        assert leftovers(token) == ([], [])
    finally:
        bystander.kill()
        bystander.wait()
        sweep_stale()


# --------------------------------------------------------------------------- helpers


def test_wait_for() -> None:
    calls = []
    assert wait_for(lambda: calls.append(1) or len(calls) >= 3, 5, interval=0.001) is True
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 0.1s waiting for the moon"):
        wait_for(lambda: False, 0.1, what="the moon")
    assert 0.1 <= time.monotonic() - t0 < 1
    with pytest.raises(AssertionError, match="last error: KeyError") as info:
        wait_for(lambda: {}["k"], 0.05, what="a key", ignore=KeyError)
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ZeroDivisionError):
        wait_for(lambda: 1 / 0, 1)


def test_require_netns_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "_capability", (False, "no namespaces here"))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but no namespaces here"):
        require_netns()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no namespaces here"):
        require_netns()
