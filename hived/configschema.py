"""The configuration's keys and what each accepts: a validator per key.

A validator takes (value, text), where `text` says the value arrived as a
string to parse (a flag, the environment) rather than as a typed TOML value,
and returns the value normalised, or raises `Invalid` naming what it
expected; `hived.config` adds where the value came from and what it was.
`SCHEMA` lists the sections and their keys in the order the TOML file
writes them; `TOP` the keys outside any section.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

from hived.net.addresses import (
    parse_advertise,
    parse_bind,
    parse_control,
    parse_metrics_bind,
)
from hived.protocol.fields import NODE_NAME

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class Invalid(Exception):
    """A validator's complaint: what it expected. The caller adds where and got."""

    _WHOLE = object()

    def __init__(self, expected: str, got: Any = _WHOLE) -> None:
        super().__init__(expected)
        # Which part of the value was wrong (one bad seed, not the whole list).
        self.got = got


def parse_memory_limit(spec: int | str) -> int | str:
    """Normalise a memory_limit: bytes as an int (0 = none) or "N%" of memory.

    Accepts 0, a byte count, "90%", "4GiB", "512MiB", "512MB", "1.5GB", "0".
    Raises ValueError with the expectation on anything else.
    """
    if isinstance(spec, bool) or not isinstance(spec, int | str):
        raise ValueError(_MEMORY_EXPECTED)
    if isinstance(spec, int):
        if spec < 0:
            raise ValueError(_MEMORY_EXPECTED)
        return spec
    text = spec.strip()
    if text.endswith("%"):
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(_MEMORY_EXPECTED) from None
        if not 0 <= pct <= 100:
            raise ValueError(_MEMORY_EXPECTED)
        return 0 if pct == 0 else f"{pct:g}%"
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(_MEMORY_EXPECTED)
    number, unit = match.groups()
    return int(float(number) * (_UNITS[unit.lower()] if unit else 1))


# --------------------------------------------------------------------------
# Validators: (value, text) -> normalised value, or raise Invalid(expected)

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_MEMORY_EXPECTED = (
    'a percentage like "90%", a byte count, or a size like "4GiB", "512MiB" or "512MB" (0 disables)'
)


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("a non-empty string")
    return value.strip()


def _parsed(parse: Callable[[Any], Any]) -> Callable[[Any, bool], Any]:
    """A validator from a parser that raises ValueError naming what it expected."""

    def check(value: Any, text: bool) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    return check


def _v_name(value: Any, text: bool) -> str:
    if not isinstance(value, str) or not NODE_NAME.fullmatch(value):
        raise Invalid('a node name of letters, digits, ".", "_" and "-" (at most 253)')
    return value


def _v_seeds(value: Any, text: bool) -> tuple[str, ...]:
    expected = 'a list of "tcp://host:port" addresses that peers can dial, each once'
    if not isinstance(value, list | tuple):
        raise Invalid(expected)
    seen: list[str] = []
    for item in value:
        # Seeds are the election's voters: a duplicate would count one vote twice.
        if not isinstance(item, str) or item in seen:
            raise Invalid(expected, got=item)
        try:
            parse_advertise(item)
        except ValueError:
            raise Invalid(expected, got=item) from None
        seen.append(item)
    return tuple(seen)


def _v_path(value: Any, text: bool) -> str:
    try:
        return os.path.expanduser(_string(value))
    except Invalid:
        raise Invalid("a non-empty path string") from None


def _v_optional_path(value: Any, text: bool) -> str | None:
    return None if value is None else _v_path(value, text)


def _int(value: Any, text: bool) -> int | None:
    """An int from TOML (never a bool) or from a flag/environment string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if text and isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value)
    return None


def _slots(minimum: int) -> Callable[[Any, bool], int | str]:
    def check(value: Any, text: bool) -> int | str:
        if value == "auto" or (text and isinstance(value, str) and value.strip().lower() == "auto"):
            return "auto"
        number = _int(value, text)
        if number is None or number < minimum:
            raise Invalid(f'"auto" or an integer >= {minimum}')
        return number

    return check


def _v_max_tasks(value: Any, text: bool) -> int:
    number = _int(value, text)
    if number is None or number < 0:
        raise Invalid("an integer >= 0 (0 = never recycle)")
    return number


def _v_seconds(value: Any, text: bool) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif text and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise Invalid("a number of seconds > 0")
    return number


def _v_metrics_bind(value: Any, text: bool) -> str | None:
    if value is None:  # the default: no metrics served (TOML cannot write it)
        return None
    try:
        return parse_metrics_bind(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _v_bool(value: Any, text: bool) -> bool:
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise Invalid("true or false")


def _v_log_level(value: Any, text: bool) -> str:
    if isinstance(value, str) and value.strip().lower() in LOG_LEVELS:
        return value.strip().lower()
    raise Invalid("one of " + ", ".join(f'"{level}"' for level in LOG_LEVELS))


SCHEMA: dict[str, dict[str, Callable[[Any, bool], Any]]] = {
    "node": {
        "name": _v_name,
        "bind": _parsed(parse_bind),
        "advertise": _parsed(parse_advertise),
        "seeds": _v_seeds,
        "control": _parsed(parse_control),
        "data_dir": _v_path,
    },
    "pool": {
        "cpus": _slots(1),
        "gpus": _slots(0),
        "max_tasks_per_worker": _v_max_tasks,
        "memory_limit": _parsed(parse_memory_limit),
    },
    "timing": {
        "heartbeat": _v_seconds,
        "dead_after": _v_seconds,
        "lease": _v_seconds,
        "drain_timeout": _v_seconds,
    },
    "security": {"key_file": _v_optional_path, "insecure": _v_bool},
    "metrics": {"bind": _v_metrics_bind},
}
TOP: dict[str, Callable[[Any, bool], Any]] = {"log_level": _v_log_level}
