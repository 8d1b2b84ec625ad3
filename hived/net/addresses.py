"""Mesh and control addresses: their defaults, their syntax, who can reach them.

A node binds its mesh inbox at ``tcp://host:port``, is dialled by peers at its
*advertised* ``tcp://host:port`` (never a wildcard), and serves clients and
hivectl at a control address, ``ipc://PATH`` or ``tcp://host:port``. The
``parse_*`` functions return an address or raise ``ValueError`` naming what
was expected; the configuration adds where the value came from.
``is_loopback`` tells the security checks whether other machines can reach an
address.

Cheap to import, and free of I/O except ``derive_advertise`` (which asks the
kernel for a route and sends nothing): the client calls
``local_control_addresses`` to find the local daemon.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping

# Where the packaged systemd unit puts the control socket (RuntimeDirectory=hived).
SYSTEM_CONTROL_ADDRESS = "ipc:///run/hived/hived.sock"
# sockaddr_un.sun_path is 108 bytes including the terminating NUL on Linux;
# zmq refuses longer ipc paths with an obscure errno, so we say it up front.
MAX_IPC_PATH = 107

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_WILDCARDS = ("*", "0.0.0.0", "::")


def default_control_address(environ: Mapping[str, str] = os.environ) -> str:
    """Where the daemon listens for clients and hivectl unless told otherwise.

    Pure and cheap (no I/O): the client calls it to find the local daemon.
    """
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return f"ipc://{runtime.rstrip('/')}/hived/hived.sock"
    if os.geteuid() == 0:
        return SYSTEM_CONTROL_ADDRESS
    return f"ipc:///tmp/hived-{os.getuid()}/hived.sock"


def local_control_addresses(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Control addresses a client should try, in order, to reach a local daemon.

    A user's own daemon (under $XDG_RUNTIME_DIR) first, then the system
    service's socket, which a user shell's default never points at.
    """
    found = [default_control_address(environ)]
    if SYSTEM_CONTROL_ADDRESS not in found:
        found.append(SYSTEM_CONTROL_ADDRESS)
    return found


def split_tcp(address: str, lowest_port: int = 1) -> tuple[str, int] | None:
    """("host", port) of a tcp://host:port address, or None if malformed."""
    if not address.startswith("tcp://"):
        return None
    rest = address[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) <= 65535:
        return None
    if host.startswith("["):
        if not host.endswith("]"):
            return None
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return None
        return host, int(port)
    if host == "*":
        return host, int(port)
    try:
        ipaddress.IPv4Address(host)
        return host, int(port)
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(host) and not host.replace(".", "").isdigit():
        return host, int(port)
    return None


def is_wildcard(host: str) -> bool:
    """True when `host` (as `split_tcp` returns it) means every interface."""
    return host.strip("[]") in _WILDCARDS


def is_loopback(address: str) -> bool:
    """True when only this machine can reach `address`.

    ipc:// is local by nature. For tcp:// the host must be in 127.0.0.0/8, ::1
    or be "localhost"; other names are not resolved (slow, and a name can
    change), so they count as reachable from elsewhere.
    """
    if address.startswith("ipc://"):
        return True
    host = address
    if "://" in address:
        parsed = split_tcp(address, lowest_port=0)
        if parsed is None:
            return False
        host = parsed[0]
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def parse_bind(value: object) -> str:
    """A mesh bind address, or ValueError with the expectation."""
    # Port 0 binds any free port (tests, several nodes on one machine); the
    # advertised address then takes the port actually bound.
    if not isinstance(value, str) or split_tcp(value, lowest_port=0) is None:
        raise ValueError('"tcp://host:port" (host an IP, a name, * or 0.0.0.0; port 0..65535)')
    return value


def parse_advertise(value: object) -> str:
    """An address peers can dial, or ValueError with the expectation."""
    if isinstance(value, str):
        parsed = split_tcp(value, lowest_port=0)
        if parsed is not None and not is_wildcard(parsed[0]):
            return value
    raise ValueError('"tcp://host:port" that peers can dial (not * or 0.0.0.0; port 1..65535)')


def parse_control(value: object) -> str:
    """A control socket address, or ValueError with the expectation."""
    if isinstance(value, str) and value.startswith("ipc://"):
        path = value[len("ipc://") :]
        if path and len(path.encode()) <= MAX_IPC_PATH:
            return value
    elif isinstance(value, str) and split_tcp(value) is not None:
        return value
    raise ValueError(f'"ipc://PATH" (at most {MAX_IPC_PATH} bytes) or "tcp://host:port"')


def parse_metrics_bind(value: object) -> str:
    """Where `[metrics]` serves HTTP, "host:port", or ValueError with the expectation.

    A port alone (an integer) means loopback: the figures are unauthenticated,
    so reaching them from other machines takes a host written out. ":9641"
    (every interface, to some tools) is refused rather than guessed at.
    """
    if type(value) is int and 0 <= value <= 65535:
        return f"127.0.0.1:{value}"
    if isinstance(value, str):
        parsed = split_tcp("tcp://" + value, lowest_port=0)
        if parsed is not None and parsed[0] != "*":
            return value
    raise ValueError(
        '"host:port" (host an IP address or a name, "0.0.0.0" for every interface; '
        "port 0..65535), or a port number alone for loopback"
    )


def split_metrics_bind(bind: str) -> tuple[str, int]:
    """(host, port) of a checked `[metrics] bind`, the host without IPv6 brackets."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def derive_advertise(bind: str) -> str:
    """What peers should dial when only `bind` was given.

    A specific host is dialable as is. For a wildcard we ask the kernel which
    source address it would use towards a documentation-range address (a UDP
    connect sends nothing); with no route we fall back to loopback.
    """
    parsed = split_tcp(bind)
    if parsed is None:  # cannot happen after validation; keep what we were given
        return bind
    host, port = parsed
    if not is_wildcard(host):
        return bind
    v6 = host.startswith("[")
    family, probe, fallback = (
        (socket.AF_INET6, "2001:db8::1", "::1")
        if v6
        else (socket.AF_INET, "192.0.2.1", "127.0.0.1")
    )
    address = fallback
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            found = s.getsockname()[0]
            if found and not is_loopback(found):
                address = found
    except OSError:
        pass
    return f"tcp://[{address}]:{port}" if v6 else f"tcp://{address}:{port}"
