"""`hivectl doctor`: the mistakes operators make, checked one line each.

    ok    config /etc/hived/hived.toml loads and validates
    FAIL  key file /etc/hived/cluster.key does not exist — `hivectl keygen ...`
    warn  seed tcp://192.0.2.13:7700 is not reachable: Connection refused — ...

Each check is a function returning `Finding`s (level, what, how to fix), so
tests call them one by one and the CLI prints them in order; nothing here
prints or exits. The order follows what depends on what: the config names the
key, the key opens a tcp:// control socket, and the daemon's status answer
lists the nodes whose versions are compared.

Doctor only looks: it reads files, asks the local daemon for its status
(the same query as `hivectl status`), and opens and closes a TCP connection
to each seed without sending a byte (a seed with a key still notices a
connection that never finished the CURVE handshake, and logs it).
"""

from __future__ import annotations

import grp
import itertools
import logging
import math
import os
import pwd
import re
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from hived import __version__
from hived.config import DEFAULT_CONFIG_PATH, Config, TimingConfig, load_config
from hived.errors import ConfigError, HiveError, RemoteProtocolError
from hived.net.addresses import is_loopback, local_control_addresses
from hived.net.security import ClusterKey, load_key
from hived.net.socketdir import group_name, user_name
from hived.node.pool import STOP_MARGIN  # what a stop takes past drain_timeout
from hived.node.status import check_status, link_problems
from hived.protocol.control import StatusQuery, ask
from hived.protocol.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR

Level = Literal["ok", "warn", "FAIL"]

DAEMON_USER = "hived"  # User= in systemd/hived.service
CLOCK_SPAN = 0.5  # seconds the clock-rate check watches both clocks
CLOCK_TOLERANCE = 0.01  # relative rate difference above which we warn
CLOCK_READS = 5  # paired reads at each end of the span; the tightest is used
SEED_TIMEOUT = 1.0
CONTROL_TIMEOUT = 2.0

_requests = itertools.count(1)


@dataclass(frozen=True)
class Finding:
    level: Level
    what: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.level:<4}  {self.what}" + (f" — {self.fix}" if self.fix else "")


def ok(what: str) -> Finding:
    return Finding("ok", what)


def warn(what: str, fix: str) -> Finding:
    return Finding("warn", what, fix)


def fail(what: str, fix: str) -> Finding:
    return Finding("FAIL", what, fix)


# --------------------------------------------------------------------------
# Config and security


def check_config(path: str, named: bool = True) -> tuple[Config | None, list[Finding]]:
    """`named`: the operator named this file; else it is the default path, and
    a daemon run by its flags alone has none."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        if not named:
            return None, [
                ok(f"no config file at {path}: a daemon here runs on its flags and defaults "
                   "(`hivectl doctor --config PATH` checks another file)")
            ]
        return None, [
            fail(
                f"config {path} does not exist",
                "write one (examples/cluster/node1.toml is a start) or pass --config PATH",
            )
        ]
    except OSError as exc:
        me = user_name(os.geteuid())
        return None, [
            fail(f"cannot read config {path} as {me}: {exc.strerror}", "run `sudo hivectl doctor`")
        ]
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, [
            fail(f"config: {exc}", f"fix it, then `hived --config {path} --check-config`")
        ]
    return config, [ok(f"config {path} loads and validates")]


def check_exposure(config: Config) -> list[Finding]:
    """A socket other machines reach must be behind the cluster key."""
    exposed = [
        f"{key} {address}"
        for key, address in (("node.bind", config.node.bind), ("node.control", config.node.control))
        if not is_loopback(address)
    ]
    if not exposed:
        return [ok("mesh and control sockets are loopback/ipc only")]
    where = " and ".join(exposed)
    if config.security.key_file:
        return [ok(f"{where} reachable from other machines, behind the cluster key")]
    if config.security.insecure:
        return [
            warn(
                f"{where} reachable from other machines without a key (insecure = true): "
                "anyone who reaches it runs code as the daemon's user",
                "set [security] key_file unless this network is trusted",
            )
        ]
    return [
        fail(
            f"{where} reachable from other machines but no key file is set; hived refuses to start",
            "`hivectl keygen /etc/hived/cluster.key`, copy it to every node, set "
            '[security] key_file = "/etc/hived/cluster.key" (or insecure = true on a trusted network)',
        )
    ]


def check_key(path: str, daemon_user: str = DAEMON_USER) -> tuple[ClusterKey | None, list[Finding]]:
    """The cluster key: present, private, readable by the daemon, well-formed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, [
            fail(
                f"key file {path} does not exist",
                f"`hivectl keygen {path}` on one node, then copy that file to every node "
                "(see examples/cluster/README.md)",
            )
        ]
    except OSError as exc:
        return None, [
            warn(f"cannot look at key file {path}: {exc.strerror}", "run `sudo hivectl doctor`")
        ]
    found: list[Finding] = []
    mode = stat.S_IMODE(st.st_mode)
    owner = f"{user_name(st.st_uid)}:{group_name(st.st_gid)}"
    fix_mode = f"`chmod 0640 {path}; chown root:{daemon_user} {path}`"
    if mode & stat.S_IROTH:
        found.append(
            warn(
                f"key file {path} is world-readable (mode {mode:04o}): "
                "anyone on this machine can join the hive and run code",
                fix_mode,
            )
        )
    elif mode & 0o137:
        found.append(warn(f"key file {path} has mode {mode:04o}, looser than 0640", fix_mode))
    else:
        found.append(ok(f"key file {path} is mode {mode:04o}, owned by {owner}"))

    reader = _can_read(st, daemon_user)
    if reader is False:
        found.append(
            fail(
                f"user {daemon_user} (the daemon's) cannot read key file {path} "
                f"(mode {mode:04o}, owned by {owner})",
                fix_mode,
            )
        )

    if not os.access(path, os.R_OK):
        me = user_name(os.geteuid())
        found.append(
            warn(
                f"cannot read key file {path} as {me}, so its contents were not checked",
                "run `sudo hivectl doctor`",
            )
        )
        return None, found
    quiet = logging.getLogger("hived.net.security")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its own world-readable warning: we said it above
    try:
        key = load_key(path)
    except ConfigError as exc:
        found.append(fail(str(exc), f"`hivectl keygen {path}` and copy it to every node again"))
        return None, found
    finally:
        quiet.setLevel(level)
    found.append(ok(f"key file {path} holds a valid cluster key"))
    return key, found


