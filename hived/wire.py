"""The wire format: typed messages in multipart ZeroMQ frames.

Every message on every socket (mesh, control, worker) is

    [b"HV" + major.minor, TYPE, msgpack(header), payload...]

The header is a msgpack map of the message's fields; payload frames are raw
bytes (user pickles, with their out-of-band buffers as frames of their own) and
are never looked at here. The control plane is never unpickled: a header is
plain msgpack, decoded once into its dataclass and checked field by field
against the class's annotations, so a handler can trust what it gets. Anything
else (a wrong version, an unknown type, a missing or mistyped field, a
truncated message) raises `RemoteProtocolError` naming what was wrong.

Messages are declared where they are used, with `@message(b"TYPE")` on a
dataclass; dispatch is by class, never by string compare in an if/elif chain.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, Union

import msgpack

from hived.errors import LocalProtocolError, RemoteProtocolError

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
VERSION_FRAME = b"HV%d.%d" % (PROTOCOL_MAJOR, PROTOCOL_MINOR)

# A header bigger than this is hostile: control-plane headers are small and
# bulk data travels in payload frames.
MAX_HEADER_BYTES = 1 << 20

Frame = Union[bytes, memoryview, Any]  # bytes-like, or a zmq.Frame


class Message:
    """Base of all wire messages; subclasses are dataclasses made by `message`."""

    TYPE: ClassVar[bytes] = b""
    _checks: ClassVar[tuple[tuple[str, Any], ...]] = ()


_REGISTRY: dict[bytes, type[Message]] = {}
M = TypeVar("M", bound=type)


def message(type_name: bytes):
    """Register a dataclass as the message carried under `type_name`."""

    def register(cls: M) -> M:
        if type_name in _REGISTRY:
            raise LocalProtocolError(f"message type {type_name!r} is registered twice")
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        cls.TYPE = type_name
        hints = typing.get_type_hints(cls)
        cls._checks = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
        _REGISTRY[type_name] = cls
        return cls

    return register


def encode(msg: Message, payload: Sequence[Frame] = ()) -> list[Frame]:
    """The frames that carry `msg` and its payload."""
    header = msgpack.packb({name: getattr(msg, name) for name, _ in msg._checks})
    return [VERSION_FRAME, msg.TYPE, header, *payload]


def peer_version(frames: Sequence[Frame]) -> tuple[int, int] | None:
    """The protocol version a peer speaks, or None if the first frame is not one."""
    try:
        first = bytes(frames[0])
        major, minor = first[2:].split(b".")
        if not first.startswith(b"HV"):
            return None
        return int(major), int(minor)
    except (IndexError, ValueError):
        return None


def decode(frames: Sequence[Frame]) -> tuple[Message, list[Frame]]:
    """Decode and check one message; return it and its payload frames."""
    if len(frames) < 3:
        raise RemoteProtocolError(f"truncated message: {len(frames)} frames, expected at least 3")
    version = bytes(frames[0])
    if version != VERSION_FRAME:
        got = peer_version(frames)
        if got is None:
            raise RemoteProtocolError(f"not a hived message (first frame {version[:16]!r})")
        raise RemoteProtocolError(
            f"protocol version {got[0]}.{got[1]} is not ours "
            f"({PROTOCOL_MAJOR}.{PROTOCOL_MINOR}); upgrade the older side"
        )
    type_name = bytes(frames[1])
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {type_name[:32]!r}")
    raw = frames[2]
    if len(raw) > MAX_HEADER_BYTES:
        raise RemoteProtocolError(f"{type_name.decode()} header of {len(raw)} bytes is too large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"{type_name.decode()} header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError(f"{type_name.decode()} header is not a map")
    values = {}
    for name, hint in cls._checks:
        if name not in header:
            raise RemoteProtocolError(f"{type_name.decode()} lacks field {name!r}")
        values[name] = _check(header[name], hint, type_name, name)
    return cls(**values), list(frames[3:])


def _check(value: Any, hint: Any, type_name: bytes, field: str) -> Any:
    """`value` if it matches the annotation `hint`, else RemoteProtocolError."""
    if _matches(value, hint):
        return tuple(value) if typing.get_origin(hint) is tuple else value
    raise RemoteProtocolError(
        f"{type_name.decode()} field {field!r} should be {_describe(hint)}, "
        f"got {type(value).__name__}"
    )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bytes, bool):
        return isinstance(value, hint)
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, val = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, key) and _matches(v, val) for k, v in value.items()
        )
    raise LocalProtocolError(f"field annotation {hint!r} is not supported on the wire")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
