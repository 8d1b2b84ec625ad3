"""The kernel side of the test hosts: joining network namespaces and running
``ip`` and ``tc`` against them.

Management commands always run in the namespace this process started in (the
*home* namespace, held open from import on), even when the calling thread is
inside a test host at the time; :func:`in_netns` moves only the calling
thread.  Used by :mod:`hived.testing.netns` (hosts and faults) and
:mod:`hived.testing.netns_owners` (teardown and the stale-net sweep).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence

NETNS_DIR = "/run/netns"
SYS_NET = "/sys/class/net"
TC = shutil.which("tc") or "/usr/sbin/tc"
_CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, _CLONE_NEWNET)
        return
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_libc = ctypes.CDLL(None, use_errno=True)
# The namespace this process lived in when it imported us, held open: every
# management command (ip) runs there even if the calling thread is inside a Host.
_HOME_FD = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def in_netns(target: str | int) -> Iterator[None]:
    """Move the calling thread (only) into a network namespace (path or fd).

    Processes forked and sockets created meanwhile belong to that namespace;
    a socket keeps its namespace after the block ends.
    """
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(target, int):
            _setns(target)
        else:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
        try:
            yield
        finally:
            _setns(back)
    finally:
        os.close(back)


def _home() -> contextlib.AbstractContextManager[None]:
    return in_netns(_HOME_FD)


def link_states(dev: str, ns: str | None) -> list[str]:
    """A device's operstate (UP, DOWN, ...) and, for a bridge port, its port
    state (forwarding, disabled, ...), in the home namespace or `ns`."""
    argv = ["ip", *(["-n", ns] if ns else []), "-d", "-o", "link", "show", "dev", dev]
    with _home():
        words = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.split()
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == "state"]


def ip(lines: Sequence[str], *, ns: str | None = None, force: bool = False) -> str:
    """Run ``ip -batch`` in the home namespace (or ``-n ns``); raise with stderr."""
    if not lines:
        return ""
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    with _home():
        res = subprocess.run(
            argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60
        )
    if res.returncode != 0 and not force:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}\n"
            f"commands:\n" + "\n".join(lines)
        )
    return res.stderr


def tc(ns: str, lines: Sequence[str]) -> None:
    """Run ``tc -n ns -batch`` in the home namespace; raise with stderr."""
    with _home():
        res = subprocess.run([TC, "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n",
                             capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise RuntimeError(f"tc -n {ns} failed ({res.returncode}): {res.stderr.strip()}\n"
                           "commands:\n" + "\n".join(lines))


def random_share(share: float) -> str:
    """Classic BPF that matches about ``share`` of packets: the kernel's random
    u32 (ancillary load SKF_AD_RANDOM) above a threshold."""
    threshold = min(2**32 - 1, int((1.0 - share) * 2**32))
    load_random = (1 << 32) - 4096 + 56  # SKF_AD_OFF + SKF_AD_RANDOM, as u32
    return f"4,32 0 0 {load_random},37 0 1 {threshold},6 0 0 4294967295,6 0 0 0"


def ip_each(per_ns: Mapping[str, Sequence[str]]) -> None:
    """``ip -n NS -batch`` for several namespaces at once."""
    with _home():
        procs = {
            ns: subprocess.Popen(
                ["ip", "-n", ns, "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for ns in per_ns
        }
    errors = []
    try:
        for ns, p in procs.items():
            assert p.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                p.stdin.write("\n".join(per_ns[ns]) + "\n")
                p.stdin.close()
    finally:
        for ns, p in procs.items():
            with contextlib.suppress(OSError):
                p.stdin.close()  # type: ignore[union-attr]
            try:
                p.wait(timeout=60)
            finally:
                assert p.stderr is not None
                err = p.stderr.read()
                p.stderr.close()
            if p.returncode != 0:
                errors.append(f"{ns}: {err.strip()}")
    if errors:
        raise RuntimeError("ip -n NS -batch failed: " + "; ".join(errors))


def ns_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of a namespace file, which names the namespace; None if gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
