"""Real test hosts in Linux network namespaces, for tests that cross machines.

A :class:`TestNet` is one Ethernet segment (a bridge in the root namespace) and
N hosts.  Each :class:`Host` is a network namespace with ``lo`` up and one veth
pair: ``eth0`` inside the namespace, the other end a port of the bridge.  Hosts
get addresses from the benchmarking range 198.18.0.0/15 (``198.18.<net>.<i+1>/16``,
``<net>`` picked per TestNet).  The root namespace gets no address and no route
into the segment, so nothing outside the hosts is ever a target, and two
TestNets (even in concurrent test runs) never share a segment.

Every host knows every other host's MAC address from the start (permanent
neighbour entries; ``static_neighbors=False`` keeps ARP instead): no ARP
storm when many hosts connect at once -- 30 hosts opening 870 connections
at once overflowed the kernel's backlog and lost SYNs to ~1-3 s retransmits
under load -- and a blocked peer stays silent rather than turning into a
local EHOSTUNREACH after ARP gives up (~3 s).

Faults, all silent packet loss as on real networks (nothing answers with an
ICMP error or RST, so a ``connect`` hangs until its timeout and an established
TCP connection stalls, retransmitting, until it is healed):

* ``cut(host)``: the host's bridge port goes down (the host sees its carrier
  drop).  ``heal(host)`` brings it back.
* ``partition(*groups)``: every group gets its own bridge and its hosts' ports
  move onto it, so frames between groups have nowhere to go -- in both
  directions, for new and established connections alike.  Hosts named in no
  group stay together on the original bridge (one more, implicit group).
* ``drop_between(side_a, side_b)``: pairwise drops for what bridges cannot
  express (a *bridge* host that sees both sides while the sides cannot see
  each other): each host's ``eth0`` egress sends packets for the other side's
  addresses into a ``blackhole`` qdisc, on both sides.
* ``impair(host, loss=..., rate=...)``: random loss of a share of the host's
  outgoing packets and/or a bandwidth cap (queueing delay).  This kernel has
  no netem, ``gact`` or flower, so it is built from what it has: HTB classes,
  a classic-BPF filter on the kernel's random number, and ``blackhole``.
  ``heal_all()`` puts every port back on the original bridge and up, and
  removes every drop and impairment.

Names: everything a TestNet creates is named from its token (owner pid and
two random characters), so :func:`sweep_stale` (run once per process, before
the first TestNet) removes only what a crashed run left behind;
:mod:`hived.testing.netns_owners` holds the scheme, the sweep and teardown,
:mod:`hived.testing.netns_plumbing` the setns, ``ip`` and ``tc`` calls.

Processes: ``Host.popen`` starts the command directly inside the namespace
(the spawning thread joins the namespace around ``fork``/``exec``; no ``ip netns
exec`` or ``nsenter`` wrapper), so ``proc.pid`` is the real process and
``kill9`` hits it.  Each process gets its own session/process group.  On
teardown every tracked process group and every process still inside one of the
TestNet's namespaces is SIGKILLed -- nothing else is ever signalled.

Needs root and iproute2 (``ip``, ``tc``); :func:`netns_available` says whether
this process can build a TestNet (tests/netns_fixtures.py skips on it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from hived.testing import netns_owners as owners
from hived.testing import netns_plumbing as plumbing
from hived.testing.netns_owners import sweep_stale
from hived.testing.waiting import wait_for

__all__ = [
    "Host",
    "TestNet",
    "netns_available",
    "sweep_stale",
]

MAX_HOSTS = 254

_HOST_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
# eth0's root HTB: 1:1 carries traffic (its rate is the cap), 1:2 ends in a
# blackhole qdisc; filters send what is to be dropped to 1:2.
_FAST = "10gbit"
_SHAPE = [
    "qdisc add dev eth0 root handle 1: htb default 1 r2q 100000",
    f"class add dev eth0 parent 1: classid 1:1 htb rate {_FAST}",
    f"class add dev eth0 parent 1: classid 1:2 htb rate {_FAST}",
    "qdisc add dev eth0 parent 1:2 handle 2: blackhole",
]


# --------------------------------------------------------------------------- capability

_capability: tuple[bool, str] | None = None


def netns_available() -> tuple[bool, str]:
    """(True, "") if this process can build a TestNet, else (False, why). Cached."""
    global _capability
    if _capability is None:
        if os.geteuid() != 0:
            _capability = (False, "network-namespace tests need root (ip netns, veth, bridge)")
        elif shutil.which("ip") is None:
            _capability = (False, "network-namespace tests need iproute2's `ip`")
        else:
            try:
                with TestNet(1):
                    pass
            except Exception as exc:  # noqa: BLE001 - report any failure as the reason
                _capability = (False, f"cannot create network namespaces: {exc}")
            else:
                _capability = (True, "")
    return _capability


# --------------------------------------------------------------------------- hosts


class Host:
    """One test host: a network namespace with ``lo`` and ``eth0`` (``addr``)."""

    def __init__(self, net: TestNet, index: int, name: str, addr: str) -> None:
        self.net = net
        self.index = index
        self.name = name
        self.addr = addr
        self.ns = f"{net.token}-{name}"
        self.ns_path = os.path.join(plumbing.NETNS_DIR, self.ns)
        self.veth = f"{net.token}v{index}"  # bridge-side end, in the root namespace
        self.mac = f"{net._mac_prefix}:{index >> 8:02x}:{index & 0xFF:02x}"  # of eth0
        self.ns_id: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.addr} ns={self.ns}>"

    def url(self, port: int, scheme: str = "tcp") -> str:
        return f"{scheme}://{self.addr}:{port}"

    @contextlib.contextmanager
    def enter(self) -> Iterator[Host]:
        """Run the block with the *calling thread* inside this host's namespace.

        Sockets created in the block live in the host's network stack and stay
        there afterwards (e.g. a client that connects from this host).  Other
        threads are unaffected.
        """
        self.net._check_open()
        with plumbing.in_netns(self.ns_path):
            yield self

    def popen(
        self, args: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any
    ) -> subprocess.Popen:
        """Start ``args`` inside this host; the returned pid is the real process.

        ``env`` is merged over ``os.environ``.  The process gets its own session
        (``start_new_session=True`` unless ``kw`` says otherwise) and is tracked:
        teardown kills its process group.
        """
        self.net._check_open()
        if env is not None:
            env = {**os.environ, **env}
        if "process_group" not in kw:
            kw.setdefault("start_new_session", True)
        with plumbing.in_netns(self.ns_path):
            proc = subprocess.Popen(list(args), env=env, **kw)
        try:
            own_group = os.getpgid(proc.pid) == proc.pid
        except ProcessLookupError:
            own_group = False
        proc._hvt_own_group = own_group  # type: ignore[attr-defined]
        self.net._track(proc)
        return proc

    def run(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        check: bool = True,
        timeout: float = 60,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run ``args`` inside this host to completion (output captured as text)."""
        self.net._check_open()
        if env is not None:
            env = {**os.environ, **env}
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        with plumbing.in_netns(self.ns_path):
            return subprocess.run(list(args), env=env, check=check, timeout=timeout, **kw)

    def kill9(self, proc: subprocess.Popen, *, group: bool = False) -> int:
        """SIGKILL ``proc`` (the process itself; ``group=True``: its whole
        process group, if it leads its own) and reap it; return its exit status."""
        if proc.returncode is None:  # not reaped: the pid is still this process
            with contextlib.suppress(ProcessLookupError):
                if group and getattr(proc, "_hvt_own_group", False):
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=owners.KILL_WAIT_S)


