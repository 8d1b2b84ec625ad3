"""examples/cluster/ under a real systemd: three machines, step for step.

Three Debian root file systems boot with systemd as PID 1, each in a test
host of its own (a network namespace of hived.testing.netns, with its own
address on a private bridge). hived is installed into each from wheels
built once on this machine, exactly as examples/cluster/README.md says, and
the tests then do what an operator's day holds, looking from the outside:

    host (pytest, root)                          node1, node2, node3
      debootstrap ──▶ /var/cache/hived-test/debian-…tar   (systemd-nspawn -b
      pip wheel + download ──▶ …/wheels-<source hash>/     --network-namespace-path
      tar -x ──▶ /var/tmp/hived-nspawn-XXXX/<node>  ──▶    =/run/netns/<test host>)
      nsenter -t <PID 1> -a …  ─────────────────────▶  systemctl, journalctl,
                                                       hivectl, python, runuser
      TestNet bridge, 198.18.<net>.1-3  ◀──────────▶  hived.service (User=hived)

The containers reach each other and nothing else: pip inside them has no
package index, so it installs from the wheelhouse (this checkout's wheel and
its dependencies' wheels for the containers' Python), as on machines without
the index. The commands of the walk-through are written out once here
(WALKTHROUGH) and checked to be in the README word for word.

Needs root and Linux; installs debootstrap and systemd-container with
apt-get when they are missing. Skipped without them outside CI, failed in
CI. On a failure the journal of every container is kept under
/var/tmp/hived-systemd-evidence/. About 75 s with warm caches (the root
file system, and the wheelhouse for this source), 30 s more to build the
wheelhouse; each step's time is printed (-s).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, TypeVar

import psutil
import pytest
from netns_fixtures import require_netns

from hived.protocol import wire
from hived.testing.childenv import REPO
from hived.testing.netns import Host, TestNet
from hived.testing.waiting import wait_for

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SUITE = "bookworm"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-pip")
CACHE = Path("/var/cache/hived-test")
RUNS = Path("/var/tmp")
EVIDENCE = Path("/var/tmp/hived-systemd-evidence")
EVIDENCE_KEPT = 10  # failed runs whose journals are kept
# tool -> the Debian package that has it
TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
}
TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
CGROUPS = Path("/sys/fs/cgroup")
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXAMPLE = Path(REPO) / "examples" / "cluster"
NODES = ("node1", "node2", "node3")
# The example's addresses, replaced by the test hosts' as the README says to.
DOC_ADDRESSES = {"node1": "192.0.2.11", "node2": "192.0.2.12", "node3": "192.0.2.13"}
PORT = 7700
# What a wheel of this checkout is built from (setup.cfg reads README.md).
BUILD_INPUTS = ("pyproject.toml", "setup.cfg", "README.md", "hived")
WHEELHOUSES_KEPT = 4

# The walk-through's commands, as examples/cluster/README.md gives them (for
# node1 where they name a node); run as root in /root, where the files an
# operator copies over lie: nodeN.toml, systemd/hived.service, wheels/.
WALKTHROUGH = {
    "package": """\
        python3 -m venv /opt/hived
        /opt/hived/bin/pip install --no-index --find-links wheels hived-mesh
        ln -sf /opt/hived/bin/hived /opt/hived/bin/hivectl /usr/local/bin/
        useradd --system --home-dir /var/lib/hived --shell /usr/sbin/nologin --groups video hived
        install -d -m 0750 -o root -g hived /etc/hived
        usermod -aG hived alice
        """,
    "keygen": """\
        hivectl keygen /etc/hived/cluster.key
        chown root:hived /etc/hived/cluster.key && chmod 0640 /etc/hived/cluster.key
        """,
    # after `scp -p` of the key, on each other machine
    "key copied": """\
        chown root:hived /etc/hived/cluster.key && chmod 0640 /etc/hived/cluster.key
        """,
    "config": """\
        install -m 0640 -o root -g hived node1.toml /etc/hived/hived.toml
        hived --config /etc/hived/hived.toml --check-config
        """,
    "unit": """\
        install -m 0644 systemd/hived.service /etc/systemd/system/
        systemctl daemon-reload
        systemctl enable --now hived
        systemctl status hived
        """,
    "rekey": """\
        hivectl keygen --force /etc/hived/cluster.key
        """,
    "upgrade": """\
        /opt/hived/bin/pip install --upgrade --no-index --find-links wheels hived-mesh
        systemctl restart hived
        """,
}
JOB_PY = """\
from hived import hive
print(sum(hive.map(pow, range(1000), [2] * 1000)))
"""

# A map as long as the test wants: over inputs 0, 1, 2, ... until the file
# argv[1] exists; one JSON line per result as it comes: [index, x², the node
# that ran it, the worker's pid], then "done".
MAP_UNTIL = """\
import json, os, socket, sys, time
import hived

STOP, SECONDS = sys.argv[1], float(sys.argv[2])


def where(x, seconds=SECONDS):
    time.sleep(seconds)
    return x * x, socket.gethostname(), os.getpid()


def inputs():
    x = 0
    while not os.path.exists(STOP):
        yield x
        x += 1


with hived.connect() as h:
    for i, (value, node, pid) in enumerate(h.map(where, inputs(), chunksize=1)):
        print(json.dumps([i, value, node, pid]), flush=True)
print("done", flush=True)
"""
MAP_UNTIL_PATH = "/usr/local/share/hived-test/map_until.py"
# One task still running when its node is told to stop; it says when it ended.
SLOW_TASK = """\
import time, hived

def slow_task(x):
    time.sleep(5)
    return x + 1, time.time()

with hived.connect() as h:
    value, ended = h.submit(slow_task, 41).result(timeout=60)
    print("result", value, ended, flush=True)
"""
SLOW_TASK_PATH = "/usr/local/share/hived-test/slow_task.py"

# The first test also waits for the cluster: with a cold cache, debootstrap.
pytestmark = pytest.mark.timeout(600)
T = TypeVar("T")


def unavailable(why: str) -> None:
    if CI:
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def run(argv: Sequence[object], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(a) for a in argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kw,
    )
    if out.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {out.returncode}\n{out.stdout[-4000:]}{out.stderr[-4000:]}"
        )
    return out


STEPS: list[tuple[str, float]] = []


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Time a step; its time is printed at once and in the module's summary."""
    start = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - start
        STEPS.append((what, took))
        print(f"\n[systemd] {what}: {took:.1f} s", flush=True)


