"""The daemon's configuration: four layers merged, every value checked once.

Theory of operation
-------------------
A setting can come from four places. Highest first::

    flags (hived --bind ...)  >  TOML file  >  HIVED_* environment  >  defaults

(The environment sits *below* the file on purpose: a unit file or container
image may export HIVED_* as site defaults, and the operator's
/etc/hived/hived.toml must still win over them.)

Each layer is flattened to ``dotted.key -> Raw(value, where, text)``, where
``where`` is what an error message names ("/etc/hived/hived.toml",
"flag --cpus", "environment HIVED_CPUS") and ``text`` says the value arrived
as a string to be parsed (flags, environment) rather than as a typed TOML
value. The top value of each key goes through that key's validator exactly
once; a failure becomes one ``ConfigError`` line::

    /etc/hived/hived.toml: pool.cpus: expected "auto" or an integer >= 1, got -2

The result is a tree of frozen dataclasses, so nothing downstream re-checks
or mutates it. ``Config.origins`` remembers where each value came from, for
``hived --check-config`` and for errors found later (``check_security``).

Addresses (their defaults, syntax and reach) live in ``hived.net.addresses``.
This module must stay cheap to import all the same: the client reaches it
through ``hived.node.resources``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from hived.configschema import SCHEMA, TOP, Invalid
from hived.errors import ConfigError
from hived.net.addresses import (
    default_control_address,
    derive_advertise,
    is_loopback,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = "/etc/hived/hived.toml"
DEFAULT_BIND = "tcp://127.0.0.1:7700"
# The [timing] defaults, in seconds: every other default of these names is these.
DEFAULT_HEARTBEAT = 0.5
DEFAULT_DEAD_AFTER = 3.0
DEFAULT_LEASE = 2.0
DEFAULT_DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class NodeConfig:
    name: str
    bind: str
    advertise: str
    seeds: tuple[str, ...]
    control: str
    data_dir: str


@dataclass(frozen=True)
class PoolConfig:
    cpus: int | Literal["auto"] = "auto"
    gpus: int | Literal["auto"] = "auto"
    max_tasks_per_worker: int = 0
    # Normalised: bytes as an int (0 = no limit) or a percentage string "90%"
    # of the machine's memory; resources.memory_limit_bytes turns it into bytes.
    memory_limit: int | str = "90%"


@dataclass(frozen=True)
class TimingConfig:
    heartbeat: float = DEFAULT_HEARTBEAT
    dead_after: float = DEFAULT_DEAD_AFTER
    lease: float = DEFAULT_LEASE
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


@dataclass(frozen=True)
class SecurityConfig:
    key_file: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class MetricsConfig:
    bind: str | None = None  # "host:port"; None: no metrics served


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    pool: PoolConfig
    timing: TimingConfig
    security: SecurityConfig
    metrics: MetricsConfig
    log_level: str = "info"
    source: str | None = None
    # dotted key -> "default" | file path | "flag --x" | "environment HIVED_X"
    origins: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def dotted(self) -> dict[str, Any]:
        """Every setting under its dotted key (log_level, node.name, ...), in
        the order the TOML file lists them."""
        values = {"log_level": self.log_level}
        for section in SCHEMA:
            for key, value in vars(getattr(self, section)).items():
                values[f"{section}.{key}"] = value
        return values

    def to_toml(self, resolved: Mapping[str, str] | None = None) -> str:
        """The effective configuration as TOML that `load_config` reads back.

        Values that did not come from the file carry a comment naming their
        origin, so `hived --check-config` also answers "why is it this?";
        `resolved` adds what a dotted key's value comes to on this machine
        ("auto: 8 on this machine"), as a comment, so the text still reads
        back as the same configuration.
        """
        lines = [f"# hived effective configuration (file: {self.source or 'none'})"]
        section = ""
        for dotted, value in self.dotted().items():
            table, _, key = dotted.rpartition(".")
            if table != section:
                section = table
                lines += ["", f"[{section}]"]
            if value is None:  # TOML has no null: an absent key means "not set"
                lines.append(f"# {key} is not set")
                continue
            origin = self.origins.get(dotted)
            notes = [origin if origin and origin != self.source else "", (resolved or {}).get(dotted, "")]
            note = "; ".join(filter(None, notes))
            lines.append(f"{key} = {_toml_value(value)}" + (f"  # {note}" if note else ""))
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Public helpers


def check_setting(key: str, value: str, where: str) -> Any:
    """One setting given as text (a variable's value), checked as the daemon checks it."""
    return _validate(key, _Raw(value.strip(), where, text=True))


def check_security(config: Config) -> None:
    """Refuse a setup that lets other machines in without authentication.

    A mesh or control socket reachable from other machines accepts pickled
    code to run, so without a CURVE key anyone on the network could run
    anything as the daemon's user. Loopback and ipc are exempt.
    """
    if config.security.key_file or config.security.insecure:
        return
    for key, address in (("node.bind", config.node.bind), ("node.control", config.node.control)):
        if not is_loopback(address):
            origin = config.origins.get(key, "default")
            raise ConfigError(
                f"{origin}: {key}: {address} is reachable from other machines but no key "
                "file is set, and peers would run unauthenticated code; make a key with "
                "`hivectl keygen /etc/hived/cluster.key`, then set "
                '[security] key_file = "/etc/hived/cluster.key" '
                "(or insecure = true to accept the risk on a trusted network)"
            )


def load_config(
    path: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Merge flags > file > HIVED_* environment > defaults, and validate.

    `path` None reads /etc/hived/hived.toml where it exists; a path given
    explicitly must exist. `flags` keys are the long options with "_"
    (name, bind, advertise, seeds, control, data_dir, cpus, gpus, key_file,
    log_level); a None value means the flag was not given.
    """
    environ = os.environ if environ is None else environ
    layers: dict[str, _Raw] = {}
    # Lowest layer first; each later layer overwrites what it sets.
    for key, value in _defaults(environ).items():
        layers[key] = _Raw(value, "default", text=False)
    layers.update(_env_layer(environ))
    source = os.fspath(path) if path is not None else _default_path()
    if source is not None:
        layers.update(_file_layer(source))
    layers.update(_flag_layer(flags or {}))

    values: dict[str, Any] = {}
    for key, raw in layers.items():
        values[key] = _validate(key, raw)

    # A peer is suspect after two quiet heartbeats and dead after dead_after;
    # anything shorter would declare a healthy peer dead between its beats.
    heartbeat, dead_after = values["timing.heartbeat"], values["timing.dead_after"]
    if dead_after <= 2 * heartbeat:
        if layers["timing.dead_after"].where == "default":
            raise _error(
                layers["timing.heartbeat"],
                "timing.heartbeat",
                f"a number of seconds < timing.dead_after / 2 ({dead_after / 2:g})",
            )
        raise _error(
            layers["timing.dead_after"],
            "timing.dead_after",
            f"a number of seconds > 2 × timing.heartbeat ({2 * heartbeat:g})",
        )
    if "node.advertise" not in layers:
        values["node.advertise"] = derive_advertise(values["node.bind"])
        layers["node.advertise"] = _Raw(None, "default (derived from node.bind)", text=False)

    sections: dict[str, dict[str, Any]] = {s: {} for s in SCHEMA}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections[section][name] = value
    return Config(
        node=NodeConfig(**sections["node"]),
        pool=PoolConfig(**sections["pool"]),
        timing=TimingConfig(**sections["timing"]),
        security=SecurityConfig(**sections["security"]),
        metrics=MetricsConfig(**sections["metrics"]),
        log_level=values["log_level"],
        source=source,
        origins=MappingProxyType({k: raw.where for k, raw in layers.items()}),
    )


# --------------------------------------------------------------------------
# Layers


@dataclass(frozen=True)
class _Raw:
    value: Any
    where: str
    text: bool  # arrived as a string to parse (flag/environment), not a typed TOML value


def _defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    return {
        "log_level": "info",
        "node.name": socket.gethostname(),
        "node.bind": DEFAULT_BIND,
        "node.seeds": [],
        "node.control": default_control_address(environ),
        "node.data_dir": _default_data_dir(environ, os.geteuid()),
        "pool.cpus": "auto",
        "pool.gpus": "auto",
        "pool.max_tasks_per_worker": 0,
        "pool.memory_limit": "90%",
        "timing.heartbeat": DEFAULT_HEARTBEAT,
        "timing.dead_after": DEFAULT_DEAD_AFTER,
        "timing.lease": DEFAULT_LEASE,
        "timing.drain_timeout": DEFAULT_DRAIN_TIMEOUT,
        "security.key_file": None,
        "security.insecure": False,
        "metrics.bind": None,
    }


def _default_data_dir(environ: Mapping[str, str], euid: int) -> str:
    if euid == 0:
        return "/var/lib/hived"
    state = environ.get("XDG_STATE_HOME")
    if state:
        return os.path.join(state, "hived")
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "hived")


def _default_path() -> str | None:
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


_ENV = {
    "HIVED_NAME": "node.name",
    "HIVED_BIND": "node.bind",
    "HIVED_ADVERTISE": "node.advertise",
    "HIVED_SEEDS": "node.seeds",
    "HIVED_CONTROL": "node.control",
    "HIVED_DATA_DIR": "node.data_dir",
    "HIVED_CPUS": "pool.cpus",
    "HIVED_GPUS": "pool.gpus",
    "HIVED_KEY_FILE": "security.key_file",
    "HIVED_INSECURE": "security.insecure",
    "HIVED_LOG_LEVEL": "log_level",
}

# flags key -> (dotted key, how the user typed it)
_FLAGS = {
    "name": ("node.name", "--name"),
    "bind": ("node.bind", "--bind"),
    "advertise": ("node.advertise", "--advertise"),
    "seeds": ("node.seeds", "--seed"),
    "control": ("node.control", "--control"),
    "data_dir": ("node.data_dir", "--data-dir"),
    "cpus": ("pool.cpus", "--cpus"),
    "gpus": ("pool.gpus", "--gpus"),
    "key_file": ("security.key_file", "--key-file"),
    "log_level": ("log_level", "--log-level"),
}


def _env_layer(environ: Mapping[str, str]) -> dict[str, _Raw]:
    layer = {}
    for var, key in _ENV.items():
        value = environ.get(var)
        # An empty variable counts as unset, so `HIVED_BIND= hived` clears it.
        if value is None or value.strip() == "":
            continue
        if key == "node.seeds":
            layer[key] = _Raw(
                [s.strip() for s in value.split(",") if s.strip()], f"environment {var}", True
            )
        else:
            layer[key] = _Raw(value.strip(), f"environment {var}", True)
    return layer


def _flag_layer(flags: Mapping[str, Any]) -> dict[str, _Raw]:
    layer = {}
    for name, value in flags.items():
        if name not in _FLAGS:
            raise ConfigError(
                f"flag {name!r}: expected one of {', '.join(sorted(_FLAGS))}, got an unknown flag"
            )
        if value is None:
            continue
        key, spelled = _FLAGS[name]
        if key == "node.seeds" and isinstance(value, str):
            value = [value]
        layer[key] = _Raw(list(value) if key == "node.seeds" else value, f"flag {spelled}", True)
    return layer


def _file_layer(path: str) -> dict[str, _Raw]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables by recursion
        raise ConfigError(
            f"{path}: values are nested too deeply to read; expected the plain values hived.toml takes"
        ) from None

    layer = {}
    for top, body in data.items():
        if top in TOP:
            layer[top] = _Raw(body, path, text=False)
            continue
        if top not in SCHEMA:
            choices = [f"[{s}]" for s in SCHEMA] + list(TOP)
            raise ConfigError(
                f"{path}: {_name(top)}: expected one of {', '.join(choices)}, "
                f"got an unknown {'section' if isinstance(body, dict) else 'key'}"
                f"{_did_you_mean(top, list(SCHEMA) + list(TOP))}"
            )
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: {top}: expected a table [{top}], got {_show(body)}")
        for key, value in body.items():
            if key not in SCHEMA[top]:
                raise ConfigError(
                    f"{path}: {top}.{_name(key)}: expected one of {', '.join(SCHEMA[top])}, "
                    f"got an unknown key{_did_you_mean(key, list(SCHEMA[top]))}"
                )
            layer[f"{top}.{key}"] = _Raw(value, path, text=False)
    return layer


def _name(word: str) -> str:
    """An unknown key as the user wrote it, quoted where TOML needed quotes,
    so a newline in it cannot break the error's one line."""
    return word if re.fullmatch(r"[A-Za-z0-9_-]+", word) else json.dumps(word)


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _validate(key: str, raw: _Raw) -> Any:
    section, _, name = key.rpartition(".")
    check = SCHEMA[section][name] if section else TOP[name]
    try:
        return check(raw.value, raw.text)
    except Invalid as exc:
        got = raw.value if exc.got is Invalid._WHOLE else exc.got
        raise _error(raw, key, str(exc), got) from None


def _error(raw: _Raw, key: str, expected: str, got: Any = None) -> ConfigError:
    shown = _show(raw.value if got is None else got)
    return ConfigError(f"{raw.where}: {key}: expected {expected}, got {shown}")


def _show(value: Any, depth: int = 0) -> str:
    """A value as the user wrote it (TOML-ish), on one line, not too long;
    lists nested deeper than a few levels show as [...] (a value may be
    nested as deep as tomllib reads)."""
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, str):
        shown = json.dumps(value)  # quotes, and escapes newlines: stays one line
    elif isinstance(value, int | float):
        shown = repr(value)
    elif isinstance(value, list | tuple):
        shown = "[" + ", ".join(_show(v, depth + 1) for v in value) + "]" if depth < 8 else "[...]"
    elif isinstance(value, dict):
        shown = "a table"
    else:
        shown = json.dumps(str(value))
    return shown if len(shown) <= 120 else shown[:117] + "..."


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    # Not json.dumps: JSON writes astral characters as surrogate pairs and
    # leaves DEL raw, and TOML forbids both.
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
