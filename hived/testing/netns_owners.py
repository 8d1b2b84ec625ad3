"""Who owns which test network, teardown, and the sweep of stale ones.

Names: everything a TestNet creates is named from its token
``hvt<owner pid, 5 base-36 digits><2 base-36 chars>``: the bridge ``<token>br``,
group bridges ``<token>g<k>``, bridge-side veths ``<token>v<i>`` (all at most
15 characters) and namespaces ``<token>-<host name>``; a marker file
``/run/hived-testnet/<token>`` holds the owner's pid and start time.
:func:`sweep_stale` (run once per process, before the first TestNet) removes
only resources of that exact naming scheme whose owner process is gone.

:func:`destroy` SIGKILLs every process still inside one of a token's
namespaces (pinned by pidfd, so a reused pid is never hit), then deletes the
namespaces, bridges and veths.  TestNets still open at interpreter exit are
closed then.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import signal
import threading
import time
from typing import Protocol

from hived.testing import netns_plumbing as plumbing

PREFIX = "hvt"
MARKER_DIR = "/run/hived-testnet"
KILL_WAIT_S = 5.0  # for a SIGKILLed process to be gone

# Every name a TestNet makes, and nothing else: token, then one of our suffixes.
_NAME_RE = re.compile(r"^(hvt[0-9a-z]{7})(?:br|g[0-9]+|v[0-9]+|-[A-Za-z0-9_.-]+)?$")
_NS_GONE_WAIT_S = 0.25


# --------------------------------------------------------------------------- processes


def _procs_in(ns_ids: set[tuple[int, int]]) -> list[int]:
    """Pids of processes (thread-group leaders) whose network namespace is one of ns_ids."""
    if not ns_ids:
        return []
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ns_ids:
            found.append(int(entry))
    return found


def describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return f"{pid} (gone)"
    return f"{pid} [{state}] {cmd[:200]}"


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True


def _kill_in_netns(ns_ids: set[tuple[int, int]]) -> list[int]:
    """SIGKILL every process inside the given namespaces; wait until they are gone.

    Race-free against pid reuse: the pid is pinned with a pidfd and its
    namespace checked again before the signal is sent.
    """
    killed: list[int] = []
    for _ in range(3):  # a process may fork while we scan
        pids = _procs_in(ns_ids)
        if not pids:
            break
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if plumbing.ns_id(f"/proc/{pid}/ns/net") in ns_ids:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    killed.append(pid)
            except OSError:
                pass
            finally:
                os.close(pidfd)
        deadline = time.monotonic() + KILL_WAIT_S
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.005)
    return killed


# --------------------------------------------------------------------------- ownership

class Closable(Protocol):
    """What this module needs of a TestNet: that it can be closed at exit."""

    def close(self) -> None: ...


_lock = threading.RLock()
_made: set[str] = set()  # tokens made by this process (live or closed)
_live: dict[str, Closable] = {}
_swept = False


def b36(n: int, width: int) -> str:
    """``n`` in base 36 (lower case), zero-padded to ``width`` digits."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out.rjust(width, "0")