# --------------------------------------------------------------------------- the net


class TestNet:
    """A bridge and ``n`` hosts in network namespaces; a context manager.

    ``with TestNet(3) as net: a, b, c = net.hosts`` -- everything is removed
    on exit (also when the body raises), by :meth:`close`, or at interpreter
    exit; leftovers of a killed run are removed by the next run's sweep.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, n: int = 3, *, names: Iterable[str] | None = None, static_neighbors: bool = True
    ) -> None:
        names = list(names) if names is not None else []
        if names and len(names) != n:
            raise ValueError(f"{len(names)} names for {n} hosts")
        self.hosts: list[Host] = []
        self._procs: list[subprocess.Popen] = []
        self._cut: set[str] = set()
        self._shaped: set[str] = set()  # hosts whose eth0 has our HTB root
        self._groups: dict[str, str] = {}  # host name -> bridge its port is on
        self._group_bridges: list[str] = []
        self._closed = False
        self._lock = threading.RLock()
        self.token = owners.claim(self)
        self.bridge = f"{self.token}br"
        self.subnet = random.randrange(256)
        self.prefixlen = 16
        self.static_neighbors = static_neighbors
        self._mac_prefix = "02:" + random.randbytes(3).hex(":")
        try:
            owners.write_marker(self.token)
            plumbing.ip(
                [
                    f"link add {self.bridge} type bridge stp_state 0 forward_delay 0"
                    " mcast_snooping 0",
                    f"link set {self.bridge} up",
                ]
            )
            self._add_hosts([names[i] if names else None for i in range(n)])
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error
                self.close()
            raise

    # -- context manager / container

    def __enter__(self) -> TestNet:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:  # noqa: BLE001 - don't mask the body's error
            warnings.warn(f"TestNet {self.token} teardown failed: {close_exc!r}", stacklevel=2)

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def __getitem__(self, ref: int | str) -> Host:
        return self.host(ref)

    def __repr__(self) -> str:
        return f"<TestNet {self.token} {len(self.hosts)} hosts>"

    def host(self, ref: Host | int | str) -> Host:
        if isinstance(ref, Host):
            if ref.net is not self:
                raise ValueError(f"{ref!r} belongs to another TestNet")
            return ref
        if isinstance(ref, int):
            return self.hosts[ref]
        for h in self.hosts:
            if h.name == ref:
                return h
        raise KeyError(ref)

    @property
    def processes(self) -> list[subprocess.Popen]:
        return list(self._procs)

    # -- building

    def add_host(self, name: str | None = None) -> Host:
        """Add one more host to the segment (it sees the current partition as
        an unlisted host would: on the original bridge)."""
        return self._add_hosts([name])[0]

    def _add_hosts(self, names: Sequence[str | None]) -> list[Host]:
        with self._lock:
            self._check_open()
            if len(self.hosts) + len(names) > MAX_HOSTS:
                raise ValueError(f"at most {MAX_HOSTS} hosts per TestNet")
            new: list[Host] = []
            taken = {h.name for h in self.hosts}
            for name in names:
                i = len(self.hosts) + len(new)
                name = name or f"h{i}"
                if not _HOST_NAME_RE.match(name) or name in taken:
                    raise ValueError(f"bad or duplicate host name {name!r}")
                taken.add(name)
                new.append(Host(self, i, name, f"198.18.{self.subnet}.{i + 1}"))
            if not new:
                return []
            self.hosts.extend(new)  # before creating: close() cleans up partial work
            root = []
            for h in new:
                root += [
                    f"netns add {h.ns}",
                    f"link add {h.veth} type veth peer name eth0 address {h.mac} netns {h.ns}",
                    f"link set {h.veth} master {self.bridge} up",
                ]
            plumbing.ip(root)
            for h in new:
                h.ns_id = plumbing.ns_id(h.ns_path)
            per_ns: dict[str, list[str]] = {}
            for h in new:
                per_ns[h.ns] = [
                    "link set lo up",
                    f"addr add {h.addr}/{self.prefixlen} dev eth0",
                    "link set eth0 up",
                ]
            if self.static_neighbors:
                for h in self.hosts:
                    peers = self.hosts if h in new else new
                    per_ns.setdefault(h.ns, []).extend(
                        f"neigh replace {p.addr} lladdr {p.mac} dev eth0 nud permanent"
                        for p in peers
                        if p is not h
                    )
            plumbing.ip_each(per_ns)
            return new

    # -- faults

    def cut(self, host: Host | int | str) -> None:
        """Take the host off the network: its bridge port goes down."""
        with self._lock:
            h = self.host(host)
            self._check_open()
            plumbing.ip([f"link set {h.veth} down"])
            self._cut.add(h.name)

    def heal(self, host: Host | int | str) -> None:
        """Undo :meth:`cut` for one host (its partition group, if any, stays)."""
        with self._lock:
            h = self.host(host)
            self._check_open()
            plumbing.ip([f"link set {h.veth} up"])
            self._cut.discard(h.name)
            self._wait_up([h])

    def partition(self, *groups: Iterable[Host | int | str]) -> None:
        """Split the segment: hosts in different groups can't reach each other
        (either way, established connections included); hosts within a group
        can.  Hosts in no group form one more group together.  Replaces any
        earlier partition; cut hosts stay cut."""
        with self._lock:
            self._check_open()
            resolved = [[self.host(r) for r in g] for g in groups]
            seen: set[str] = set()
            for g in resolved:
                for h in g:
                    if h.name in seen:
                        raise ValueError(f"{h.name} is in more than one group")
                    seen.add(h.name)
            lines = []
            while len(self._group_bridges) < len(resolved):
                br = f"{self.token}g{len(self._group_bridges) + 1}"
                lines += [
                    f"link add {br} type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
                    f"link set {br} up",
                ]
                self._group_bridges.append(br)
            want = {h.name: self.bridge for h in self.hosts}
            for k, g in enumerate(resolved):
                for h in g:
                    want[h.name] = self._group_bridges[k]
            for h in self.hosts:
                if self._groups.get(h.name, self.bridge) != want[h.name]:
                    lines.append(f"link set {h.veth} master {want[h.name]}")
            plumbing.ip(lines)
            self._groups = {n: br for n, br in want.items() if br != self.bridge}

    def heal_all(self) -> None:
        """Undo every partition, cut, drop and impairment."""
        with self._lock:
            self._check_open()
            lines = [f"link set {self.host(n).veth} master {self.bridge}" for n in self._groups]
            lines += [f"link set {self.host(n).veth} up" for n in self._cut]
            plumbing.ip(lines)
            self._wait_up([self.host(n) for n in sorted(set(self._cut) | set(self._groups))])
            for name in sorted(self._shaped):
                plumbing.tc(self.host(name).ns, ["qdisc del dev eth0 root"])
            self._groups.clear()
            self._cut.clear()
            self._shaped.clear()

    @staticmethod
    def _wait_up(hosts: list[Host]) -> None:
        """Until both ends of each host's veth are up. `link set up` returns
        before the kernel's link watcher (rate-limited to once a second) has
        made the link, and its bridge port, carry packets: a probe or SYN sent
        meanwhile is dropped."""
        def up() -> bool:
            return all(
                plumbing.link_states(h.veth, None) == ["UP", "forwarding"]
                and plumbing.link_states("eth0", h.ns)[:1] == ["UP"]
                for h in hosts
            )

        wait_for(up, 5, what=f"the links of {[h.name for h in hosts]} up")

    def _shape(self, h: Host) -> None:
        if h.name not in self._shaped:
            plumbing.tc(h.ns, _SHAPE)
            self._shaped.add(h.name)

    def drop_between(self, side_a: Iterable[Host | int | str],
                     side_b: Iterable[Host | int | str]) -> None:
        """Hosts of ``side_a`` and of ``side_b`` cannot reach each other (either
        way); every other pair still can.  Adds to earlier drops."""
        with self._lock:
            self._check_open()
            a = [self.host(r) for r in side_a]
            b = [self.host(r) for r in side_b]
            for src, dsts in [(h, b) for h in a] + [(h, a) for h in b]:
                self._shape(src)
                plumbing.tc(src.ns, [f"filter add dev eth0 parent 1: protocol ip prio 1 u32"
                                     f" match ip dst {d.addr}/32 classid 1:2" for d in dsts])

    def impair(self, host: Host | int | str, *, loss: float = 0.0,
               rate: str | None = None) -> None:
        """Drop about ``loss`` (0..1) of the host's outgoing packets at random,
        and/or cap its outgoing bandwidth at ``rate`` (tc units: ``"200kbit"``)."""
        with self._lock:
            self._check_open()
            h = self.host(host)
            self._shape(h)
            lines = []
            if loss > 0:
                lines.append("filter add dev eth0 parent 1: protocol all prio 2 bpf"
                             f" bytecode '{plumbing.random_share(loss)}' classid 1:2")
            if rate is not None:
                lines.append(f"class change dev eth0 parent 1: classid 1:1 htb rate {rate}")
            if lines:
                plumbing.tc(h.ns, lines)

    # -- diagnostics

    def connectivity(self, timeout: float = 0.5) -> set[tuple[str, str]]:
        """Which (src, dst) host-name pairs can open a TCP connection right now.

        Probes the ordered pairs at once (in rounds of at most 400, to stay
        well inside the file-descriptor limit) from in-process sockets: a
        listener on each host, a non-blocking connect from each other host.  A
        pair that hasn't connected within ``timeout`` counts as unreachable, so
        a call takes about ``timeout`` per round once anything is blocked.
        """
        self._check_open()
        listeners: dict[str, socket.socket] = {}
        ok: set[tuple[str, str]] = set()
        try:
            for h in self.hosts:
                with h.enter():
                    s = socket.socket()
                listeners[h.name] = s
                s.bind((h.addr, 0))
                s.listen(len(self.hosts) + 8)
            pairs = [(a, b) for a in self.hosts for b in self.hosts if a is not b]
            for i in range(0, len(pairs), 400):
                ok |= self._probe(pairs[i : i + 400], listeners, timeout)
        finally:
            for s in listeners.values():
                s.close()
        return ok

    @staticmethod
    def _probe(
        pairs: list[tuple[Host, Host]], listeners: dict[str, socket.socket], timeout: float
    ) -> set[tuple[str, str]]:
        pending: dict[socket.socket, tuple[str, str]] = {}
        ok: set[tuple[str, str]] = set()
        sel = selectors.DefaultSelector()
        try:
            for src, dst in pairs:
                with src.enter():
                    c = socket.socket()
                c.setblocking(False)
                err = c.connect_ex((dst.addr, listeners[dst.name].getsockname()[1]))
                if err not in (0, errno.EINPROGRESS):
                    c.close()
                    continue
                pending[c] = (src.name, dst.name)
                sel.register(c, selectors.EVENT_WRITE)
            deadline = time.monotonic() + timeout
            while pending:
                # Past the deadline, one last look that doesn't wait: a late
                # wake-up of this process must not count as unreachable.
                left = max(0.0, deadline - time.monotonic())
                for key, _ in sel.select(left):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    sel.unregister(ready)
                    if ready.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                        ok.add(pending[ready])
                    del pending[ready]
                    ready.close()
                if left == 0.0:
                    break
        finally:
            sel.close()
            for c in pending:
                c.close()
        return ok

    # -- processes and teardown

    def _track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._procs.append(proc)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"TestNet {self.token} is closed")

    def close(self) -> None:
        """Kill our processes, delete links, bridges, namespaces; idempotent.

        Raises RuntimeError if something of ours is still there afterwards.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                for proc in self._procs:
                    if proc.returncode is None:  # unreaped: the (p)gid is still ours
                        with contextlib.suppress(ProcessLookupError):
                            if getattr(proc, "_hvt_own_group", False):
                                os.killpg(proc.pid, signal.SIGKILL)
                            else:
                                os.kill(proc.pid, signal.SIGKILL)
                for proc in self._procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=owners.KILL_WAIT_S)
                    for stream in (proc.stdin, proc.stdout, proc.stderr):
                        if stream is not None:
                            with contextlib.suppress(OSError):
                                stream.close()
                left = owners.destroy(self.token)
                nss, links = owners.names_of(self.token)
                if nss or links or left:
                    raise RuntimeError(
                        f"TestNet {self.token} teardown left namespaces {nss}, links {links}, "
                        f"processes {[owners.describe(p) for p in left]}"
                    )
            finally:
                owners.release(self.token)
