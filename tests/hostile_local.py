"""Hostile control messages and daemon answers for fuzz tests, generated from the message definitions.

`messages()` draws any registered message type (a new type is fuzzed without
new code here) with hostile values for each field, built from the field's
annotation the way `hived.wire` checks it: integers at and past every
boundary msgpack carries, NaN and infinities, empty and odd strings, nested
maps. `live` names field values worth mixing in (the job numbers a client
really opened, say), so that messages reach the code behind the checks and
are not all dropped as strangers.

`Count` tallies what a fuzz test tried, per surface; the tests print it.
"""

from __future__ import annotations

import types
import typing
from collections import Counter
from collections.abc import Mapping
from typing import Annotated, Any, Union

from hypothesis import strategies as st

from hived import control, election, gossip, matchmaking, worker  # noqa: F401 - register their types
from hived.serialization import function_digest
from hived.wire import _REGISTRY, Message

# Where msgpack's integers end, and the usual suspects inside.
EDGE_INTS = [0, 1, -1, 2, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 1e300, float("nan"), float("inf"), float("-inf")]

ANY = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def values_for(hint: Any) -> st.SearchStrategy[Any]:
    """Hostile values of the type `hint` (what the wire's checker would let through)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return ANY
    if origin is Annotated:  # a checked field (hived.fields): hostile values of its base type
        return values_for(hint.__origin__)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.sampled_from(EDGE_INTS) | st.integers(-(2**63), 2**64 - 1)
    if hint is float:
        return st.sampled_from(EDGE_FLOATS) | st.floats() | st.integers(-(2**63), 2**63)
    if hint is str:
        return st.sampled_from(["", " ", "\n", "0.1.0", "9.9.9", "x" * 4096]) | st.text(max_size=32)
    if hint is bytes:
        return st.binary(max_size=40)
    if hint is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of([values_for(arg) for arg in typing.get_args(hint)])
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return st.lists(values_for(args[0] if args else Any), max_size=4)
    if origin is dict:
        key, value = typing.get_args(hint) or (Any, Any)
        return st.dictionaries(values_for(key), values_for(value), max_size=4)
    raise TypeError(f"no hostile values for {hint!r}")


def registered(prefix: bytes = b"") -> list[type[Message]]:
    """Every message type on the wire whose type name starts with `prefix`."""
    return sorted((cls for name, cls in _REGISTRY.items() if name.startswith(prefix)), key=lambda c: c.TYPE)


@st.composite
def message(draw: Any, cls: type[Message], live: Mapping[str, list[Any]]) -> tuple[Message, list[bytes]]:
    """One message of type `cls` and its payload frames; fields named in
    `live` take one of those values half the time."""
    values = {}
    for name, hint, _ in cls._checks:
        hostile = values_for(hint)
        if live.get(name):
            hostile = st.sampled_from(live[name]) | hostile
        values[name] = draw(hostile)
    payload = draw(st.lists(st.binary(max_size=200), max_size=3))
    if "fn" in values and payload and draw(st.booleans()):
        values["fn"] = function_digest(payload[0])  # a blob that matches its hash: on to the worker
    return cls(**values), payload


def messages(
    types_: list[type[Message]], live: Mapping[str, list[Any]] | None = None
) -> st.SearchStrategy[tuple[Message, list[bytes]]]:
    return st.sampled_from(types_).flatmap(lambda cls: message(cls, live or {}))


class Count:
    """What a fuzz test tried: batches and messages, by type."""

    def __init__(self, surface: str) -> None:
        self.surface, self.batches, self.types = surface, 0, Counter()

    def add(self, msgs: list[Message]) -> None:
        self.batches += 1
        self.types.update(type(m).TYPE.decode() for m in msgs)

    def report(self) -> str:
        top = ", ".join(f"{t} {n}" for t, n in sorted(self.types.items()))
        return (f"fuzz {self.surface}: {self.batches} batches, {sum(self.types.values())} "
                f"messages of {len(self.types)} types ({top})")