def each(fn: Callable[[Node], T], nodes: Sequence[Node]) -> list[T]:
    """fn on every node at once; the first failure is raised, naming its node."""
    with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        futures = [pool.submit(fn, n) for n in nodes]
    results = []
    for node, future in zip(nodes, futures, strict=True):
        try:
            results.append(future.result())
        except AssertionError as exc:
            raise AssertionError(f"{node.name}: {exc}") from None
    return results


def script(name: str, node: str = "node1") -> str:
    """A step of WALKTHROUGH as a shell script for `node`."""
    lines = textwrap.dedent(WALKTHROUGH[name]).replace("node1", node)
    return "set -eu\ncd /root\n" + lines


# -- the host's side -----------------------------------------------------------


def tools() -> dict[str, str]:
    """Full paths of debootstrap, systemd-nspawn and nsenter; installed if missing."""
    if sys.platform != "linux":
        unavailable("a systemd container needs Linux")
    if os.geteuid() != 0:
        unavailable("booting a systemd container needs root")
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=path) is None})
    if missing:
        if shutil.which("apt-get") is None:
            unavailable(f"{', '.join(missing)} missing and no apt-get to install them")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            out = subprocess.run(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if out.returncode != 0:
                unavailable(f"`{' '.join(argv)}` failed: {out.stderr[-2000:]}")
    found = {tool: shutil.which(tool, path=path) for tool in TOOLS}
    lacking = [tool for tool, where in found.items() if where is None]
    if lacking:
        unavailable(f"{', '.join(lacking)} still missing after installing {', '.join(missing)}")
    return found  # type: ignore[return-value]


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / name, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def rootfs(debootstrap: str) -> Path:
    """The cached root file system tarball, built on first use.

    Keyed by suite, variant and package list, so changing INCLUDE builds a
    new one. Built in a temporary directory next to the cache and renamed
    into place, under a lock, so a concurrent or interrupted run never sees
    half a tarball.
    """
    key = hashlib.sha256(json.dumps([SUITE, "minbase", sorted(INCLUDE)]).encode()).hexdigest()[:16]
    tarball = CACHE / f"debian-{SUITE}-minbase-{key}.tar"
    if tarball.exists():
        return tarball
    with cache_lock(".lock"):
        if tarball.exists():  # another run built it while we waited
            return tarball
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
        try:
            root = build / "root"
            run(
                [debootstrap, "--variant=minbase", f"--include={','.join(INCLUDE)}", SUITE, root],
                timeout=480,
            )
            for deb in (root / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            part = build / "root.tar"
            run([*TAR, "-C", root, "-cf", part, "."], timeout=300)
            os.replace(part, tarball)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return tarball


class Target(NamedTuple):
    """What the containers' Python takes: the wheels are downloaded for it."""

    python: str  # "3.11"
    glibc: str  # "2.36"
    machine: str  # "x86_64"


def container_target(root: Path) -> Target:
    """Ask the root file system's own python3 (in a chroot) what it is."""
    out = run(
        ["chroot", root, "/usr/bin/python3", "-c",
         "import platform, sys; print('%d.%d' % sys.version_info[:2], "
         "platform.libc_ver()[1], platform.machine())"],
        timeout=30,
    )
    python, glibc, machine = out.stdout.split()
    return Target(python, glibc, machine)


class Wheels(NamedTuple):
    here: Path  # this checkout's hived and every dependency, for Target
    next: Path  # the next release of this checkout: its protocol minor one higher
    version: str
    next_version: str


def wheelhouse(target: Target) -> Wheels:
    """Wheels of this checkout, its dependencies and its next release, for `target`.

    Cached under CACHE keyed by the sources the two wheels are made of and
    the target; built in a temporary directory and renamed into place under
    a lock, like the root file system. Only the newest few are kept.
    """
    with tempfile.TemporaryDirectory(prefix="hived-wheel-src-") as tmp:
        src, next_src = Path(tmp) / "here", Path(tmp) / "next"
        copy_build_inputs(src)
        shutil.copytree(src, next_src)
        next_version = next_release(next_src)
        key = hashlib.sha256()
        key.update(json.dumps(target).encode())
        for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            key.update(str(path.relative_to(tmp)).encode() + b"\0" + path.read_bytes() + b"\0")
        house = CACHE / f"wheels-{key.hexdigest()[:16]}"
        with cache_lock(".wheels.lock"):
            if not house.exists():
                build_wheelhouse(src, next_src, next_version, target, house)
            os.utime(house)
            olds = sorted(CACHE.glob("wheels-*"), key=lambda p: p.stat().st_mtime, reverse=True)
            for old in olds[WHEELHOUSES_KEPT:]:
                shutil.rmtree(old, ignore_errors=True)
    version = json.loads((house / "versions.json").read_text())
    return Wheels(house / "here", house / "next", version["here"], version["next"])


def copy_build_inputs(dest: Path) -> None:
    dest.mkdir(parents=True)
    for name in BUILD_INPUTS:
        source = Path(REPO) / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, dest / name)


def build_wheelhouse(
    src: Path, next_src: Path, next_version: str, target: Target, house: Path
) -> None:
    build = Path(tempfile.mkdtemp(prefix=".wheels-", dir=CACHE))
    try:
        here, nxt = build / "here", build / "next"
        pip = [sys.executable, "-m", "pip"]
        run([*pip, "wheel", "--quiet", "--no-deps", "-w", here, src], timeout=300)
        [wheel] = here.glob("hived_mesh-*.whl")
        tags = ["--python-version", target.python, "--implementation", "cp",
                "--abi", "cp" + target.python.replace(".", "")]
        newest = int(target.glibc.split(".")[1])
        for platform in [f"manylinux2014_{target.machine}"] + [
            f"manylinux_2_{minor}_{target.machine}" for minor in range(17, newest + 1)
        ]:
            tags += ["--platform", platform]
        run([*pip, "download", "--quiet", "--only-binary=:all:", *tags, "-d", here, wheel],
            timeout=300)
        versions = {"here": wheel.name.split("-")[1], "next": next_version}
        run([*pip, "wheel", "--quiet", "--no-deps", "-w", nxt, next_src], timeout=300)
        (build / "versions.json").write_text(json.dumps(versions))
        os.replace(build, house)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def next_release(src: Path) -> str:
    """Make the source tree at `src` the next release: protocol minor one
    higher, release the next compatible one. Returns that release."""
    minor = bump(src / "hived" / "protocol" / "wire.py", r"^PROTOCOL_MINOR = (\d+)$",
                 lambda m: f"PROTOCOL_MINOR = {int(m[1]) + 1}")
    version = bump(src / "hived" / "__init__.py", r'^__version__ = "(\d+)\.(\d+)\.(\d+)"$',
                   lambda m: f'__version__ = "{compatible_release(int(m[1]), int(m[2]), int(m[3]))}"')
    assert minor and version
    return version.split('"')[1]


def compatible_release(major: int, minor: int, patch: int) -> str:
    """The next release that works with this one: control.version_problem
    holds releases of another major apart, and while 0.x of another minor."""
    return f"0.{minor}.{patch + 1}" if major == 0 else f"{major}.{minor + 1}.0"


def bump(path: Path, pattern: str, new: Callable[[re.Match[str]], str]) -> str:
    text = path.read_text()
    found = list(re.finditer(pattern, text, re.M))
    assert len(found) == 1, f"{path}: expected one line matching {pattern!r}, found {len(found)}"
    line = new(found[0])
    path.write_text(text[: found[0].start()] + line + text[found[0].end() :])
    return line


def sweep_stale_runs() -> None:
    """Delete run copies whose test process died and whose containers are gone."""
    busy = set()
    for p in psutil.process_iter(["cmdline"]):
        busy.update(a for a in p.info["cmdline"] or () if a.startswith(str(RUNS / "hived-nspawn-")))
    for run_dir in RUNS.glob("hived-nspawn-*"):
        try:
            owner = int((run_dir / "owner").read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(owner) and not any(b.startswith(str(run_dir)) for b in busy):
            shutil.rmtree(run_dir, ignore_errors=True)
    # A container's cgroup is named after its test host's namespace, which
    # the TestNet sweep has removed when the run that made it is gone.
    for parent in {d.parent for d in cgroup_dirs("any")}:
        with contextlib.suppress(OSError):
            remove_cgroups([
                parent / name for name in os.listdir(parent)
                if re.fullmatch(r"hvt[0-9a-z]{7}-node\d", name)
                and not os.path.exists(f"/run/netns/{name}")
            ])


def cgroup_dirs(name: str) -> list[Path]:
    """A cgroup `name` under this process's own, in each hierarchy that
    systemd-nspawn puts a container in: the unified one, and name=systemd on
    a host with the hybrid hierarchy.

    systemd-nspawn --keep-unit --register=no runs a container in the cgroup
    it is started in; without one each, the three containers' systemds
    would share one tree (/system.slice/hived.service holding every node's
    daemon), and each would try to kill the others' processes."""
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0":
            base = CGROUPS / "unified" if (CGROUPS / "unified").is_dir() else CGROUPS
        elif controllers == "name=systemd":
            base = CGROUPS / "systemd"
        else:
            continue
        dirs.append(base / path.lstrip("/") / name)
    return dirs


def remove_cgroups(dirs: Sequence[Path]) -> None:
    """rmdir each cgroup tree bottom-up; one with a process left stays (EBUSY)."""
    for top in dirs:
        if top.is_dir():
            for here, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(here)


def example_config(name: str, hosts: dict[str, Host]) -> str:
    """examples/cluster/<name>.toml with the test hosts' addresses for the
    documentation range's, as the file says to do."""
    text = (EXAMPLE / f"{name}.toml").read_text()
    for node, doc in DOC_ADDRESSES.items():
        text = text.replace(f"{doc}:", f"{hosts[node].addr}:").replace(f"({doc})", f"({hosts[node].addr})")
    assert "192.0.2." not in text.replace("192.0.2.0/24", ""), text
    return text


# -- the containers --------------------------------------------------------------


class Node:
    """A booted container on a test host: run commands in it as root or as a user."""

    def __init__(self, name: str, host: Host, run_dir: Path, nsenter: str) -> None:
        self.name, self.host, self.nsenter = name, host, nsenter
        self.root = run_dir / name
        self.console = run_dir / f"{name}.console"
        self.proc: subprocess.Popen | None = None
        self.pid = 0  # the container's systemd, once booted
        self.cgroups = cgroup_dirs(host.ns)

    @property
    def mesh(self) -> str:
        return f"tcp://{self.host.addr}:{PORT}"

    def argv(self, script: str, user: str | None) -> list[str]:
        """`sh -c script` in the container, as `user`, with a clean environment."""
        home = f"/home/{user}" if user and user != "root" else "/root"
        argv = [self.nsenter, "-t", str(self.pid), "-a", "env", "-i"]
        argv += [f"PATH={CONTAINER_PATH}", f"HOME={home}", "LANG=C.UTF-8",
                 "PIP_DISABLE_PIP_VERSION_CHECK=1"]
        if user:
            argv += ["runuser", "-u", user, "--"]
        return [*argv, "sh", "-c", script]

    def sh(
        self, script: str, user: str | None = None, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(script, user)
        if check:
            try:
                return run(argv, timeout)
            except AssertionError as exc:
                raise AssertionError(f"on {self.name}: {exc}") from None
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def popen(self, script: str, user: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(script, user), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show hived {' '.join('-p ' + p for p in props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, since: float | None = None) -> str:
        """The unit's journal; from `since` on (time.monotonic() here: the
        containers share this kernel's monotonic clock, which the journal
        stamps each entry with) if given."""
        text = self.sh("journalctl -u hived --no-pager -o short-monotonic").stdout
        if since is None:
            return text
        kept, keep = [], False
        for line in text.splitlines(keepends=True):
            stamp = re.match(r"\[\s*(\d+\.\d+)\]", line)
            if stamp:  # else the next line of a message of several
                keep = float(stamp[1]) >= since
            if keep:
                kept.append(line)
        return "".join(kept)

    def logged(self, since: float, *lines: str, timeout: float = 30) -> str:
        """The journal from `since` on, once it holds every one of `lines`."""
        found = ""

        def holds() -> bool:
            nonlocal found
            found = self.journal(since)
            return all(line in found for line in lines)

        waited(holds, timeout, f"{self.name}'s journal to say {lines}", lambda: found)
        return found

    def active(self) -> dict[str, str] | None:
        """The unit's state once it is active with a main process, else None."""
        state = self.show("ActiveState", "SubState", "MainPID", "NRestarts")
        return state if state["ActiveState"] == "active" and state["MainPID"] != "0" else None

    def restarted(self, before: dict[str, str]) -> dict[str, str] | None:
        """The unit's state once systemd has restarted it since `before`
        (an `active()` state), with a new main process; else None."""
        now = self.active()
        if now and now["MainPID"] != before["MainPID"] and int(now["NRestarts"]) > int(
            before["NRestarts"]
        ):
            return now
        return None

    def status(self, user: str = "root") -> dict:
        return json.loads(self.sh("hivectl status --json", user=user, timeout=30).stdout)

    def write(self, path: str, text: str) -> None:
        """A file an operator copies over (scp), mode 0644: written from the host."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o644)

    def boot(self, nspawn: str, tarball: Path) -> None:
        self.root.mkdir()
        run([*TAR, "-C", self.root, "-xpf", tarball], timeout=120)
        (self.root / "etc" / "hostname").write_text(f"{self.name}\n")
        for cgroup in self.cgroups:
            cgroup.mkdir()
        join = "".join(f"echo $$ > {cgroup}/cgroup.procs && " for cgroup in self.cgroups)
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(
                ["sh", "-c", f'{join}exec "$@"', "sh",
                 nspawn, "--register=no", "--keep-unit", "--quiet", "--console=read-only",
                 f"--machine={self.host.ns}", f"--network-namespace-path={self.host.ns_path}",
                 "-D", str(self.root), "-b"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True,
                # cgroup v2 inside, as on current distributions, even on a host
                # with the hybrid hierarchy: there systemd cannot kill a unit's
                # whole cgroup ("Failed to kill control group ...: Input/output
                # error"), and `systemctl kill` fails.
                env=dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1"),
            )

        def booted_pid() -> int | None:
            assert self.proc.poll() is None, (
                f"systemd-nspawn exited {self.proc.returncode}:\n{self.console_log()}"
            )
            kids = psutil.Process(self.proc.pid).children()
            return next((k.pid for k in kids if k.name() == "systemd"), None)

        self.pid = wait_for(booted_pid, 30, interval=0.1, what=f"{self.name}'s systemd")

        def running() -> bool:
            state = self.sh("systemctl is-system-running", check=False, timeout=10).stdout.strip()
            return state in ("running", "degraded")

        waited(running, 90, f"{self.name} to boot", self.console_log)
        failed = self.sh("systemctl --failed --plain --no-legend", timeout=10).stdout.strip()
        assert not failed, f"units failed to start in {self.name}:\n{failed}"
        self.sh("useradd --create-home alice")  # a person who submits jobs

    def console_log(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def keep_evidence(self, where: Path) -> None:
        """The container's whole journal and the unit's state, into `where`."""
        if self.pid == 0 or self.proc is None or self.proc.poll() is not None:
            shutil.copyfile(self.console, where / f"{self.name}.console")
            return
        for suffix, command in (
            ("journal", "journalctl -b --no-pager -o short-monotonic"),
            ("status", "systemctl status hived --no-pager -l; hivectl status; hivectl doctor"),
        ):
            out = self.sh(command, check=False, timeout=60)
            (where / f"{self.name}.{suffix}").write_text(out.stdout + out.stderr)

    def power_off(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.pid:
            subprocess.run([self.nsenter, "-t", str(self.pid), "-a", "systemctl", "poweroff"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
            try:
                self.proc.wait(60)
                return
            except subprocess.TimeoutExpired:
                # Killing the container's PID 1 ends its whole PID namespace.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def remove(self) -> None:
        """What booting made on the host, once powered off."""
        self.power_off()
        remove_cgroups(self.cgroups)


class Cluster:
    """The three nodes of examples/cluster/, booted and installed."""

    def __init__(self, nodes: list[Node], wheels: Wheels) -> None:
        self.nodes, self.wheels = nodes, wheels
        self.by_name = {n.name: n for n in nodes}
        # What `--check-config` and `systemctl status hived` printed at the install.
        self.check_config: list[str] = []
        self.unit_status: list[str] = []

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def journals(self, lines: int = 60) -> str:
        return "\n".join(
            f"--- {n.name}: journalctl -u hived (last {lines} lines)\n"
            + "\n".join(n.journal().splitlines()[-lines:])
            for n in self.nodes
        )

    def agreed(self, version: str | None = None) -> dict | None:
        """Every node active, each seeing all three alive, one coordinator
        for all, no seed unreachable or refusing (and every node running
        `version`, if given); the first node's status then, else None."""
        answers = []
        for node in self.nodes:
            if node.active() is None:
                return None
            try:
                answers.append(node.status())
            except (AssertionError, ValueError):
                return None
        names = sorted(self.by_name)
        for body in answers:
            alive = sorted(r["name"] for r in body["nodes"] if r["state"] == "alive")
            if alive != names or body["coordinator"] is None or body.get("seeds") is None:
                return None
            if any(s["state"] != "member" for s in body["seeds"]):
                return None
            if version and {r["version"] for r in body["nodes"]} != {version}:
                return None
        if len({b["coordinator"]["name"] for b in answers}) != 1:
            return None
        return answers[0]

    def settled(self, timeout: float = 60, version: str | None = None) -> dict:
        found: dict = {}

        def agreed() -> bool:
            body = self.agreed(version)
            found.update(body or {})
            return body is not None

        waited(agreed, timeout, "all three nodes to agree on the hive", self.journals)
        return found

    def coordinator(self) -> tuple[Node, int]:
        body = self.settled()
        return self[body["coordinator"]["name"]], body["coordinator"]["term"]

    def ready(self) -> dict:
        """Every node started (a test before may have failed with one
        stopped), then settled."""
        for node in self.nodes:
            if node.show("ActiveState")["ActiveState"] != "active":
                node.sh("systemctl start hived", check=False, timeout=60)
        return self.settled()


def waited(
    predicate: Callable[[], object], timeout: float, what: str, detail: Callable[[], str]
) -> None:
    """wait_for, and on timeout what `detail` says then (a log, a journal)."""
    try:
        wait_for(predicate, timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{detail()}") from None


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    found = tools()
    require_netns()
    failures_before = request.session.testsfailed
    with step("root file system"):
        tarball = rootfs(found["debootstrap"])
    net = TestNet(len(NODES), names=NODES)  # sweeps what crashed runs left first
    sweep_stale_runs()
    run_dir = Path(tempfile.mkdtemp(prefix="hived-nspawn-", dir=RUNS))
    (run_dir / "owner").write_text(str(os.getpid()))
    nodes = [Node(name, net[name], run_dir, found["nsenter"]) for name in NODES]
    set_up = False
    try:
        with step("boot three containers, wheelhouse alongside"):
            with ThreadPoolExecutor(max_workers=1) as builder:
                wheels_built = builder.submit(boot_and_build, nodes[0], found, tarball)
                each(lambda n: n.boot(found["systemd-nspawn"], tarball), nodes[1:])
                wheels = wheels_built.result()
        c = Cluster(nodes, wheels)
        install(c, net)
        set_up = True
        yield c
    finally:
        if not set_up or request.session.testsfailed > failures_before:
            keep_evidence(request, nodes)
        with step("power off"):
            each(Node.remove, nodes)
            net.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        print_steps()


def boot_and_build(node: Node, found: dict[str, str], tarball: Path) -> Wheels:
    """Boot `node` and make the wheelhouse for what its root file system holds."""
    node.boot(found["systemd-nspawn"], tarball)
    return wheelhouse(container_target(node.root))


def install(c: Cluster, net: TestNet) -> None:
    """examples/cluster/README.md, steps 1 to 4, on the three machines."""
    hosts = {h.name: h for h in net}
    first, others = c.nodes[0], c.nodes[1:]

    def copy_files(n: Node) -> None:  # what the operator copies to each machine
        shutil.copytree(c.wheels.here, n.root / "root" / "wheels")
        n.write(f"/root/{n.name}.toml", example_config(n.name, hosts))
        shutil.copytree(Path(REPO) / "systemd", n.root / "root" / "systemd")
        n.write(MAP_UNTIL_PATH, MAP_UNTIL)
        n.write(SLOW_TASK_PATH, SLOW_TASK)

    with step("1. the package, the user, the directories (each machine)"):
        each(lambda n: (copy_files(n), n.sh(script("package"), timeout=180)), c.nodes)
    with step("2. the cluster key: made on node1, copied to the others"):
        first.sh(script("keygen"))
        for n in others:
            shutil.copy2(first.root / "etc/hived/cluster.key", n.root / "etc/hived/cluster.key")
            n.sh(script("key copied"))
    with step("3, 4. config, --check-config, enable --now (each machine)"):
        c.check_config = each(lambda n: n.sh(script("config", n.name)).stdout, c.nodes)
        c.unit_status = each(lambda n: n.sh(script("unit", n.name)).stdout, c.nodes)
    with step("5. the three agree"):
        c.settled(90)


def keep_evidence(request: pytest.FixtureRequest, nodes: Sequence[Node]) -> None:
    where = EVIDENCE / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    where.mkdir(parents=True, exist_ok=True)
    for old in sorted(EVIDENCE.iterdir())[:-EVIDENCE_KEPT]:  # names sort by time
        shutil.rmtree(old, ignore_errors=True)
    for node in nodes:
        with contextlib.suppress(Exception):  # keep what can be kept
            node.keep_evidence(where)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    line = f"systemd-real: every container's journal is kept in {where}"
    if reporter is not None:
        reporter.write_line(f"\n{line}")
    print(line, file=sys.stderr, flush=True)


def print_steps() -> None:
    rows = [f"  {took:6.1f} s  {what}" for what, took in STEPS]
    total = sum(took for _, took in STEPS)
    print("\n[systemd] steps:\n" + "\n".join(rows) + f"\n  {total:6.1f} s  in all", flush=True)


@pytest.fixture(autouse=True)
def no_leaked_children(request: pytest.FixtureRequest) -> Iterator[None]:
    """conftest's leak check, minus the containers: their processes are theirs.

    systemd in each container is a descendant of this process, so every
    daemon it starts would count as leaked; the cluster's teardown powers
    them off.
    """
    if "cluster" not in request.fixturenames:
        yield
        return
    c: Cluster = request.getfixturevalue("cluster")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leaked() -> list[psutil.Process]:
        inside: set[int] = set()
        for node in c.nodes:
            with contextlib.suppress(psutil.NoSuchProcess):
                pid1 = psutil.Process(node.pid)
                inside |= {pid1.pid} | {p.pid for p in pid1.children(recursive=True)}
        return [p for p in me.children(recursive=True)
                if p.pid not in before and p.pid not in inside and _alive(p)]

    wait_for(lambda: not leaked(), 10, what="child processes outside the containers to exit")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class MapRun:
    """MAP_UNTIL on a node, as alice, read as its results come."""

    def __init__(self, node: Node, seconds: float = 0.05) -> None:
        self.node, self.flag = node, f"/home/alice/stop-{time.monotonic_ns()}"
        self.lines: list[str] = []
        self.proc = node.popen(f"/opt/hived/bin/python3 {MAP_UNTIL_PATH} {self.flag} {seconds}",
                               user="alice")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def rows(self) -> list[list]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("[")]

    def by_node(self) -> Counter[str]:
        return Counter(row[2] for row in self.rows())

    def more(self, n: int, timeout: float, what: str, detail: Callable[[], str],
             on: str | None = None) -> None:
        """Until `n` more results have come (run on node `on`, if given)."""
        def count() -> int:
            return self.by_node()[on] if on else len(self.rows())

        start = count()

        def grew() -> bool:
            assert self.proc.poll() is None or self.reader.is_alive(), self.output()
            return count() >= start + n

        waited(grew, timeout, what, lambda: f"{self.output()}\n{detail()}")

    def output(self) -> str:
        return "client output (last 20 lines):\n" + "\n".join(self.lines[-20:])

    def finish(self, timeout: float = 60) -> list[list]:
        """Stop feeding the map; every result right and exactly once, in order."""
        self.node.sh(f"touch {self.flag}", user="alice")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the map did not end in {timeout} s\n{self.output()}") from None
        self.reader.join(10)
        assert self.proc.returncode == 0 and self.lines[-1:] == ["done"], self.output()
        rows = self.rows()
        assert [r[0] for r in rows] == list(range(len(rows))), self.output()
        wrong = [r for r in rows if r[1] != r[0] * r[0]]
        assert not wrong, f"results out of place (a lost or repeated one): {wrong[:5]}"
        return rows

    def close(self) -> None:
        if self.proc.poll() is None:
            self.node.sh(f"touch {self.flag}", user="alice", check=False)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)


@contextlib.contextmanager
def kill_on_exit(proc: subprocess.Popen) -> Iterator[None]:
    """A client in a container killed on the way out if it still runs (a
    failed wait leaves none behind)."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mapping(node: Node, seconds: float = 0.05) -> Iterator[MapRun]:
    m = MapRun(node, seconds)
    try:
        yield m
    finally:
        m.close()


# -- the tests -----------------------------------------------------------------


def test_the_walkthrough_says_what_this_test_does() -> None:
    """Every command this module runs as the walk-through is in its README,
    word for word; the three example files differ only in name and advertise."""
    readme = (EXAMPLE / "README.md").read_text()
    missing = [
        line
        for name in WALKTHROUGH
        for line in textwrap.dedent(WALKTHROUGH[name]).splitlines()
        if line.strip() and line not in readme
    ]
    assert not missing, f"commands the test runs that examples/cluster/README.md lacks: {missing}"
    assert JOB_PY in readme
    texts = {name: (EXAMPLE / f"{name}.toml").read_text().splitlines() for name in NODES}
    for name in NODES[1:]:
        changed = [a.split("=")[0].strip()
                   for a, b in zip(texts["node1"], texts[name], strict=True) if a != b]
        assert {k for k in changed if not k.startswith("#")} == {"name", "advertise"}, changed


def test_installed_as_the_walkthrough_says(cluster: Cluster) -> None:
    """Steps 3 to 5 on each machine: the config checks, the unit runs
    sandboxed as hived, status and doctor say all is well."""
    for node, out in zip(cluster.nodes, cluster.check_config, strict=True):
        assert f'name = "{node.name}"' in out and "key_file" in out, out
    for out in cluster.unit_status:
        assert "active (running)" in out and "Status:" in out, out

    def look(node: Node) -> None:
        state = node.active()
        assert state is not None
        shown = node.show("Type", "User", "WatchdogUSec", "UnitFileState")
        assert shown["Type"] == "notify" and shown["UnitFileState"] == "enabled", shown
        assert shown["User"] == "hived" and shown["WatchdogUSec"] == "10s", shown

        def status_line() -> bool:  # sent every few seconds
            text = node.show("StatusText")["StatusText"]
            return bool(re.match(r"(coordinator|member); 2 peers; 0/\d+ slots busy$", text))

        waited(status_line, 15, "the STATUS= line to show two peers", lambda: str(node.show("StatusText")))
        # The sandbox holds in the main process (and so in the workers it spawns).
        proc_status = node.sh(f"cat /proc/{state['MainPID']}/status").stdout
        fields = dict(re.findall(r"^(\w+):\s+(.*)$", proc_status, re.M))
        assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
        assert fields["Uid"].split()[0] == node.sh("id -u hived").stdout.strip()
        # systemd accepted every setting of the unit here: it logs "hived.service:LINE: ..."
        # for a setting it ignores, and names what it could not set up.
        boot = node.sh("journalctl -b --no-pager -o cat").stdout
        complaints = [
            line for line in boot.splitlines()
            if re.search(r"hived\.service(\.d/\S+)?:\d+: ", line)
            or re.search(r"hived\.service: .*(not supported|ignoring|failed to set up)", line, re.I)
        ]
        assert not complaints, "\n".join(complaints)
        for user in ("root", "alice"):
            out = node.sh("hivectl status", user=user).stdout
            assert re.search(r"^coordinator: node\d \(term \d+\)$", out, re.M), out
            rows = {line.split()[0]: line for line in out.splitlines()[2:]}
            assert sorted(rows) == list(NODES) and all(" alive " in r for r in rows.values()), out
        body = node.status()
        mine = next(r for r in body["nodes"] if r["name"] == node.name)
        assert mine["address"] == node.mesh, mine
        assert [s["state"] for s in body["seeds"]] == ["member"] * 2, body["seeds"]
        doctor = node.sh("hivectl doctor", check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        lines = doctor.stdout.splitlines()
        assert lines and all(line.startswith("ok    ") for line in lines), doctor.stdout
        assert "ok    key file /etc/hived/cluster.key is mode 0640, owned by root:hived" in lines
        assert f"ok    all 3 node(s) run hived {cluster.wheels.version}" in lines, lines
        assert all(f"ok    seed {n.mesh} accepts connections" in lines for n in cluster.nodes)

    with step("status, doctor and the sandbox on each"):
        each(look, cluster.nodes)


def test_control_socket_for_group_members_only(cluster: Cluster) -> None:
    # RuntimeDirectoryMode=0750: someone outside group hived cannot reach the
    # daemon, and is told why and what to do, by hivectl and by connect().
    node = cluster["node2"]
    told = ("permission denied: the control socket ipc:///run/hived/hived.sock is there, but "
            "/run/hived (owner hived, group hived, mode 0750) lets in only hived and group "
            "hived, and user nobody is not in it; add the user to the group (`usermod -aG hived "
            "nobody`, as root) and log in again")
    with step("a user outside group hived"):
        out = node.sh("hivectl status", user="nobody", check=False)
        assert (out.returncode, out.stderr) == (1, f"hivectl: {told}\n"), out
        out = node.sh("/opt/hived/bin/python3 -c 'import hived; hived.connect()'", user="nobody",
                      check=False)
    assert out.returncode == 1 and out.stderr.endswith(f"HivePermissionError: {told}\n"), out


def test_a_map_across_all_three(cluster: Cluster) -> None:
    """The README's job.py, then a map from node1 that every node works on,
    in the service's workers, as hived; every result exactly once."""
    node1 = cluster["node1"]
    cluster.ready()
    with step("job.py from the README"):
        node1.write("/home/alice/job.py", JOB_PY)
        out = node1.sh("cd /home/alice && /opt/hived/bin/python3 job.py", user="alice", timeout=120)
        assert out.stdout == f"{sum(x**2 for x in range(1000))}\n", out
    with step("a map that all three work on"), mapping(node1) as m:
        m.more(10, 60, "results from node2", cluster.journals, on="node2")
        m.more(10, 60, "results from node3", cluster.journals, on="node3")
        rows = m.finish()
    assert set(m.by_node()) == set(NODES), m.by_node()
    for node in cluster.nodes:  # each result came from a worker of that node's service
        pids = " ".join(sorted({str(r[3]) for r in rows if r[2] == node.name}))
        out = node.sh(f"for p in {pids}; do stat -c %U /proc/$p; "
                      "grep -m1 -o 'hived.service' /proc/$p/cgroup; done").stdout
        assert out.split() == ["hived", "hived.service"] * len(pids.split()), out


def test_stop_of_a_node_mid_map_drains_it(cluster: Cluster) -> None:
    """`systemctl stop` of a member under a map from another node and a task
    of its own client: the task runs to its end and its result comes, the
    journal shows the drain, the map goes on, every result exactly once."""
    cluster.ready()
    coordinator, _ = cluster.coordinator()
    client, stopped = [n for n in cluster.nodes if n is not coordinator]
    with mapping(client, seconds=0.2) as m, stopped.popen(
        f"/opt/hived/bin/python3 {SLOW_TASK_PATH}", user="alice"
    ) as own, kill_on_exit(own):
        m.more(3, 60, f"results from {stopped.name}", cluster.journals, on=stopped.name)

        def slow_task_running() -> bool:
            body = json.loads(stopped.sh("hivectl jobs --json").stdout)
            return any("slow_task" in j["function"] and j["running"] == 1 for j in body["jobs"])

        waited(slow_task_running, 30, "the slow task to run", cluster.journals)
        mark, asked = time.monotonic(), time.time()
        with step(f"systemctl stop on {stopped.name} mid-map"):
            stopped.sh("systemctl stop hived", timeout=60)
        out, _ = own.communicate(timeout=30)
        assert own.returncode == 0 and out.startswith("result 42 "), out
        assert float(out.split()[2]) > asked, out  # it ran on into the stop, to its end
        shown = stopped.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                         "ExecMainStatus": "0"}, shown
        journal = stopped.logged(mark, "Stopping hived.service", "SIGTERM: draining",
                                 "hived stopped", "Stopped hived.service")
        assert "SIGKILL" not in journal, journal
        m.more(20, 60, "the map to go on without it", cluster.journals)
        with step(f"systemctl start on {stopped.name}, back in the hive"):
            stopped.sh("systemctl start hived", timeout=60)
            cluster.settled()
        rows = m.finish()
    assert {r[2] for r in rows} == set(NODES), Counter(r[2] for r in rows)


def test_sigkill_of_the_coordinator_mid_map(cluster: Cluster) -> None:
    """SIGKILL of the coordinator's whole unit under a map from a member: a
    new term, systemd restarts it, every result exactly once."""
    cluster.ready()
    killed, term = cluster.coordinator()
    client = next(n for n in cluster.nodes if n is not killed)
    before = killed.active()
    assert before is not None
    with mapping(client, seconds=0.2) as m:
        m.more(3, 60, f"results from {killed.name}", cluster.journals, on=killed.name)
        with step(f"systemctl kill -s KILL on the coordinator {killed.name}, a new term"):
            mark = time.monotonic()
            killed.sh("systemctl kill -s KILL hived")

            def new_term() -> dict | None:
                body = client.status()
                lead = body["coordinator"]
                return lead if lead and lead["term"] > term else None

            waited(new_term, 30, "a new coordinator's term", cluster.journals)
            lead = client.status()["coordinator"]

        waited(lambda: killed.restarted(before), 30, "systemd to restart the killed daemon", cluster.journals)
        killed.logged(mark, "hived.service: Main process exited, code=killed, status=9/KILL")
        with step(f"{killed.name} back in the hive"):
            cluster.settled()
        m.more(20, 60, "the map to go on", cluster.journals)
        rows = m.finish()
    assert len(rows) >= 26
    print(f"[systemd] coordinator after the kill: {lead}")


def test_reload_applies_a_good_file_and_refuses_a_broken_one(cluster: Cluster) -> None:
    cluster.ready()
    node = cluster["node2"]
    before = node.active()
    assert before is not None
    cpus = next(r for r in node.status()["nodes"] if r["name"] == node.name)["cpus"]
    edit = ("sed -i 's/^drain_timeout = {}$/drain_timeout = {}/; "
            "s/^cpus = {}$/cpus = {}/' /etc/hived/hived.toml")
    node.sh("cp -p /etc/hived/hived.toml /etc/hived/hived.toml.good")
    try:
        with step("systemctl reload, a good file"):
            node.sh(edit.format("30.0", "40.0", '"auto"', "1"))
            mark = time.monotonic()
            node.sh("systemctl reload hived", timeout=30)
            node.logged(mark, "applied timing.drain_timeout = 40.0",
                        "pool.cpus changed but only take effect on a restart")
            after = node.active()
            assert after is not None and after["MainPID"] == before["MainPID"]  # serving on
            mine = next(r for r in node.status()["nodes"] if r["name"] == node.name)
            assert mine["cpus"] == cpus
        with step("systemctl reload, a broken file"):
            node.sh("cp -p /etc/hived/hived.toml.good /etc/hived/hived.toml && "
                    "sed -i 's/^drain_timeout = 30.0$/drain_timeout = -1.0/' /etc/hived/hived.toml")
            mark = time.monotonic()
            out = node.sh("systemctl reload hived", check=False, timeout=30)
            assert out.returncode != 0 and "Job for hived.service failed" in out.stderr, out
            journal = node.logged(
                mark, "hived: /etc/hived/hived.toml: timing.drain_timeout: expected a number "
                "of seconds > 0, got -1.0", "Reload failed for hived.service")
            assert "SIGHUP" not in journal, journal  # the daemon was never signalled
            after = node.active()
            assert after is not None and after["MainPID"] == before["MainPID"]
            cluster.settled()  # and serves on, in the hive
    finally:
        node.sh("mv /etc/hived/hived.toml.good /etc/hived/hived.toml")
    node.sh("systemctl reload hived")


def test_a_node_with_another_key_is_flagged(cluster: Cluster) -> None:
    """node3 gets a key of its own (`hivectl keygen --force`, a restart):
    the others' status names it refusing and why, their doctor FAILs it,
    and its own STATUS= line says both its seeds refuse it."""
    cluster.ready()
    wrong = cluster["node3"]
    others = [n for n in cluster.nodes if n is not wrong]
    try:
        flag_wrong_key(cluster, wrong, others)
    finally:
        with step("node3 given the cluster's key again"):
            shutil.copy2(cluster["node1"].root / "etc/hived/cluster.key",
                         wrong.root / "etc/hived/cluster.key")
            wrong.sh(script("key copied") + "systemctl restart hived\n")
    cluster.settled()


def flag_wrong_key(cluster: Cluster, wrong: Node, others: list[Node]) -> None:
    with step("node3 restarted with another key"):
        wrong.sh(script("rekey") + script("key copied") + "systemctl restart hived\n")

        def flagged(node: Node) -> str | None:
            out = node.sh("hivectl status").stdout
            return out if f"seed {wrong.mesh} is refusing: " in out else None

        for node in others:
            waited(lambda n=node: flagged(n), 30, f"{node.name} to see node3 refusing",
                   cluster.journals)
    for node in others:
        out = node.sh("hivectl status").stdout
        assert "CURVE" in out.split(f"seed {wrong.mesh} is refusing: ")[1], out
        doctor = node.sh("hivectl doctor", check=False)
        assert doctor.returncode != 0, doctor.stdout
        assert re.search(rf"^FAIL  the daemon's seed {re.escape(wrong.mesh)} is refusing: ",
                         doctor.stdout, re.M), doctor.stdout

    def cut_off() -> str | None:
        text = wrong.show("StatusText")["StatusText"]
        refusing = [f"seed {n.mesh} refusing: " in text for n in others]
        return text if all(refusing) and "; 0 peers;" in text else None

    waited(cut_off, 30, "node3's STATUS= line to say it is cut off", cluster.journals)
    print(f"[systemd] node3's STATUS=: {cut_off()}")


def test_watchdog_restarts_a_frozen_daemon(cluster: Cluster) -> None:
    cluster.ready()
    node = cluster["node3"]
    try:
        watchdog_restart(node)
    finally:
        node.sh("rm -f /etc/systemd/system/hived.service.d/watchdog.conf && "
                "systemctl daemon-reload")
    cluster.settled()


def watchdog_restart(node: Node) -> None:
    with step("the watchdog restarts a frozen daemon"):
        node.sh(
            "mkdir -p /etc/systemd/system/hived.service.d && "
            "printf '[Service]\\nWatchdogSec=3s\\n' > /etc/systemd/system/hived.service.d/watchdog.conf && "
            "systemctl daemon-reload && systemctl restart hived"
        )
        before = wait_for(node.active, 30, interval=0.2, what="hived.service to be active")
        assert node.show("WatchdogUSec")["WatchdogUSec"] == "3s"
        mark = time.monotonic()
        node.sh(f"kill -STOP {before['MainPID']}")

        waited(lambda: node.restarted(before), 45, "the watchdog to restart hived", lambda: node.journal()[-3000:])
        node.logged(mark, "Watchdog timeout", "Failed with result 'watchdog'")


def test_rolling_upgrade_across_two_protocol_minors_under_a_map(cluster: Cluster) -> None:
    """The next release (protocol minor one higher) installed one machine at
    a time while a map from node1 runs, node1 last: mixed releases and
    protocols in one hive meanwhile, which doctor calls a rolling upgrade;
    every result exactly once; then all three on the new release."""
    old, new = cluster.wheels.version, cluster.wheels.next_version
    protocol = f"{wire.PROTOCOL_MAJOR}.{wire.PROTOCOL_MINOR}"
    newer = f"{wire.PROTOCOL_MAJOR}.{wire.PROTOCOL_MINOR + 1}"
    cluster.ready()
    cluster.settled(version=old)
    node1 = cluster["node1"]
    order = [cluster["node2"], cluster["node3"], node1]  # the client's own node last
    for node in cluster.nodes:  # the operator copies the new wheel over
        for wheel in cluster.wheels.next.glob("*.whl"):
            shutil.copy2(wheel, node.root / "root" / "wheels" / wheel.name)
    with mapping(node1, seconds=0.1) as m:
        m.more(10, 60, "the map to run", cluster.journals)
        for k, node in enumerate(order):
            with step(f"upgrade {node.name} to {new} under the map"):
                node.sh(script("upgrade"), timeout=180)
                wait_for(node.active, 30, interval=0.2, what=f"{node.name} active again")

                def rejoined(n: Node = node) -> bool:
                    body = cluster.agreed()
                    return body is not None and {
                        r["name"]: r["version"] for r in n.status()["nodes"]
                    }[n.name] == new

                waited(rejoined, 60, f"{node.name} on {new} back in the hive", cluster.journals)
            if k == 0:  # one node upgraded: node1, still of the old release, sees the mix
                rows = {r["name"]: (r["version"], r.get("protocol")) for r in node1.status()["nodes"]}
                assert rows == {"node1": (old, protocol), "node2": (new, newer),
                                "node3": (old, protocol)}, rows
                out = node1.sh("hivectl status").stdout
                assert re.search(rf"^node2 .* {re.escape(new)} ", out, re.M), out
                doctor = node1.sh("hivectl doctor").stdout  # warnings only: exits 0
                assert (f"ok    a rolling upgrade in progress: protocol {protocol} on node1, "
                        f"node3; {newer} on node2") in doctor, doctor
                assert f"warn  node node2 runs hived {new}, this hivectl is {old}" in doctor, doctor
            m.more(10, 60, f"the map to go on after {node.name}'s upgrade", cluster.journals)
        rows = m.finish()
    assert len(rows) >= 40
    # node1's own restart: the client, of the old release, went on with the new daemon
    moved = [line for line in m.lines if "now on hived node1 at ipc:///run/hived/hived.sock" in line]
    assert moved, m.output()
    print(f"[systemd] the client at node1's restart: {moved[0]}")
    body = cluster.settled(version=new)
    assert {r["protocol"] for r in body["nodes"]} == {newer}, body["nodes"]