def _can_read(st: os.stat_result, user: str) -> bool | None:
    """Whether `user` may read a file with this stat; None if there is no such user."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    if pw.pw_uid == 0:
        return True
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & stat.S_IRUSR)
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IRGRP)
    return bool(st.st_mode & stat.S_IROTH)


# --------------------------------------------------------------------------
# The local daemon


def check_control(
    addresses: Sequence[str], curve: Callable[[Any], None] | None = None
) -> tuple[dict[str, Any] | None, list[Finding]]:
    """Ask the first address that answers for the hive's status; look at its directory."""
    for address in addresses:
        # A daemon with a key puts CURVE on its TCP control socket; ipc goes without.
        secured = curve if address.startswith("tcp://") else None
        try:
            answer = ask(address, StatusQuery(next(_requests)), CONTROL_TIMEOUT, secured)
        except HiveError as exc:  # a socket not to be trusted, or a node that refuses us
            return None, [Finding("FAIL", str(exc))]  # the message names the fix
        if answer is not None and _well_formed(answer.body):
            found = [ok(f"control socket {address} answers")]
            if address.startswith("ipc://"):
                found += _socket_permissions(address[len("ipc://") :])
            return answer.body, found
    return None, [
        fail(
            f"no daemon answered at {' or '.join(addresses)}",
            "is hived running? `systemctl status hived`, `journalctl -u hived`",
        )
    ]


def _well_formed(body: dict[str, Any]) -> bool:
    try:
        check_status(body)
    except RemoteProtocolError:
        return False
    return True


def _socket_permissions(path: str) -> list[Finding]:
    directory = os.path.dirname(path) or "."
    try:
        dst, sst = os.stat(directory), os.stat(path)
    except OSError:
        return []
    dmode, smode = stat.S_IMODE(dst.st_mode), stat.S_IMODE(sst.st_mode)
    owner = f"{user_name(dst.st_uid)}:{group_name(dst.st_gid)}"
    fix = f"`chmod 0750 {directory}` (the unit sets RuntimeDirectoryMode=0750)"
    if dmode & stat.S_IWOTH and not dmode & stat.S_ISVTX:
        return [
            warn(
                f"control directory {directory} is world-writable (mode {dmode:04o}): "
                "anyone can replace the socket",
                fix,
            )
        ]
    if dmode & stat.S_IXOTH and smode & stat.S_IWOTH:
        return [
            warn(
                f"anyone on this machine can use control socket {path} and run code as "
                f"{user_name(sst.st_uid)} (directory mode {dmode:04o}, socket {smode:04o})",
                fix,
            )
        ]
    return [
        ok(
            f"control directory {directory} is mode {dmode:04o}, owned by {owner}; "
            f"socket mode {smode:04o}"
        )
    ]