def starttime(pid: int) -> str | None:
    """When ``pid`` started (field 22 of /proc/<pid>/stat), None if it is gone;
    with the pid it names one process, across pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(token: str) -> bool:
    pid = int(token[len(PREFIX) : len(PREFIX) + 5], 36)
    if pid == os.getpid():
        return token in _live
    now = starttime(pid)
    if now is None:
        return False
    try:
        with open(os.path.join(MARKER_DIR, token)) as f:
            _, recorded = f.read().split()
    except (OSError, ValueError):
        return True  # no marker to compare with: assume the pid is still the owner
    return recorded == now


def names_of(token: str) -> tuple[list[str], list[str]]:
    """(namespaces, root-namespace links) named by ``token``."""

    def ours(name: str) -> bool:
        m = _NAME_RE.match(name)
        return m is not None and m.group(1) == token

    nss = sorted(n for n in _listdir(plumbing.NETNS_DIR) if ours(n) and n != token)
    links = sorted(n for n in _listdir(plumbing.SYS_NET) if ours(n) and n != token)
    return nss, links


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def destroy(token: str) -> list[int]:
    """Kill the processes in ``token``'s namespaces, delete its namespaces and
    links; return the pids that would not die."""
    nss, links = names_of(token)
    # Identify namespaces only while they are mounted under our names: once
    # one is gone its inode number may be reused by anybody's new namespace.
    paths = [os.path.join(plumbing.NETNS_DIR, ns) for ns in nss]
    ids = {i for i in map(plumbing.ns_id, paths) if i is not None}
    _kill_in_netns(ids)
    stuck = _procs_in(ids)
    # Namespaces first: with no process left in them the kernel tears them down
    # (and the veth pairs in them) in one batch, ~10x faster than deleting the
    # veths one by one (30 hosts: 0.07 s vs 0.7 s).  Setting the bridge ends
    # down first drops the hosts' carrier, which flushes their neighbour
    # tables (packets queued for an unanswered ARP across a partition would
    # otherwise hold the namespace for ~3 s).  A namespace something else
    # still holds -- an open socket made in Host.enter(), an orphaned TCP
    # socket still retransmitting -- keeps its veth: those are deleted
    # explicitly after a short wait; the anonymous namespace (only `lo`
    # left) goes away when its last socket does.
    veths = [n for n in links if re.fullmatch(r"hvt[0-9a-z]{7}v[0-9]+", n)]
    bridges = [n for n in links if n not in veths]
    plumbing.ip(
        [f"link set {n} down" for n in veths]
        + [f"netns del {n}" for n in nss]
        + [f"link del {n}" for n in bridges],
        force=True,
    )
    deadline = time.monotonic() + _NS_GONE_WAIT_S
    while veths and time.monotonic() < deadline:
        present = set(_listdir(plumbing.SYS_NET))
        veths = [v for v in veths if v in present]
        if veths:
            time.sleep(0.005)
    plumbing.ip([f"link del {n}" for n in veths], force=True)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(MARKER_DIR, token))
    return stuck


def sweep_stale() -> list[str]:
    """Remove what earlier, crashed runs left behind; return the tokens removed.

    Only names of this module's scheme are considered, and only those whose
    owner process (pid in the name, start time in the marker file) is gone.
    """
    global _swept
    with _lock:
        _swept = True
        tokens: set[str] = set()
        for path in (plumbing.NETNS_DIR, plumbing.SYS_NET, MARKER_DIR):
            for name in _listdir(path):
                m = _NAME_RE.match(name)
                if m:
                    tokens.add(m.group(1))
        stale = sorted(t for t in tokens if not _owner_alive(t))
        for token in stale:
            destroy(token)
        return stale


def _new_token() -> str:
    pid = b36(os.getpid(), 5)
    for _ in range(1000):
        token = PREFIX + pid + b36(random.randrange(36 * 36), 2)
        if token in _made:
            continue
        taken = _listdir(plumbing.NETNS_DIR) + _listdir(plumbing.SYS_NET)
        if any(n.startswith(token) for n in taken):
            continue
        return token
    raise RuntimeError("no free TestNet token")


def claim(net: Closable) -> str:
    """A fresh token for ``net``, live until :func:`release`; sweeps once per process first."""
    with _lock:
        if not _swept:
            sweep_stale()
        token = _new_token()
        _made.add(token)
        _live[token] = net
        return token


def write_marker(token: str) -> None:
    """Record this process (pid and start time) as the owner of ``token``'s resources."""
    os.makedirs(MARKER_DIR, exist_ok=True)
    with open(os.path.join(MARKER_DIR, token), "w") as f:
        f.write(f"{os.getpid()} {starttime(os.getpid())}\n")


def release(token: str) -> None:
    """``token``'s TestNet is closed: no longer closed at exit, nor alive to the sweep."""
    with _lock:
        _live.pop(token, None)


@atexit.register
def _close_all() -> None:
    for net in list(_live.values()):
        with contextlib.suppress(Exception):
            net.close()

