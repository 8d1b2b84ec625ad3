"""systemd/hived.service under a real systemd, installed the way an operator would.

A Debian root file system boots with systemd as PID 1 in a container on this
machine; hived is installed into it from this checkout and the unit, as
shipped, is enabled. The tests then look at it from the outside, as an
operator would:

    host (pytest, root)                       container (systemd-nspawn -b)
      debootstrap ──▶ /var/cache/hived-test/debian-…tar   (built once, reused)
      tar -x ──▶ /var/tmp/hived-nspawn-XXXX  ──▶  systemd (PID 1)
      nsenter -t <PID 1> -a …  ──────────────────▶  systemctl, journalctl,
                                                    hivectl, python, runuser
                                                      └─ hived.service (User=hived)
                                                           └─ worker processes

The container shares the host's network (pip inside reaches the package
index) but nothing else: its processes, mounts, users and systemd are its
own. Each run boots a fresh copy of the cached root file system and deletes
it afterwards.

Needs root and Linux; installs debootstrap and systemd-container with
apt-get when they are missing. Skipped without them outside CI, failed in CI.
About two minutes with a cold cache (debootstrap), under one warm.
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
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from conftest import REPO
from netns import wait_for

CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
SUITE = "bookworm"
INCLUDE = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "python3-pip")
CACHE = Path("/var/cache/hived-test")
RUNS = Path("/var/tmp")
# tool -> the Debian package that has it
TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": "util-linux",
}
TAR = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Left out of the copy of this checkout that is installed in the container.
NOT_COPIED = (
    ".git",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    ".benchmarks",
    "build",
    "dist",
    ".venv",
    ".whl",
)

# The container shares the host's network, so the mesh port is one found free here.
CONFIG = """\
[node]
name = "box"
bind = "tcp://127.0.0.1:{port}"
control = "ipc:///run/hived/hived.sock"

[pool]
cpus = 2
gpus = 0

[timing]
heartbeat = 0.2
dead_after = 1.0
lease = 0.8
drain_timeout = 10.0

[security]
key_file = "/etc/hived/cluster.key"
"""

# The steps of examples/cluster/README.md, for one machine.
INSTALL = """\
set -eu
python3 -m venv /opt/hived
/opt/hived/bin/pip install --quiet /src
ln -sf /opt/hived/bin/hived /opt/hived/bin/hivectl /usr/local/bin/
useradd --system --home-dir /var/lib/hived --shell /usr/sbin/nologin hived
useradd --create-home --groups hived alice       # may submit jobs
install -d -m 0750 -o root -g hived /etc/hived
install -m 0640 -o root -g hived /src/.box-hived.toml /etc/hived/hived.toml
hivectl keygen /etc/hived/cluster.key
chown root:hived /etc/hived/cluster.key && chmod 0640 /etc/hived/cluster.key
install -m 0644 /src/systemd/hived.service /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now hived
"""

pytestmark = pytest.mark.timeout(600)


def unavailable(why: str) -> None:
    if CI:
        pytest.fail(f"CI=true but {why}", pytrace=False)
    pytest.skip(why)


def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
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
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
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


def sweep_stale_runs() -> None:
    """Delete run copies whose test process died and whose container is gone."""
    busy = set()
    for p in psutil.process_iter(["cmdline"]):
        busy.update(a for a in p.info["cmdline"] or () if a.startswith(str(RUNS / "hived-nspawn-")))
    for run_dir in RUNS.glob("hived-nspawn-*"):
        try:
            owner = int((run_dir / "owner").read_text())
        except (OSError, ValueError):
            continue
        if not psutil.pid_exists(owner) and str(run_dir / "root") not in busy:
            shutil.rmtree(run_dir, ignore_errors=True)


def host_ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts (it may include a site proxy's CA)."""
    for name in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        if os.environ.get(name) and os.path.isfile(os.environ[name]):
            return Path(os.environ[name])
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    return bundle if bundle.is_file() else None