def check_versions(
    status: dict[str, Any], ours: str = __version__, protocol: str | None = None
) -> list[Finding]:
    """Protocols first: a node of another major cannot be in our hive; minors
    interoperate (a rolling upgrade). Then releases: every node should run ours.

    `protocol` is this hivectl's ("1.0"; None: the one this hivectl speaks)."""
    protocol = protocol or f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
    nodes = [n for n in status.get("nodes") or [] if type(n) is dict]
    found: list[Finding] = []
    speaking: dict[str, list[str]] = {}  # protocol: names of the nodes that speak it
    for n in nodes:
        if type(n.get("protocol")) is str:
            speaking.setdefault(n["protocol"], []).append(str(n.get("name")))
    major = protocol.partition(".")[0]
    for version, names in sorted(speaking.items()):
        if version.partition(".")[0] != major:
            found.append(fail(
                f"node(s) {', '.join(names)} speak protocol {version}, this hivectl {protocol}: "
                "nodes of another major version do not interoperate",
                "upgrade the older side, so that every node speaks one major version",
            ))  # fmt: skip
    if len(speaking) > 1 and not found:
        mix = "; ".join(f"{v} on {', '.join(names)}" for v, names in sorted(speaking.items()))
        found.append(ok(f"a rolling upgrade in progress: protocol {mix} "
                        "(minors interoperate: each pair speaks the lower one)"))
    other = [n for n in nodes if str(n.get("version")) != ours]
    if not other:
        return [*found, ok(f"all {len(nodes)} node(s) run hived {ours}")]
    return found + [
        warn(
            f"node {n.get('name')} runs hived {n.get('version')}, this hivectl is {ours}",
            "install the same hived release on every node (peers of another "
            "protocol major are refused)",
        )
        for n in other
    ]


def check_seed_links(status: dict[str, Any]) -> list[Finding]:
    """What the daemon sees of its seeds and peers: one it cannot reach or
    that refuses it leaves it cut off, or the election a voter short, while
    it looks well."""
    return [
        fail(
            f"the daemon's {kind} {row['address']} is {row['state']}: {row['why']}",
            "the same cluster key and hived release on every node; `hivectl doctor` there",
        )
        for kind, row in link_problems(status)
    ]


# --------------------------------------------------------------------------
# The network and the machine


def check_seeds(seeds: Sequence[str], timeout: float = SEED_TIMEOUT) -> list[Finding]:
    """TCP connect to every seed, at once; connect and close, nothing sent."""
    if not seeds:
        return [ok("no seeds: this node is a hive of its own")]
    with ThreadPoolExecutor(max_workers=min(len(seeds), 16)) as ex:
        errors = list(ex.map(lambda s: _connect(s, timeout), seeds))
    found = []
    for seed, error in zip(seeds, errors, strict=True):
        if error is None:
            found.append(ok(f"seed {seed} accepts connections"))
        else:
            found.append(
                warn(
                    f"seed {seed} is not reachable: {error}",
                    "is hived running there, and port open in its firewall? "
                    "(`hivectl doctor` on that machine)",
                )
            )
    if all(error is not None for error in errors):
        found.append(
            fail(
                "no seed is reachable: this node cannot join the hive",
                "check the seeds in the config, the network and the peers' firewalls",
            )
        )
    return found


def _connect(seed: str, timeout: float) -> str | None:
    """None if a TCP connection to `seed` opened, else why not."""
    rest = seed[len("tcp://") :] if seed.startswith("tcp://") else seed
    host, _, port = rest.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as exc:
        return f"cannot resolve {host}: {exc.strerror}"
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)


def check_clock(
    span: float = CLOCK_SPAN,
    monotonic: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Finding]:
    """The monotonic clock (leases, timeouts) should run at the wall clock's rate.

    A broken clock source in a VM makes leases and timeouts run fast or
    slow; NTP disciplines the wall clock, so comparing the two over a short
    span shows it. A wall-clock step during the span shows up here too.
    """
    m0, w0, e0 = _paired(monotonic, wall)
    sleep(span)
    m1, w1, e1 = _paired(monotonic, wall)
    elapsed = m1 - m0
    if elapsed <= 0:
        return [
            fail(
                "the monotonic clock did not advance",
                "check the clock source: "
                "`cat /sys/devices/system/clocksource/clocksource0/current_clocksource`",
            )
        ]
    # What the reads themselves cannot tell apart from drift does not count.
    drift = max(0.0, abs((w1 - w0) - elapsed) - e0 - e1) / elapsed
    if drift > CLOCK_TOLERANCE:
        return [
            warn(
                f"the wall clock ran at {(w1 - w0) / elapsed:.3f}x the monotonic clock "
                f"over {elapsed:.2f} s; leases and timeouts depend on it",
                "is NTP stepping the clock, or the VM's clock source unstable? "
                "`timedatectl timesync-status` or `chronyc tracking`",
            )
        ]
    return [ok(f"monotonic and wall clocks agree within {drift:.2%} over {elapsed:.2f} s")]


