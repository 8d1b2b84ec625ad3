"""hived.config: precedence, defaults, validation messages, TOML round trip, security rule."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hived import configschema
from hived.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    _default_data_dir,
    check_security,
    load_config,
)
from hived.configschema import parse_memory_limit
from hived.errors import ConfigError
from hived.net.addresses import (
    SYSTEM_CONTROL_ADDRESS,
    default_control_address,
    is_loopback,
    local_control_addresses,
)

FULL = """\
log_level = "debug"

[node]
name = "gpu-07"
bind = "tcp://0.0.0.0:7700"
advertise = "tcp://10.0.0.7:7700"
seeds = ["tcp://10.0.0.1:7700", "tcp://10.0.0.2:7700", "tcp://10.0.0.3:7700"]
control = "ipc:///run/hived/hived.sock"
data_dir = "/var/lib/hived"

[pool]
cpus = 6
gpus = "auto"
max_tasks_per_worker = 100
memory_limit = "4GiB"

[timing]
heartbeat = 0.25
dead_after = 2
lease = 1.5
drain_timeout = 12.5

[security]
key_file = "/etc/hived/cluster.key"
insecure = false

[metrics]
bind = "127.0.0.1:9641"
"""


def write(tmp_path: Path, text: str, name: str = "hived.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# --------------------------------------------------------------------------
# Reading a file, defaults


def test_full_file_is_read_into_frozen_dataclasses(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(path, environ={})
    assert config.source == path
    assert config.log_level == "debug"
    assert config.node.name == "gpu-07"
    assert config.node.bind == "tcp://0.0.0.0:7700"
    assert config.node.advertise == "tcp://10.0.0.7:7700"
    assert config.node.seeds == (
        "tcp://10.0.0.1:7700",
        "tcp://10.0.0.2:7700",
        "tcp://10.0.0.3:7700",
    )
    assert config.pool.cpus == 6
    assert config.pool.gpus == "auto"
    assert config.pool.max_tasks_per_worker == 100
    assert config.pool.memory_limit == 4 * 2**30
    assert config.timing.heartbeat == 0.25
    assert config.timing.dead_after == 2.0 and isinstance(config.timing.dead_after, float)
    assert config.timing.drain_timeout == 12.5
    assert config.security.key_file == "/etc/hived/cluster.key"
    assert config.security.insecure is False
    assert config.metrics.bind == "127.0.0.1:9641"
    with pytest.raises(AttributeError):
        config.node.name = "other"  # type: ignore[misc]
    hash(config)  # frozen and hashable, origins notwithstanding


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    environ = {"XDG_RUNTIME_DIR": str(tmp_path / "run"), "HOME": str(tmp_path / "home")}
    config = load_config(path, environ=environ)
    assert config.node.name == socket.gethostname()
    assert config.node.bind == "tcp://127.0.0.1:7700"
    assert config.node.advertise == "tcp://127.0.0.1:7700"
    assert config.node.seeds == ()
    assert config.node.control == f"ipc://{tmp_path}/run/hived/hived.sock"
    assert config.node.data_dir == _default_data_dir(environ, os.geteuid())
    assert config.pool.cpus == "auto" and config.pool.gpus == "auto"
    assert config.pool.max_tasks_per_worker == 0
    assert config.pool.memory_limit == "90%"
    assert (config.timing.heartbeat, config.timing.dead_after, config.timing.lease) == (
        0.5,
        3.0,
        2.0,
    )
    assert config.timing.drain_timeout == 30.0
    assert config.security.key_file is None and config.security.insecure is False
    assert config.metrics.bind is None  # off unless asked for
    assert config.log_level == "info"
    assert config.origins["node.bind"] == "default"


def test_no_path_reads_the_system_file_only_where_it_exists() -> None:
    if os.path.exists(DEFAULT_CONFIG_PATH):
        pytest.skip(f"{DEFAULT_CONFIG_PATH} exists on this machine; not touching it")
    assert load_config(None, environ={}).source is None


def test_data_dir_default_depends_on_the_user() -> None:
    assert _default_data_dir({}, 0) == "/var/lib/hived"
    assert _default_data_dir({"XDG_STATE_HOME": "/s", "HOME": "/h"}, 1000) == "/s/hived"
    assert _default_data_dir({"HOME": "/h"}, 1000) == "/h/.local/state/hived"


def test_default_control_address_for_this_process() -> None:
    assert default_control_address({"XDG_RUNTIME_DIR": "/run/user/7/"}) == (
        "ipc:///run/user/7/hived/hived.sock"
    )
    expected = (
        SYSTEM_CONTROL_ADDRESS
        if os.geteuid() == 0
        else f"ipc:///tmp/hived-{os.getuid()}/hived.sock"
    )
    assert default_control_address({}) == expected
    assert local_control_addresses({"XDG_RUNTIME_DIR": "/run/user/7"}) == [
        "ipc:///run/user/7/hived/hived.sock",
        SYSTEM_CONTROL_ADDRESS,
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_default_control_address_for_a_non_root_user() -> None:
    # A real child process that drops to "nobody", so the non-root branch is
    # seen for real. Forked, not exec'd: nobody may not be able to read this
    # interpreter's installation.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, default_control_address({}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        address = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert address == "ipc:///tmp/hived-65534/hived.sock"


# --------------------------------------------------------------------------
# Precedence: flags > file > environment > defaults


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nbind = "tcp://127.0.0.2:7701"\n')
    env = {"HIVED_BIND": "tcp://127.0.0.3:7702", "HIVED_CPUS": "3", "HIVED_NAME": "from-env"}
    assert load_config(str(write(tmp_path, "", "empty.toml")), environ={}).node.bind == (
        "tcp://127.0.0.1:7700"
    )
    by_env = load_config(write(tmp_path, "", "empty.toml"), environ=env)
    assert by_env.node.bind == "tcp://127.0.0.3:7702"
    assert by_env.origins["node.bind"] == "environment HIVED_BIND"
    by_file = load_config(path, environ=env)
    assert by_file.node.bind == "tcp://127.0.0.2:7701"
    assert by_file.node.name == "from-env"  # the file does not set it
    assert by_file.pool.cpus == 3
    by_flag = load_config(path, flags={"bind": "tcp://127.0.0.4:7703", "name": None}, environ=env)
    assert by_flag.node.bind == "tcp://127.0.0.4:7703"
    assert by_flag.origins["node.bind"] == "flag --bind"
    assert by_flag.node.name == "from-env"  # None means "flag not given"


def test_every_flag_and_environment_variable(tmp_path: Path) -> None:
    empty = write(tmp_path, "")
    env = {
        "HIVED_NAME": "n1",
        "HIVED_BIND": "tcp://[::1]:7000",
        "HIVED_ADVERTISE": "tcp://node1.example:7000",
        "HIVED_SEEDS": "tcp://a.example:1, tcp://b.example:2",
        "HIVED_CONTROL": "tcp://127.0.0.1:7001",
        "HIVED_DATA_DIR": "/srv/hived",
        "HIVED_CPUS": "auto",
        "HIVED_GPUS": "0",
        "HIVED_KEY_FILE": "/k",
        "HIVED_INSECURE": "yes",
        "HIVED_LOG_LEVEL": "WARNING",
        "HIVED_ADDRESS": "tcp://ignored:1",  # the client's, not the daemon's
    }
    config = load_config(empty, environ=env)
    assert config.node == config.node.__class__(
        name="n1",
        bind="tcp://[::1]:7000",
        advertise="tcp://node1.example:7000",
        seeds=("tcp://a.example:1", "tcp://b.example:2"),
        control="tcp://127.0.0.1:7001",
        data_dir="/srv/hived",
    )
    assert (config.pool.cpus, config.pool.gpus) == ("auto", 0)
    assert config.security == config.security.__class__(key_file="/k", insecure=True)
    assert config.log_level == "warning"

    flags = {
        "name": "n2",
        "bind": "tcp://127.0.0.1:8000",
        "advertise": "tcp://127.0.0.1:8000",
        "seeds": ["tcp://127.0.0.1:8001"],
        "control": "ipc:///tmp/x.sock",
        "data_dir": "/d",
        "cpus": 2,
        "gpus": "1",
        "key_file": "/k2",
        "log_level": "error",
    }
    config = load_config(empty, flags=flags, environ=env)
    assert config.node.name == "n2" and config.node.seeds == ("tcp://127.0.0.1:8001",)
    assert config.node.control == "ipc:///tmp/x.sock" and config.node.data_dir == "/d"
    assert (config.pool.cpus, config.pool.gpus) == (2, 1)
    assert config.security.key_file == "/k2" and config.log_level == "error"


def test_empty_environment_variables_count_as_unset(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), environ={"HIVED_BIND": "", "HIVED_SEEDS": " "})
    assert config.node.bind == "tcp://127.0.0.1:7700" and config.node.seeds == ()


def test_advertise_is_derived_from_bind() -> None:
    specific = load_config(None, flags={"bind": "tcp://127.0.0.9:7777"}, environ={})
    assert specific.node.advertise == "tcp://127.0.0.9:7777"
    for wildcard in ("tcp://0.0.0.0:7777", "tcp://*:7777"):
        derived = load_config(None, flags={"bind": wildcard}, environ={}).node.advertise
        host, port = derived[len("tcp://") :].rsplit(":", 1)
        assert port == "7777"
        assert host not in ("0.0.0.0", "*")
        socket.inet_aton(host)  # an IPv4 address peers can dial (or the loopback fallback)


# --------------------------------------------------------------------------
# Bad input: one line naming where, the key and what was expected

E_CPUS = 'expected "auto" or an integer >= 1'
E_GPUS = 'expected "auto" or an integer >= 0'
E_BIND = 'expected "tcp://host:port" (host an IP, a name, * or 0.0.0.0; port 0..65535)'
E_ADV = 'expected "tcp://host:port" that peers can dial (not * or 0.0.0.0; port 1..65535)'
E_SEEDS = 'expected a list of "tcp://host:port" addresses that peers can dial, each once'
E_CONTROL = 'expected "ipc://PATH" (at most 107 bytes) or "tcp://host:port"'
E_MEM = (
    'expected a percentage like "90%", a byte count, or a size like "4GiB", "512MiB" or "512MB" '
    "(0 disables)"
)
E_SECONDS = "expected a number of seconds > 0"
E_METRICS = (
    'expected "host:port" (host an IP address or a name, "0.0.0.0" for every interface; '
    "port 0..65535), or a port number alone for loopback"
)

BAD_FILES = [
    # (file text, key, expected, got)
    ("[pool]\ncpus = -2", "pool.cpus", E_CPUS, "-2"),
    ("[pool]\ncpus = 0", "pool.cpus", E_CPUS, "0"),
    ('[pool]\ncpus = "4"', "pool.cpus", E_CPUS, '"4"'),
    ("[pool]\ncpus = true", "pool.cpus", E_CPUS, "true"),
    ("[pool]\ncpus = 2.5", "pool.cpus", E_CPUS, "2.5"),
    ("[pool]\ngpus = -1", "pool.gpus", E_GPUS, "-1"),
    ('[pool]\ngpus = "all"', "pool.gpus", E_GPUS, '"all"'),
    ("[pool]\nmax_tasks_per_worker = -1", "pool.max_tasks_per_worker",
     "expected an integer >= 0 (0 = never recycle)", "-1"),
    ('[pool]\nmemory_limit = "150%"', "pool.memory_limit", E_MEM, '"150%"'),
    ('[pool]\nmemory_limit = "4 gigs"', "pool.memory_limit", E_MEM, '"4 gigs"'),
    ("[pool]\nmemory_limit = -5", "pool.memory_limit", E_MEM, "-5"),
    ('[node]\nbind = "0.0.0.0:7700"', "node.bind", E_BIND, '"0.0.0.0:7700"'),
    ('[node]\nbind = "tcp://0.0.0.0:70000"', "node.bind", E_BIND, '"tcp://0.0.0.0:70000"'),
    ('[node]\nbind = "tcp://0.0.0.0:65536"', "node.bind", E_BIND, '"tcp://0.0.0.0:65536"'),
    ('[node]\nbind = "tcp://bad host:1"', "node.bind", E_BIND, '"tcp://bad host:1"'),
    ('[node]\nbind = "tcp://[::1:1"', "node.bind", E_BIND, '"tcp://[::1:1"'),
    ('[node]\nbind = "udp://1.2.3.4:5"', "node.bind", E_BIND, '"udp://1.2.3.4:5"'),
    ("[node]\nbind = 7700", "node.bind", E_BIND, "7700"),
    ('[node]\nadvertise = "tcp://0.0.0.0:7700"', "node.advertise", E_ADV, '"tcp://0.0.0.0:7700"'),
    ('[node]\nadvertise = "tcp://*:7700"', "node.advertise", E_ADV, '"tcp://*:7700"'),
    ('[node]\nseeds = "tcp://a:1"', "node.seeds", E_SEEDS, '"tcp://a:1"'),
    ('[node]\nseeds = ["tcp://a:1", "tcp://b"]', "node.seeds", E_SEEDS, '"tcp://b"'),
    ('[node]\nseeds = ["tcp://a:1", "tcp://a:1"]', "node.seeds", E_SEEDS, '"tcp://a:1"'),
    ("[node]\nseeds = [1]", "node.seeds", E_SEEDS, "1"),
    ('[node]\ncontrol = "http://x:1"', "node.control", E_CONTROL, '"http://x:1"'),
    ('[node]\ncontrol = "ipc://"', "node.control", E_CONTROL, '"ipc://"'),
    (f'[node]\ncontrol = "ipc:///{"x" * 120}"', "node.control", E_CONTROL, '"ipc:///xxx'),
    ('[node]\nname = "has space"', "node.name",
     'expected a node name of letters, digits, ".", "_" and "-" (at most 253)', '"has space"'),
    ('[node]\ndata_dir = ""', "node.data_dir", "expected a non-empty path string", '""'),
    ("[node]\ndata_dir = 3", "node.data_dir", "expected a non-empty path string", "3"),
    ("[timing]\nheartbeat = 0", "timing.heartbeat", E_SECONDS, "0"),
    ("[timing]\nlease = -1.0", "timing.lease", E_SECONDS, "-1.0"),
    ("[timing]\ndrain_timeout = inf", "timing.drain_timeout", E_SECONDS, "inf"),
    ("[timing]\nlease = nan", "timing.lease", E_SECONDS, "nan"),
    ('[timing]\nheartbeat = "1s"', "timing.heartbeat", E_SECONDS, '"1s"'),
    ("[timing]\nheartbeat = 1.0\ndead_after = 2.0", "timing.dead_after",
     "expected a number of seconds > 2 × timing.heartbeat (2)", "2.0"),
    ("[timing]\ndead_after = 0.9", "timing.dead_after",
     "expected a number of seconds > 2 × timing.heartbeat (1)", "0.9"),
    ("[timing]\nheartbeat = 2.0", "timing.heartbeat",
     "expected a number of seconds < timing.dead_after / 2 (1.5)", "2.0"),
    ('[security]\ninsecure = "yes"', "security.insecure", "expected true or false", '"yes"'),
    ("[security]\nkey_file = 1", "security.key_file", "expected a non-empty path string", "1"),
    ('log_level = "loud"', "log_level",
     'expected one of "debug", "info", "warning", "error", "critical"', '"loud"'),
    ("[pool]\ncpu = 2", "pool.cpu",
     "expected one of cpus, gpus, max_tasks_per_worker, memory_limit", 'an unknown key (did you mean "cpus"?)'),
    ("[timing]\nheartbeat_ms = 5", "timing.heartbeat_ms",
     "expected one of heartbeat, dead_after, lease, drain_timeout", "an unknown key"),
    ('[metrics]\nbind = ":9641"', "metrics.bind", E_METRICS, '":9641"'),
    ('[metrics]\nbind = "*:9641"', "metrics.bind", E_METRICS, '"*:9641"'),
    ('[metrics]\nbind = "127.0.0.1:65536"', "metrics.bind", E_METRICS, '"127.0.0.1:65536"'),
    ('[metrics]\nbind = "127.0.0.1"', "metrics.bind", E_METRICS, '"127.0.0.1"'),
    ('[metrics]\nbind = "http://127.0.0.1:9641"', "metrics.bind", E_METRICS,
     '"http://127.0.0.1:9641"'),
    ("[metrics]\nbind = 70000", "metrics.bind", E_METRICS, "70000"),
    ("[metrics]\nbind = true", "metrics.bind", E_METRICS, "true"),
    ('[metrics]\nbind = ["127.0.0.1:9641"]', "metrics.bind", E_METRICS, '["127.0.0.1:9641"]'),
    ('[metrics]\nport = 9641', "metrics.port", "expected one of bind", "an unknown key"),
    ("metrics = 9641", "metrics", "expected a table [metrics]", "9641"),
    ("[nodes]\nname = 'x'", "nodes",
     "expected one of [node], [pool], [timing], [security], [metrics], log_level",
     'an unknown section (did you mean "node"?)'),
    ("node = 3", "node", "expected a table [node]", "3"),
    ('["x\\ny"]\nname = 1', '"x\\ny"',  # quoted: a newline in a name stays off the line
     "expected one of [node], [pool], [timing], [security], [metrics], log_level",
     "an unknown section"),
    ('[pool]\n"a b" = 1', 'pool."a b"',
     "expected one of cpus, gpus, max_tasks_per_worker, memory_limit", "an unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "expected", "got"), BAD_FILES)
def test_bad_file_values_give_one_line(
    tmp_path: Path, text: str, key: str, expected: str, got: str
) -> None:
    path = write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}: {expected}, got {got}"), message


BAD_FLAGS_AND_ENV = [
    # (flags, environ, where, key, expected, got)
    ({"cpus": "-2"}, {}, "flag --cpus", "pool.cpus", E_CPUS, '"-2"'),
    ({"cpus": 0}, {}, "flag --cpus", "pool.cpus", E_CPUS, "0"),
    ({"gpus": "many"}, {}, "flag --gpus", "pool.gpus", E_GPUS, '"many"'),
    ({"seeds": ["tcp://a:1", "nope"]}, {}, "flag --seed", "node.seeds", E_SEEDS, '"nope"'),
    ({"bind": "tcp://h:99999"}, {}, "flag --bind", "node.bind", E_BIND, '"tcp://h:99999"'),
    ({"data_dir": ""}, {}, "flag --data-dir", "node.data_dir", "expected a non-empty path string", '""'),
    ({"log_level": "verbose"}, {}, "flag --log-level", "log_level",
     'expected one of "debug", "info", "warning", "error", "critical"', '"verbose"'),
    ({}, {"HIVED_CPUS": "-2"}, "environment HIVED_CPUS", "pool.cpus", E_CPUS, '"-2"'),
    ({}, {"HIVED_GPUS": "x"}, "environment HIVED_GPUS", "pool.gpus", E_GPUS, '"x"'),
    ({}, {"HIVED_INSECURE": "maybe"}, "environment HIVED_INSECURE", "security.insecure",
     "expected true or false", '"maybe"'),
    ({}, {"HIVED_SEEDS": "tcp://a:1,tcp://0.0.0.0:2"}, "environment HIVED_SEEDS", "node.seeds",
     E_SEEDS, '"tcp://0.0.0.0:2"'),
    ({}, {"HIVED_CONTROL": "ipc:"}, "environment HIVED_CONTROL", "node.control", E_CONTROL, '"ipc:"'),
    ({}, {"HIVED_ADVERTISE": "tcp://*:1"}, "environment HIVED_ADVERTISE", "node.advertise",
     E_ADV, '"tcp://*:1"'),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "environ", "where", "key", "expected", "got"), BAD_FLAGS_AND_ENV)
def test_bad_flags_and_environment_give_one_line(
    flags: dict, environ: dict, where: str, key: str, expected: str, got: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, flags=flags, environ=environ)
    assert str(info.value) == f"{where}: {key}: {expected}, got {got}"


def test_unknown_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="flag 'cpu': expected one of .*, got an unknown flag"):
        load_config(None, flags={"cpu": 2}, environ={})


def test_malformed_toml_names_the_file_and_the_place(tmp_path: Path) -> None:
    path = write(tmp_path, "[node]\nname = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "line 2" in message and "\n" not in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: not UTF-8 text"):
        load_config(str(path), environ={})


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing), environ={})
    assert str(info.value) == f"{missing}: cannot read the config file: No such file or directory"


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read the config file"):
        load_config(str(tmp_path), environ={})


# --------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("spec", "normalised"),
    [
        (0, 0),
        ("0", 0),
        ("0%", 0),
        ("90%", "90%"),
        ("12.5%", "12.5%"),
        (" 100% ", "100%"),
        (1048576, 1048576),
        ("1048576", 1048576),
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("512 mb", 512 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("2TiB", 2 * 2**40),
        ("64KiB", 65536),
        ("10B", 10),
    ],
)
def test_memory_limit_forms(spec: int | str, normalised: int | str) -> None:
    assert parse_memory_limit(spec) == normalised


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("tcp://127.0.0.1:7700", True),
        ("tcp://127.8.9.10:1", True),
        ("tcp://localhost:7700", True),
        ("tcp://[::1]:7700", True),
        ("tcp://[::ffff:127.0.0.1]:7700", True),
        ("ipc:///run/hived/hived.sock", True),
        ("127.0.0.1", True),
        ("tcp://0.0.0.0:7700", False),
        ("tcp://*:7700", False),
        ("tcp://[::]:7700", False),
        ("tcp://10.0.0.7:7700", False),
        ("tcp://gpu-07:7700", False),
        ("tcp://128.0.0.1:7700", False),
        ("garbage", False),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


# --------------------------------------------------------------------------
# The security rule


def test_loopback_needs_no_key() -> None:
    check_security(load_config(None, environ={}))


def test_open_bind_without_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nbind = "tcp://0.0.0.0:7700"\n')
    config = load_config(path, environ={})
    with pytest.raises(ConfigError) as info:
        check_security(config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: node.bind: tcp://0.0.0.0:7700 is reachable")
    assert "hivectl keygen /etc/hived/cluster.key" in message
    assert "[security] key_file" in message and "insecure = true" in message

    check_security(load_config(path, flags={"key_file": "/etc/hived/cluster.key"}, environ={}))
    check_security(load_config(path, environ={"HIVED_INSECURE": "1"}))


def test_open_tcp_control_without_key_is_refused() -> None:
    config = load_config(None, flags={"control": "tcp://10.1.2.3:7701"}, environ={})
    with pytest.raises(ConfigError, match=r"^flag --control: node.control: tcp://10.1.2.3:7701"):
        check_security(config)


# --------------------------------------------------------------------------
# The effective config as TOML


def test_to_toml_round_trips(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    original = load_config(
        path, flags={"cpus": "auto", "gpus": 2}, environ={"HIVED_LOG_LEVEL": "info"}
    )
    text = original.to_toml()
    assert 'cpus = "auto"  # flag --cpus' in text
    assert 'name = "gpu-07"\n' in text  # from the file: no origin comment
    again = load_config(write(tmp_path, text, "effective.toml"), environ={})
    assert again == Config(
        node=original.node,
        pool=original.pool,
        timing=original.timing,
        security=original.security,
        metrics=original.metrics,
        log_level=original.log_level,
        source=again.source,
    )


def test_to_toml_writes_any_string_as_valid_toml(tmp_path: Path) -> None:
    odd = '/srv/h\u00e4ived/\U0001f600 "quoted" back\\slash\ttab\x7fdel'
    original = load_config(None, flags={"data_dir": odd}, environ={})
    again = load_config(write(tmp_path, original.to_toml()), environ={})
    assert again.node.data_dir == odd


def test_to_toml_of_defaults_round_trips(tmp_path: Path) -> None:
    original = load_config(None, flags={"bind": "tcp://*:7700"}, environ={})
    assert "# key_file is not set" in original.to_toml()
    assert "[metrics]\n# bind is not set" in original.to_toml()
    again = load_config(write(tmp_path, original.to_toml()), environ={})
    assert (again.node, again.pool, again.timing, again.security, again.metrics) == (
        original.node,
        original.pool,
        original.timing,
        original.security,
        original.metrics,
    )


# --------------------------------------------------------------------------
# Any value in any key: valid, or one ConfigError line; never another exception

_TOML_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=2)
    ),
    max_leaves=5,
)
_KEYS = (
    [("node", k) for k in ("name", "bind", "advertise", "seeds", "control", "data_dir")]
    + [("pool", k) for k in ("cpus", "gpus", "max_tasks_per_worker", "memory_limit")]
    + [("timing", k) for k in ("heartbeat", "dead_after", "lease", "drain_timeout")]
    + [("security", k) for k in ("key_file", "insecure")]
)


def _toml(value: object) -> str:
    import json
    import math

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(_KEYS), value=_TOML_VALUES.filter(lambda v: v is not None))
def test_any_value_is_accepted_or_refused_in_one_line(
    tmp_path: Path, key: tuple[str, str], value: object
) -> None:
    path = write(tmp_path, f"[{key[0]}]\n{key[1]} = {_toml(value)}\n")
    try:
        load_config(path, environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert str(exc).startswith(f"{path}: ")


@pytest.mark.parametrize("depth", [3000, 400, 40])
@pytest.mark.parametrize(
    "template",
    ["[timing]\ndrain_timeout = {open}{close}\n", "[node]\nseeds = [{tables}]\n"],
    ids=["arrays", "inline tables"],
)
def test_values_nested_deep_give_one_line(tmp_path: Path, depth: int, template: str) -> None:
    text = template.format(open="[" * depth, close="]" * depth, tables="{a=" * depth + "1" + "}" * depth)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ={})
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


# --------------------------------------------------------------------------
# Whole files, generated from the schema: any document is read or refused in one line

_config_inputs = [0]


_SECTIONS = st.sampled_from(sorted(configschema.SCHEMA)) | st.text(min_size=1, max_size=6)
_DOCUMENTS = st.dictionaries(
    st.sampled_from(sorted(configschema.TOP)) | _SECTIONS,
    st.dictionaries(
        st.sampled_from(sorted({k for keys in configschema.SCHEMA.values() for k in keys}))
        | st.text(min_size=1, max_size=6),
        # (value, how deep in arrays): as deep as tomllib's recursion goes and past it
        st.tuples(_TOML_VALUES.filter(lambda v: v is not None), st.sampled_from([0, 0, 0, 1, 3, 200, 1200])),
        max_size=5,
    )
    | _TOML_VALUES.filter(lambda v: not isinstance(v, dict)),  # a top-level key's value
    max_size=5,
)


def _document(doc: dict) -> str:
    import json

    lines = []
    for top, body in doc.items():
        if isinstance(body, dict):
            lines.append(f"[{json.dumps(top)}]")
            lines += [f"{json.dumps(k)} = {'[' * d}{_toml(v)}{']' * d}" for k, (v, d) in body.items()]
        elif body is not None:
            lines.insert(0, f"{json.dumps(top)} = {_toml(body)}")
    return "\n".join(lines) + "\n"


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.builds(_document, _DOCUMENTS) | st.text(max_size=200)
       | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_config_files(tmp_path: Path, text: str) -> None:
    _config_inputs[0] += 1
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        load_config(str(path), environ={})
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(f"{path}: "), str(exc)


def test_fuzz_config_count() -> None:
    print(f"fuzz config files: {_config_inputs[0]} files")


@pytest.mark.parametrize(
    ("written", "bind"),
    [
        ("9641", "127.0.0.1:9641"),  # a port alone: loopback
        ('"127.0.0.1:9641"', "127.0.0.1:9641"),
        ('"0.0.0.0:9641"', "0.0.0.0:9641"),  # allowed: the docs say it is unauthenticated
        ('"[::1]:0"', "[::1]:0"),
        ('"localhost:9641"', "localhost:9641"),
    ],
)
def test_metrics_bind_forms(tmp_path: Path, written: str, bind: str) -> None:
    config = load_config(write(tmp_path, f"[metrics]\nbind = {written}\n"), environ={})
    assert config.metrics.bind == bind
    check_security(config)  # read-only figures: no key file needed
