"""Hostile mesh messages, generated from the message definitions themselves.

`mesh_messages(names, addresses)` is a hypothesis strategy over every
registered mesh message type (M.*, E.*, S.*): each field's values are drawn
from its annotation, mixing what the hive really uses (its nodes' names and
addresses, small terms and counts, honest states) with what no honest peer
sends (values at and past each rule's bounds, NaN, wildcard and junk
addresses, over-long lists). A message type added tomorrow is fuzzed with no
change here. The same strategy feeds the simulator's hostile tests and the
real daemons' fuzz test.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Union

from hypothesis import strategies as st

from hived import election, fields, gossip, matchmaking  # noqa: F401 - register mesh types
from hived.mesh import MESH_PREFIXES
from hived.wire import _REGISTRY, Message, Rule

MESH_TYPES = sorted(
    (cls for name, cls in _REGISTRY.items() if name[:2] in MESH_PREFIXES), key=lambda c: c.TYPE
)

# mostly values a rule lets through, so messages reach the cores' deeper paths
_SMALL = st.integers(0, 40)
_INTS = st.one_of(
    *[_SMALL] * 12,
    st.sampled_from([-3, -2, -1, 2**32, 2**53 - 1, 2**53, 2**62 - 1, 2**62, 2**63 - 1, 2**64 - 1]),
    st.integers(-(2**63), 2**64 - 1),
)
_FLOATS = st.one_of(*[st.floats(0, 5)] * 6, st.floats(allow_nan=True, allow_infinity=True))


def _values(hint: Any, names: list[str], addresses: list[str]) -> st.SearchStrategy:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base = _values(hint.__origin__, names, addresses)
        # mostly values its rules let through, so messages reach the cores; and
        # a sender mostly names itself, as it must for its claims to be taken
        own = {fields.Name: names[-1], fields.Address: addresses[-1]}
        if hint in own:
            return st.one_of(*[st.just(own[hint])] * 3, base)
        rules = [r.ok for r in hint.__metadata__ if isinstance(r, Rule)]
        candidates = {int: list(range(41)), float: [0.0, 0.25, 1.0, 2.5],
                      str: names + addresses + ["alive", "draining", "0.1.0"],
                      bytes: [b"", b"f" * 32]}.get(hint.__origin__, [])  # fmt: skip
        valid = [v for v in candidates if all(ok(v) for ok in rules)]
        return st.one_of(*[st.sampled_from(valid)] * 3, base) if valid else base
    if hint is bool:
        return st.booleans()
    if hint is int:
        return _INTS
    if hint is float:
        return _FLOATS
    if hint is str:
        known = st.sampled_from(names + addresses + ["alive", "draining"] * 3)
        return st.one_of(
            *[known] * 8,
            st.sampled_from(["", "tcp://*:7700", "tcp://10.0.0.1:0", "not an address", "ipc:///x"]),
            st.text(max_size=24),
        )
    if hint is bytes:
        return st.binary(max_size=80)
    if hint is type(None):
        return st.none()
    if origin in (Union, types.UnionType):
        return st.one_of(*(_values(a, names, addresses) for a in typing.get_args(hint)))
    if origin in (list, tuple):
        item = _values(typing.get_args(hint)[0], names, addresses)
        # past MAX_GOSSIP and the other list bounds, cheaply: one value, repeated
        return st.one_of(*[st.just([])] * 8, *[st.lists(item, max_size=4)] * 3,
                         item.map(lambda v: [v] * 65))
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), _INTS | st.text(max_size=8), max_size=3)
    return st.none() | _INTS | st.text(max_size=8)


def message_of(cls: type[Message], names: list[str], addresses: list[str]) -> st.SearchStrategy:
    fields = [_values(hint, names, addresses) for _, hint, _ in cls._checks]
    return st.tuples(*fields).map(lambda values: cls(*values))


def mesh_messages(names: list[str], addresses: list[str]) -> st.SearchStrategy[Message]:
    """Any mesh message, its fields drawn from the hive's own names and addresses
    and from values past every bound; the last name and address are the
    sender's own."""
    return st.one_of(*(message_of(cls, names, addresses) for cls in MESH_TYPES))