def _paired(monotonic: Callable[[], float], wall: Callable[[], float]) -> tuple[float, float, float]:
    """A monotonic and a wall reading taken together, and how far apart they
    may be: the wall read bracketed by two monotonic reads, the tightest of a
    few tries (a loaded machine can preempt between two reads for
    milliseconds, which over half a second reads as a 1% drift)."""
    best = (0.0, 0.0, float("inf"))
    for _ in range(CLOCK_READS):
        before = monotonic()
        now = wall()
        after = monotonic()
        if (after - before) / 2 < best[2]:
            best = ((before + after) / 2, now, (after - before) / 2)
    return best


# --------------------------------------------------------------------------
# systemd


def check_stop_timeout(drain_timeout: float, stop_timeout: float | None) -> list[Finding]:
    """systemd must not SIGKILL a drain that is still within drain_timeout.

    `stop_timeout` is the unit's TimeoutStopSec in seconds (None: no unit, or
    no limit)."""
    if stop_timeout is None:
        return []
    needed = drain_timeout + STOP_MARGIN
    if stop_timeout < needed:
        return [
            warn(
                f"drain_timeout {drain_timeout:g} s does not fit in the unit's TimeoutStopSec "
                f"{stop_timeout:g} s with {STOP_MARGIN:g} s to stop the workers after it: "
                "past it, systemd lets the drain run only while hived keeps asking for more "
                "time (EXTEND_TIMEOUT_USEC)",
                f"`systemctl edit hived` and set [Service] TimeoutStopSec={math.ceil(needed)}s, "
                "or lower [timing] drain_timeout",
            )
        ]
    return [ok(f"drain_timeout {drain_timeout:g} s fits in the unit's TimeoutStopSec {stop_timeout:g} s")]


def unit_stop_timeout(unit: str = "hived") -> float | None:
    """The loaded unit's TimeoutStopSec (drop-ins included) in seconds, from
    `systemctl show`; None where there is no such unit, no systemd, or no limit."""
    try:
        out = subprocess.run(
            ["systemctl", "show", "-p", "LoadState", "-p", "TimeoutStopUSec", unit],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    shown = dict(line.partition("=")[::2] for line in out.stdout.splitlines())
    if out.returncode != 0 or shown.get("LoadState") != "loaded":
        return None
    return parse_timespan(shown.get("TimeoutStopUSec", ""))


_SPAN_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)(us|ms|s|min|h|d|w)")


def parse_timespan(text: str) -> float | None:
    """Seconds in a time span as systemctl shows it ("45s", "1min 30s");
    None for "infinity" and for anything else it would not show."""
    seconds, at = 0.0, 0
    while at < len(text.rstrip()):
        match = _SPAN.match(text, at)
        if match is None:
            return None
        seconds += float(match[1]) * _SPAN_UNITS[match[2]]
        at = match.end()
    return seconds if at else None


# --------------------------------------------------------------------------


def diagnose(
    config_path: str | None,
    connect: str | None = None,
    key_file: str | None = None,
    daemon_user: str = DAEMON_USER,
    stop_timeout: Callable[[], float | None] = unit_stop_timeout,
) -> list[Finding]:
    """Every check, in order; a check whose input is missing is left out.
    `config_path` None: the default file, which a daemon run by flags lacks."""
    config, found = check_config(config_path or DEFAULT_CONFIG_PATH, named=config_path is not None)
    key: ClusterKey | None = None
    if config is not None:
        found += check_exposure(config)
    key_path = key_file or (config.security.key_file if config else None)
    if key_path:
        key, more = check_key(key_path, daemon_user)
        found += more
    if connect:
        addresses = [connect]
    elif config is not None and config.origins.get("node.control", "default") != "default":
        addresses = [config.node.control]
    else:
        addresses = local_control_addresses()
    status, more = check_control(addresses, key.client if key else None)
    found += more
    if config is not None:
        found += check_seeds(config.node.seeds)
    found += check_clock()
    if status is not None:
        found += check_versions(status)
        found += check_seed_links(status)
    drain_timeout = (config.timing if config else TimingConfig()).drain_timeout
    found += check_stop_timeout(drain_timeout, stop_timeout())
    return found

