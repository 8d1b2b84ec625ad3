"""`hivectl doctor` against real files, a real daemon and real sockets; the example cluster configs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

import hived.doctor
from hived import __version__
from hived.config import load_config
from hived.doctor import (
    CLOCK_READS,
    Finding,
    check_clock,
    check_config,
    check_control,
    check_exposure,
    check_key,
    check_seeds,
    check_stop_timeout,
    check_versions,
    diagnose,
    unit_stop_timeout,
)
from hived.net.security import load_key, write_key
from hived.testing.childenv import REPO, child_env
from hived.testing.waiting import wait_for

EXAMPLES = Path(REPO) / "examples" / "cluster"
LINE = re.compile(r"^(ok  |warn|FAIL)  \S.*$")


def doctor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hived.cli", "doctor", *args],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(out: subprocess.CompletedProcess[str], level: str) -> list[str]:
    for line in out.stdout.splitlines():
        assert LINE.match(line), f"not a doctor line: {line!r}\n{out.stdout}{out.stderr}"
    return [line for line in out.stdout.splitlines() if line.startswith(level)]


def levels(findings: list[Finding]) -> list[str]:
    return [f.level for f in findings]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP socket listening on loopback, standing in for a seed."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


def address_of(s: socket.socket) -> str:
    return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening: connecting is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    write_key(str(path))
    path.chmod(0o640)
    return path


def write_config(
    path: Path,
    control: str,
    seeds: list[str],
    key: Path | None,
    bind: str = "tcp://127.0.0.1:7799",
    extra: str = "",
) -> Path:
    security = f'key_file = "{key}"\n' if key else ""
    path.write_text(
        "[node]\n"
        f'name = "testnode"\nbind = "{bind}"\ncontrol = "{control}"\n'
        f"seeds = {json.dumps(seeds)}\n"
        f"[security]\n{security}{extra}"
    )
    return path


# -- end to end --------------------------------------------------------------


def test_a_healthy_node_is_all_ok(
    daemon, tmp_path: Path, key: Path, listener: socket.socket
) -> None:
    seed = address_of(listener)
    config = write_config(tmp_path / "hived.toml", daemon.address, [seed], key)
    out = doctor("--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines(out, "warn") == [] and lines(out, "FAIL") == [], out.stdout
    text = out.stdout
    assert f"ok    config {config} loads and validates" in text
    assert f"ok    key file {key} is mode 0640" in text
    assert f"ok    key file {key} holds a valid cluster key" in text
    assert f"ok    control socket {daemon.address} answers" in text
    assert re.search(
        r"ok    control directory \S+ is mode 0700, owned by root:\w+; socket mode 0660", text
    ), text
    assert f"ok    seed {seed} accepts connections" in text
    assert re.search(r"ok    monotonic and wall clocks agree within", text)
    assert f"ok    all 1 node(s) run hived {__version__}" in text
    assert out.stderr == ""
    # The seed check opened a connection and sent nothing on it.
    listener.settimeout(5)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        assert conn.recv(64) == b""


def test_no_daemon_no_seed_fails_with_the_fix(tmp_path: Path, key: Path, closed_port: int) -> None:
    control = f"ipc://{tmp_path}/nobody-home.sock"
    seed = f"tcp://127.0.0.1:{closed_port}"
    out = doctor("--config", str(write_config(tmp_path / "hived.toml", control, [seed], key)))
    assert out.returncode == 1
    fails = lines(out, "FAIL")
    assert (
        f"FAIL  no daemon answered at {control} — is hived running? `systemctl status hived`"
        in "\n".join(fails)
    )
    assert any(line.startswith("FAIL  no seed is reachable") for line in fails), out.stdout
    assert any(seed in line and "Connection refused" in line for line in lines(out, "warn")), (
        out.stdout
    )


def test_missing_and_invalid_config(tmp_path: Path) -> None:
    out = doctor("--config", str(tmp_path / "absent.toml"))
    assert out.returncode == 1
    assert lines(out, "FAIL")[0] == (
        f"FAIL  config {tmp_path}/absent.toml does not exist — write one "
        "(examples/cluster/node1.toml is a start) or pass --config PATH"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nbnid = "tcp://127.0.0.1:7700"\n')
    out = doctor("--config", str(bad))
    assert out.returncode == 1
    first = lines(out, "FAIL")[0]
    assert f"{bad}: node.bnid: expected one of" in first and 'did you mean "bind"' in first
    assert f"`hived --config {bad} --check-config`" in first


def test_a_daemon_run_by_flags_without_a_config_file_passes(
    daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As README's `hived --cpus auto &`: no file at the default path is no fault.
    absent = tmp_path / "etc-hived" / "hived.toml"
    monkeypatch.setattr(hived.doctor, "DEFAULT_CONFIG_PATH", str(absent))
    found = diagnose(None, connect=daemon.address, stop_timeout=lambda: None)
    assert [f for f in found if f.level != "ok"] == [], found
    assert found[0] == Finding(
        "ok", f"no config file at {absent}: a daemon here runs on its flags and defaults "
        "(`hivectl doctor --config PATH` checks another file)"
    )
    assert f"control socket {daemon.address} answers" in [f.what for f in found]
    # A file the operator names must be there.
    assert levels(diagnose(str(absent), connect=daemon.address, stop_timeout=lambda: None))[0] == "FAIL"


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `systemctl` first on PATH that shows what the test writes to `shown`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shown = tmp_path / "shown"
    fake = bin_dir / "systemctl"
    fake.write_text(f'#!/bin/sh\n[ "$1 $2 $3 $4 $5 $6" = "show -p LoadState -p TimeoutStopUSec hived" ] '
                    f"|| exit 3\ncat {shown}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return shown


@pytest.mark.parametrize(("shown", "seconds"), [
    ("LoadState=loaded\nTimeoutStopUSec=45s\n", 45.0),
    ("TimeoutStopUSec=1min 30s\nLoadState=loaded\n", 90.0),
    ("LoadState=loaded\nTimeoutStopUSec=infinity\n", None),
    ("LoadState=not-found\nTimeoutStopUSec=1min 30s\n", None),
])
def test_the_units_stop_timeout_as_systemctl_shows_it(
    systemctl: Path, shown: str, seconds: float | None
) -> None:
    systemctl.write_text(shown)
    assert unit_stop_timeout() == seconds


def test_a_drain_longer_than_the_units_stop_timeout_warns() -> None:
    assert check_stop_timeout(30.0, 45.0) == [
        Finding("ok", "drain_timeout 30 s fits in the unit's TimeoutStopSec 45 s")
    ]
    assert check_stop_timeout(30.0, None) == []
    assert check_stop_timeout(60.0, 45.0) == [
        Finding(
            "warn",
            "drain_timeout 60 s does not fit in the unit's TimeoutStopSec 45 s with 10 s to stop "
            "the workers after it: past it, systemd lets the drain run only while hived "
            "keeps asking for more time (EXTEND_TIMEOUT_USEC)",
            "`systemctl edit hived` and set [Service] TimeoutStopSec=70s, or lower [timing] "
            "drain_timeout",
        )
    ]


def measured(what: str) -> str:
    return re.sub(r"\d+(\.\d+)?", "N", what)


def test_doctor_json_has_every_check_and_the_verdict(
    daemon, tmp_path: Path, key: Path, listener: socket.socket, systemctl: Path
) -> None:
    systemctl.write_text("LoadState=loaded\nTimeoutStopUSec=45s\n")
    config = write_config(tmp_path / "hived.toml", daemon.address, [address_of(listener)], key,
                          extra="[timing]\ndrain_timeout = 60.0\n")
    out = doctor("--config", str(config), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    body = json.loads(out.stdout)
    assert body["ok"] is True
    assert all(set(check) == {"level", "what", "fix"} for check in body["checks"])
    assert [c["what"] for c in body["checks"] if c["level"] == "warn"] == [
        "drain_timeout 60 s does not fit in the unit's TimeoutStopSec 45 s with 10 s to stop "
        "the workers after it: past it, systemd lets the drain run only while hived "
        "keeps asking for more time (EXTEND_TIMEOUT_USEC)"
    ]
    plain = doctor("--config", str(config))
    # the same checks; what they measured (the clocks' agreement) may differ
    assert [measured(line[6:].split(" — ")[0]) for line in plain.stdout.splitlines()] == [
        measured(c["what"]) for c in body["checks"]
    ]
    failing = doctor("--config", str(tmp_path / "absent.toml"), "--json")
    assert failing.returncode == 1 and json.loads(failing.stdout)["ok"] is False


def test_version_skew_with_a_peer_warns(
    make_daemon, tmp_path: Path, key: Path, listener: socket.socket
) -> None:
    other = make_daemon(start=False)
    i = other.args.index("-m")
    other.args[i : i + 2] = [
        "-c",
        "import sys, hived; hived.__version__ = '9.9.9'; "
        "from hived.daemon import main; sys.exit(main(sys.argv[1:]))",
    ]
    other.start()
    seed = address_of(listener)
    out = doctor("--config", str(write_config(tmp_path / "hived.toml", other.address, [seed], key)))
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines(out, "warn") == [
        f"warn  node testnode runs hived 9.9.9, this hivectl is {__version__} — install the same "
        "hived release on every node (peers of another protocol major are refused)"
    ]


def test_control_socket_open_to_everyone_warns(daemon, tmp_path: Path, key: Path) -> None:
    path = daemon.address[len("ipc://") :]
    os.chmod(daemon.dir, 0o755)
    os.chmod(path, 0o666)
    try:
        out = doctor(
            "--config", str(write_config(tmp_path / "hived.toml", daemon.address, [], key))
        )
    finally:
        os.chmod(path, 0o660)
        os.chmod(daemon.dir, 0o700)
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines(out, "warn") == [
        f"warn  anyone on this machine can use control socket {path} and run code as root "
        f"(directory mode 0755, socket 0666) — `chmod 0750 {daemon.dir}` "
        "(the unit sets RuntimeDirectoryMode=0750)"
    ]


def test_control_over_tcp_speaks_curve_with_the_key(make_daemon, key: Path) -> None:
    control = f"tcp://127.0.0.1:{free_port()}"
    daemon = make_daemon(
        "--control",
        control,
        "--bind",
        f"tcp://127.0.0.1:{free_port()}",
        "--key-file",
        str(key),
        start=False,
    )
    daemon.start(wait=False)
    cluster_key = load_key(str(key))

    def answered() -> list[Finding] | None:
        assert daemon.proc.poll() is None, daemon.log
        status, found = check_control([control], cluster_key.client)
        return found if status is not None else None

    found = wait_for(answered, 20, interval=0.1, what=f"hived to answer at {control}")
    assert found == [Finding("ok", f"control socket {control} answers")]
    status, found = check_control([control], None)  # no key: CURVE refuses us
    assert status is None and levels(found) == ["FAIL"]


# -- one check at a time -----------------------------------------------------


def test_exposed_bind_needs_a_key_or_insecure(tmp_path: Path, key: Path) -> None:
    control = "ipc:///run/hived/hived.sock"
    bare = load_config(
        write_config(tmp_path / "a.toml", control, [], None, bind="tcp://0.0.0.0:7700")
    )
    [finding] = check_exposure(bare)
    assert finding.level == "FAIL"
    assert finding.what.startswith(
        "node.bind tcp://0.0.0.0:7700 reachable from other machines but no key"
    )
    assert "hivectl keygen" in finding.fix
    insecure = load_config(
        write_config(
            tmp_path / "b.toml",
            control,
            [],
            None,
            bind="tcp://0.0.0.0:7700",
            extra="insecure = true\n",
        )
    )
    assert levels(check_exposure(insecure)) == ["warn"]
    keyed = load_config(
        write_config(tmp_path / "c.toml", control, [], key, bind="tcp://0.0.0.0:7700")
    )
    assert levels(check_exposure(keyed)) == ["ok"]
    local = load_config(write_config(tmp_path / "d.toml", control, [], None))
    assert levels(check_exposure(local)) == ["ok"]


@pytest.mark.parametrize(
    ("mode", "expected", "match"),
    [
        (0o600, ["ok", "ok"], "is mode 0600"),
        (0o640, ["ok", "ok"], "is mode 0640"),
        (0o644, ["warn", "ok"], "is world-readable (mode 0644)"),
        (0o660, ["warn", "ok"], "has mode 0660, looser than 0640"),
    ],
)
def test_key_file_mode(key: Path, mode: int, expected: list[str], match: str) -> None:
    key.chmod(mode)
    loaded, found = check_key(str(key), daemon_user="no-such-user-here")
    assert loaded is not None
    assert levels(found) == expected
    assert match in found[0].what
    if expected[0] == "warn":
        assert found[0].fix == f"`chmod 0640 {key}; chown root:no-such-user-here {key}`"


def test_key_file_the_daemon_cannot_read(key: Path) -> None:
    key.chmod(0o600)  # owned by root, and the daemon runs as nobody
    _, found = check_key(str(key), daemon_user="nobody")
    assert [f.level for f in found] == ["ok", "FAIL", "ok"]
    assert found[1].what.startswith(
        f"user nobody (the daemon's) cannot read key file {key} (mode 0600"
    )
    key.chmod(0o604)
    assert levels(check_key(str(key), daemon_user="nobody")[1]) == ["warn", "ok"]


def test_key_file_missing_or_not_a_key(tmp_path: Path) -> None:
    missing = tmp_path / "none.key"
    loaded, [finding] = check_key(str(missing))
    assert loaded is None and finding.level == "FAIL"
    assert finding.what == f"key file {missing} does not exist"
    assert finding.fix.startswith(f"`hivectl keygen {missing}`")
    garbage = tmp_path / "garbage.key"
    garbage.write_text('public = "short"\n')
    garbage.chmod(0o640)
    loaded, found = check_key(str(garbage))
    assert loaded is None and levels(found) == ["ok", "FAIL"]
    assert "expected a cluster key" in found[1].what


def test_seeds_one_down_warns_all_down_fails(listener: socket.socket, closed_port: int) -> None:
    up = address_of(listener)
    down = f"tcp://127.0.0.1:{closed_port}"
    assert levels(check_seeds([up, down])) == ["ok", "warn"]
    assert levels(check_seeds([down])) == ["warn", "FAIL"]
    assert levels(check_seeds([])) == ["ok"]


def test_unresolvable_seed_names_the_host() -> None:
    [finding, _] = check_seeds(["tcp://no-such-host.invalid:7700"], timeout=2)
    assert finding.level == "warn" and "cannot resolve no-such-host.invalid" in finding.what


class FakeClocks:
    """A monotonic and a wall clock; `sleep` advances the wall one `rate` times faster."""

    def __init__(self, rate: float) -> None:
        self.rate, self.mono, self.wall_now = rate, 100.0, 1.7e9

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.wall_now

    def sleep(self, seconds: float) -> None:
        self.mono += seconds
        self.wall_now += seconds * self.rate


@pytest.mark.parametrize(
    ("rate", "level"), [(1.0, "ok"), (1.005, "ok"), (1.02, "warn"), (0.9, "warn")]
)
def test_clock_rate(rate: float, level: str) -> None:
    c = FakeClocks(rate)
    [finding] = check_clock(0.5, c.monotonic, c.wall, c.sleep)
    assert finding.level == level, finding
    if level == "warn":
        assert f"ran at {rate:.3f}x the monotonic clock" in finding.what


class PreemptedClocks(FakeClocks):
    """Ten milliseconds pass, on both clocks, right after the first monotonic
    read at each end of the span: a loaded machine preempting the check."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.reads = 0

    def monotonic(self) -> float:
        now = self.mono
        if self.reads in (0, 2 * CLOCK_READS):  # two reads a try
            self.sleep(0.010)
        self.reads += 1
        return now