def pip_environment() -> list[str]:
    """What pip in the container needs to reach the index the way the host does."""
    env = ["PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_DEFAULT_TIMEOUT=120"]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(name):
            env.append(f"{name}={os.environ[name]}")
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):  # only those reachable from inside
        urls = [
            u for u in os.environ.get(name, "").split() if u.startswith(("http://", "https://"))
        ]
        if urls:
            env.append(f"{name}={' '.join(urls)}")
    return env


# -- the container ---------------------------------------------------------------


class Box:
    """A booted container: run commands in it as root or as a user."""

    def __init__(self, nsenter: str, pid: int, port: int) -> None:
        self.nsenter, self.pid, self.port = nsenter, pid, port  # port: hived's mesh port

    def argv(self, script: str, user: str | None, env: Sequence[str] = ()) -> list[str]:
        """`sh -c script` in the container, as `user`, with a clean environment."""
        home = f"/home/{user}" if user and user != "root" else "/root"
        argv = [self.nsenter, "-t", str(self.pid), "-a", "env", "-i"]
        argv += [f"PATH={CONTAINER_PATH}", f"HOME={home}", "LANG=C.UTF-8", *env]
        if user:
            argv += ["runuser", "-u", user, "--"]
        return [*argv, "sh", "-c", script]

    def sh(
        self,
        script: str,
        user: str | None = None,
        timeout: float = 60,
        check: bool = True,
        env: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(script, user, env)
        if check:
            return run(argv, timeout)
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @contextlib.contextmanager
    def popen(self, script: str, user: str) -> Iterator[subprocess.Popen[str]]:
        """`script` running in the box as `user`, killed on the way out if it
        still runs (a failed wait or stop leaves no client behind)."""
        proc = subprocess.Popen(
            self.argv(script, user),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def show(self, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show hived {' '.join('-p ' + p for p in props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self) -> str:
        return self.sh("journalctl -u hived --no-pager -o short-monotonic").stdout

    def active(self) -> dict[str, str] | None:
        """The unit's state once it is active with a main process, else None."""
        state = self.show("ActiveState", "SubState", "MainPID", "NRestarts")
        return state if state["ActiveState"] == "active" and state["MainPID"] != "0" else None

    def status(self, user: str = "root") -> dict:
        return json.loads(self.sh("hivectl status --json", user=user, timeout=30).stdout)


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    found = tools()
    tarball = rootfs(found["debootstrap"])
    sweep_stale_runs()
    run_dir = Path(tempfile.mkdtemp(prefix="hived-nspawn-", dir=RUNS))
    (run_dir / "owner").write_text(str(os.getpid()))
    root = run_dir / "root"
    root.mkdir()
    proc: subprocess.Popen | None = None
    pid1 = None
    try:
        run([*TAR, "-C", root, "-xpf", tarball], timeout=120)
        shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(*NOT_COPIED))
        port = free_port()
        (root / "src" / ".box-hived.toml").write_text(CONFIG.format(port=port))
        ca = host_ca_bundle()
        if ca is not None:
            shutil.copyfile(ca, root / "etc" / "host-ca.crt")
        with open(run_dir / "console.log", "wb") as console:
            proc = subprocess.Popen(
                [
                    found["systemd-nspawn"],
                    "--register=no",
                    "--keep-unit",
                    "--quiet",
                    "--console=read-only",
                    f"--machine=hvt{os.getpid()}",
                    "-D",
                    str(root),
                    "-b",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def booted_pid() -> int | None:
            assert proc.poll() is None, (
                f"systemd-nspawn exited {proc.returncode}:\n{console_log(run_dir)}"
            )
            kids = psutil.Process(proc.pid).children()
            return next((k.pid for k in kids if k.name() == "systemd"), None)

        pid1 = wait_for(booted_pid, 30, interval=0.1, what="the container's systemd")
        b = Box(found["nsenter"], pid1, port)

        def running() -> bool:
            state = b.sh("systemctl is-system-running", check=False, timeout=10).stdout.strip()
            return state in ("running", "degraded")

        waited(running, 90, "the container to boot", lambda: console_log(run_dir))
        failed = b.sh("systemctl --failed --plain --no-legend", timeout=10).stdout.strip()
        assert not failed, f"units failed to start in the container:\n{failed}"
        pip_env = pip_environment()
        if ca is not None:
            pip_env.append("PIP_CERT=/etc/host-ca.crt")
        try:
            b.sh(INSTALL, env=pip_env, timeout=300)
        except AssertionError as exc:
            why = b.sh(
                "systemctl status hived --no-pager; journalctl -u hived --no-pager", check=False
            )
            raise AssertionError(f"{exc}\n{why.stdout}{why.stderr}") from None
        yield b
    finally:
        _power_off(proc, found["nsenter"], pid1)
        shutil.rmtree(run_dir, ignore_errors=True)


def _power_off(proc: subprocess.Popen | None, nsenter: str, pid1: int | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    if pid1 is not None:
        subprocess.run(
            [nsenter, "-t", str(pid1), "-a", "systemctl", "poweroff"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
        try:
            proc.wait(60)
            return
        except subprocess.TimeoutExpired:
            # Killing the container's PID 1 ends its whole PID namespace.
            try:
                os.kill(pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def waited(
    predicate: Callable[[], object], timeout: float, what: str, detail: Callable[[], str]
) -> None:
    """wait_for, and on timeout what `detail` says then (a log, a journal)."""
    try:
        wait_for(predicate, timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{detail()}") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_log(run_dir: Path) -> str:
    try:
        return (run_dir / "console.log").read_text(errors="replace")[-4000:]
    except OSError:
        return ""


@pytest.fixture(autouse=True)
def no_leaked_children(box: Box) -> Iterator[None]:
    """conftest's leak check, minus the container: its processes are the box's.

    systemd in the container is a descendant of this process, so every
    daemon it starts would count as leaked; the box's teardown powers it off.
    """
    me = psutil.Process()
    container = psutil.Process(box.pid)
    before = {p.pid for p in me.children(recursive=True)}
    yield

    def leaked() -> list[psutil.Process]:
        inside = {container.pid} | {p.pid for p in container.children(recursive=True)}
        return [
            p
            for p in me.children(recursive=True)
            if p.pid not in before and p.pid not in inside and _alive(p)
        ]

    wait_for(lambda: not leaked(), 10, what="child processes outside the container to exit")


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- the tests -----------------------------------------------------------------


def test_unit_starts_and_runs_sandboxed(box: Box) -> None:
    state = wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    assert box.sh("systemctl is-active hived").stdout.strip() == "active"
    shown = box.show("Type", "StatusText", "User", "WatchdogUSec", "UnitFileState")
    assert shown["Type"] == "notify" and shown["UnitFileState"] == "enabled"
    assert shown["User"] == "hived" and shown["WatchdogUSec"] == "10s"
    assert shown["StatusText"], "no STATUS= line came over $NOTIFY_SOCKET"
    # The sandbox holds in the main process (and so in the workers it spawns).
    proc_status = box.sh(f"cat /proc/{state['MainPID']}/status").stdout
    fields = dict(re.findall(r"^(\w+):\s+(.*)$", proc_status, re.M))
    assert fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    uid = box.sh("id -u hived").stdout.strip()
    assert fields["Uid"].split()[0] == uid
    # systemd accepted every setting of the unit here: it logs "hived.service:LINE: ..."
    # for a setting it ignores, and names what it could not set up.
    boot = box.sh("journalctl -b --no-pager -o cat").stdout
    complaints = [
        line
        for line in boot.splitlines()
        if re.search(r"hived\.service(\.d/\S+)?:\d+: ", line)
        or re.search(r"hived\.service: .*(not supported|ignoring|failed to set up)", line, re.I)
    ]
    assert not complaints, "\n".join(complaints)


def test_hivectl_status_for_root_and_group_members_only(box: Box) -> None:
    wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    for user in ("root", "alice"):
        status = box.status(user)
        [node] = status["nodes"]
        assert node["name"] == "box" and node["state"] == "alive"
        assert node["cpus"] == 2 and node["address"] == f"tcp://127.0.0.1:{box.port}"
    # RuntimeDirectoryMode=0750: someone outside group hived cannot reach the
    # daemon, and is told why and what to do, by hivectl and by connect().
    told = ("permission denied: the control socket ipc:///run/hived/hived.sock is there, but "
            "/run/hived (owner hived, group hived, mode 0750) lets in only hived and group "
            "hived, and user nobody is not in it; add the user to the group (`usermod -aG hived "
            "nobody`, as root) and log in again")
    out = box.sh("hivectl status", user="nobody", check=False)
    assert (out.returncode, out.stderr) == (1, f"hivectl: {told}\n"), out
    out = box.sh("/opt/hived/bin/python3 -c 'import hived; hived.connect()'", user="nobody",
                 check=False)
    assert out.returncode == 1 and out.stderr.endswith(f"HivePermissionError: {told}\n"), out


def test_doctor_is_all_ok_on_the_installed_service(box: Box) -> None:
    wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    out = box.sh("hivectl doctor", check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.startswith("ok    ") for line in lines), out.stdout
    assert "ok    key file /etc/hived/cluster.key is mode 0640, owned by root:hived" in lines
    assert any(
        line.startswith("ok    control directory /run/hived is mode 0750, owned by hived:hived")
        for line in lines
    )


def test_map_runs_in_the_service_workers(box: Box) -> None:
    wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    snippet = textwrap.dedent("""\
        import json, os, pwd
        from hived import hive

        def where(x):
            return [x * x, pwd.getpwuid(os.getuid()).pw_name, os.getpid()]

        rows = list(hive.map(where, range(200)))
        print(json.dumps({"hive": repr(hive), "rows": rows}))
    """)
    out = box.sh(f"/opt/hived/bin/python -c '{snippet}'", user="alice", timeout=120)
    got = json.loads(out.stdout.splitlines()[-1])
    assert "ipc:///run/hived/hived.sock" in got["hive"], got["hive"]
    assert [r[0] for r in got["rows"]] == [x * x for x in range(200)]
    assert {r[1] for r in got["rows"]} == {"hived"}  # run by the service's workers, as hived
    pids = " ".join(sorted({str(r[2]) for r in got["rows"]}))
    cgroups = box.sh(
        f"for p in {pids}; do grep -m1 -o 'hived.service' /proc/$p/cgroup; done"
    ).stdout
    assert cgroups.split() == ["hived.service"] * len(pids.split()), cgroups


def test_reload_rereads_the_config_file(box: Box) -> None:
    before = wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    edit = "sed -i 's/^drain_timeout = {}$/drain_timeout = {}/; s/^cpus = {}$/cpus = {}/' /etc/hived/hived.toml"
    box.sh(edit.format("10.0", "12.0", "2", "1"))
    try:
        box.sh("systemctl reload hived", timeout=30)
        wait_for(lambda: "applied timing.drain_timeout = 12.0" in box.journal(), 30,
                 interval=0.2, what="the reload in the journal")
        journal = box.journal()
        assert "pool.cpus changed but only take effect on a restart" in journal
        after = wait_for(box.active, 30, interval=0.2, what="hived.service active again")
        assert after["MainPID"] == before["MainPID"]  # the same process, serving on
        assert box.status()["nodes"][0]["cpus"] == 2
    finally:
        box.sh(edit.format("12.0", "10.0", "1", "2"))
    box.sh("systemctl reload hived", timeout=30)


def test_reload_of_a_broken_file_fails_and_the_daemon_keeps_its_config(box: Box) -> None:
    before = wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    box.sh("cp -p /etc/hived/hived.toml /etc/hived/hived.toml.good && "
           "sed -i 's/^drain_timeout = 10.0$/drain_timeout = -1.0/' /etc/hived/hived.toml")
    try:
        out = box.sh("systemctl reload hived", check=False, timeout=30)
        assert out.returncode != 0, out  # the operator sees the reload fail
        assert ("hived: /etc/hived/hived.toml: timing.drain_timeout: expected a number of "
                "seconds > 0, got -1.0") in box.journal()  # and the journal says why
        after = wait_for(box.active, 30, interval=0.2, what="hived.service active")
        assert after["MainPID"] == before["MainPID"]  # never signalled, never stopped
        assert box.status()["nodes"][0]["state"] == "alive"
        assert "SIGHUP" not in box.journal().split("Reloading")[-1]
    finally:
        box.sh("mv /etc/hived/hived.toml.good /etc/hived/hived.toml")
    assert box.sh("systemctl reload hived", check=False, timeout=30).returncode == 0


def test_watchdog_restarts_a_frozen_daemon(box: Box) -> None:
    box.sh(
        "mkdir -p /etc/systemd/system/hived.service.d && "
        "printf '[Service]\\nWatchdogSec=3s\\n' > /etc/systemd/system/hived.service.d/watchdog.conf && "
        "systemctl daemon-reload && systemctl restart hived"
    )
    before = wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    assert box.show("WatchdogUSec")["WatchdogUSec"] == "3s"
    box.sh(f"kill -STOP {before['MainPID']}")

    def restarted() -> dict[str, str] | None:
        now = box.active()
        if (
            now
            and now["MainPID"] != before["MainPID"]
            and int(now["NRestarts"]) > int(before["NRestarts"])
        ):
            return now
        return None

    waited(restarted, 45, "the watchdog to restart hived", lambda: box.journal()[-3000:])
    journal = box.journal()
    assert "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal, journal[
        -3000:
    ]
    wait_for(
        lambda: box.status()["nodes"],
        30,
        interval=0.3,
        ignore=AssertionError,
        what="the restarted daemon to answer",
    )
    box.sh("rm /etc/systemd/system/hived.service.d/watchdog.conf && systemctl daemon-reload")


def test_stop_drains_a_running_task(box: Box) -> None:
    wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    with box.popen(
        "/opt/hived/bin/python -c '"
        "import time, hived\n"
        "def slow(x):\n"
        "    time.sleep(2)\n"  # a task still running when the stop comes
        "    return x + 1\n"
        "with hived.connect() as h:\n"
        '    print("result", h.submit(slow, 41).result(timeout=60), flush=True)\n'
        "'",
        user="alice",
    ) as client:
        wait_for(
            lambda: box.status()["nodes"][0]["slots_busy"] == 1,
            30,
            interval=0.1,
            what="the task to be running",
        )
        box.sh("systemctl stop hived", timeout=60)
        out, _ = client.communicate(timeout=60)
    assert client.returncode == 0 and "result 42" in out, out
    shown = box.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert shown == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainCode": "1",
        "ExecMainStatus": "0",
    }, shown
    journal = box.journal()
    # From this run's start: journald may file the daemon's stderr line about
    # SIGTERM before systemd's own "Stopping" message.
    tail = journal[journal.rindex("Started hived.service") :]
    assert "Stopping hived.service" in tail and "Stopped hived.service" in tail, tail
    assert "SIGTERM: draining" in tail and "hived stopped" in tail, tail
    assert "SIGKILL" not in tail, tail


def test_restart_under_a_running_map_completes_it(box: Box) -> None:
    """`systemctl restart hived` under a map from a local client: the client
    greets the new daemon on the same control socket and the map completes,
    every result exactly once, in order."""
    box.sh("systemctl start hived", timeout=60)  # a test before may have stopped it
    wait_for(box.active, 30, interval=0.2, what="hived.service to be active")
    with box.popen(
        "/opt/hived/bin/python -c '"
        "import time, hived\n"
        "def slow(x):\n"
        "    time.sleep(0.2)\n"
        "    return x * x\n"
        "with hived.connect() as h:\n"
        "    got = list(h.map(slow, range(40), chunksize=1))\n"
        '    print("complete", got == [x * x for x in range(40)], flush=True)\n'
        "'",
        user="alice",
    ) as client:
        wait_for(lambda: box.status()["nodes"][0]["tasks_done"] >= 3, 30, interval=0.1,
                 what="the map to be running")
        box.sh("systemctl restart hived", timeout=60)
        out, _ = client.communicate(timeout=90)
    assert client.returncode == 0 and "complete True" in out, out
    assert "now on hived" in out, out  # it moved: the first daemon did not finish the map