def test_a_preempted_read_of_the_clocks_is_not_drift() -> None:
    c = PreemptedClocks()
    [finding] = check_clock(0.5, c.monotonic, c.wall, c.sleep)
    assert finding.level == "ok", finding


def test_clock_rate_real_clocks() -> None:
    assert levels(check_clock(0.05)) == ["ok"]


def test_versions_from_a_status_answer() -> None:
    status = {"nodes": [{"name": "a", "version": __version__}, {"name": "b", "version": "0.0.1"}]}
    [finding] = check_versions(status)
    assert finding.level == "warn" and finding.what.startswith("node b runs hived 0.0.1")
    assert levels(check_versions({"nodes": [{"name": "a", "version": __version__}]})) == ["ok"]


def test_protocol_minors_are_a_rolling_upgrade_and_another_major_fails() -> None:
    def row(name: str, protocol: str) -> dict:
        return {"name": name, "version": __version__, "protocol": protocol}

    mixed = {"nodes": [row("a", "1.0"), row("b", "1.1"), row("c", "1.0")]}
    assert [f.line() for f in check_versions(mixed, protocol="1.0")] == [
        "ok    a rolling upgrade in progress: protocol 1.0 on a, c; 1.1 on b "
        "(minors interoperate: each pair speaks the lower one)",
        f"ok    all 3 node(s) run hived {__version__}",
    ]
    other = {"nodes": [row("a", "1.0"), row("b", "2.0")]}
    assert [f.line() for f in check_versions(other, protocol="1.0")] == [
        "FAIL  node(s) b speak protocol 2.0, this hivectl 1.0: nodes of another major version "
        "do not interoperate — upgrade the older side, so that every node speaks one major version",
        f"ok    all 2 node(s) run hived {__version__}",
    ]
    assert levels(check_versions({"nodes": [row("a", "1.0")]}, protocol="1.0")) == ["ok"]


# -- the example cluster -------------------------------------------------------


def example_configs() -> list[Path]:
    return sorted(EXAMPLES.glob("node*.toml"))


def test_examples_are_three_machines_of_one_hive() -> None:
    configs = [load_config(p) for p in example_configs()]
    assert [c.node.name for c in configs] == ["node1", "node2", "node3"]
    seeds = {c.node.seeds for c in configs}
    assert seeds == {("tcp://192.0.2.11:7700", "tcp://192.0.2.12:7700", "tcp://192.0.2.13:7700")}
    assert [c.node.advertise for c in configs] == list(next(iter(seeds)))
    for c in configs:
        assert c.node.bind == "tcp://0.0.0.0:7700"
        assert c.node.control == "ipc:///run/hived/hived.sock"
        assert c.security.key_file == "/etc/hived/cluster.key" and not c.security.insecure


@pytest.mark.parametrize("name", ["node1.toml", "node2.toml", "node3.toml"])
def test_example_config_passes_check_config(name: str, tmp_path: Path, key: Path) -> None:
    text = (EXAMPLES / name).read_text()
    assert text.count('"/etc/hived/cluster.key"') == 1
    config = tmp_path / name
    config.write_text(text.replace('"/etc/hived/cluster.key"', f'"{key}"'))
    out = subprocess.run(
        [sys.executable, "-m", "hived.daemon", "--config", str(config), "--check-config"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f'key_file = "{key}"' in out.stdout and f'name = "{name[:-5]}"' in out.stdout
    loaded, found = check_config(str(config))
    assert loaded is not None and levels(found) == ["ok"]
    assert levels(check_exposure(loaded)) == ["ok"]
    assert levels(check_key(str(key))[1]) == ["ok", "ok"]
