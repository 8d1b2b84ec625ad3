"""The wire format: typed messages in multipart ZeroMQ frames.

Every message on every socket (mesh, control, worker) is

    [b"HV" + major.minor + b" " + TYPE + b"\n" + msgpack(header), payload...]

The first frame is the envelope: protocol version, message type and header
together, so a control message is one frame (each frame costs a send call,
and that is most of the per-message cost on the hot path). The header is a
msgpack map of the message's fields; payload frames are raw
bytes (user pickles, with their out-of-band buffers as frames of their own) and
are never looked at here. The control plane is never unpickled: a header is
plain msgpack, decoded once into its dataclass and checked field by field
against the class's annotations, so a handler can trust what it gets. Anything
else (another major version, an unknown type, a missing, unknown or
mistyped field, a truncated message) raises `RemoteProtocolError` naming
what was wrong.

Versions: minors of one major interoperate, so a hive upgrades one machine
at a time. A message's envelope carries its sender's own version. What is
new in a minor is in `SINCE` (a type with `@message(b"TYPE", since=N)`, a
field added to an older type with `Annotated[..., Since(N)]` and a
default), and the sender consults it: `known_at` says whether a peer of
minor N knows a type, `encode(msg, minor=N)` leaves out the fields it does
not, so each pair speaks the lower minor. Received, a message of a newer
minor may hold what this node does not know: an unknown type raises
`NewerMinorType` (to be ignored, not a fault) and unknown fields are
dropped. From our own minor or an older one both stay errors, as is a
missing field of the sender's minor from any sender; another major is
`OtherMajorVersion`, answered (by the mesh) with `refusal()`, the one
message every major reads.

Messages are declared where they are used, with `@message(b"TYPE")` on a
dataclass; dispatch is by class, never by string compare in an if/elif chain.
A field's annotation may carry `Rule`s (`Annotated[int, Rule(...)]`, the
shared ones are in `hived.protocol.fields`) that its values must also meet, and a
message may define `problem()` for rules across fields: both are checked
here, so every message type gets them and no handler (and no socket call)
sees a value a rule refuses.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

import msgpack

from hived.errors import (
    InternalError,
    NewerMinorType,
    OtherMajorVersion,
    RemoteProtocolError,
)
from hived.net.frames import Frame, frame_bytes

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
VERSION = b"HV%d.%d" % (PROTOCOL_MAJOR, PROTOCOL_MINOR)
# The answer to a message of another major: its envelope alone (this node's
# version, this type, an empty map) is the form every major reads.
REFUSED = b"M.REFUSED"
# The envelope's first word is b"HV" + major.minor; longer is not a version.
_MAX_VERSION_WORD = 16

# A header bigger than this is hostile: control-plane headers are small and
# bulk data travels in payload frames.
MAX_HEADER_BYTES = 1 << 20



@dataclass(frozen=True, slots=True)
class Rule:
    """What a field's value must also be, beyond its type: `ok(value)`, and
    `expects`, which error messages quote."""

    expects: str
    ok: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class Since:
    """Marks a field added to an older message type in protocol minor `minor`
    (`Annotated[int, Since(1)] = 0`): senders leave it out for older peers,
    and it needs a default for what they send."""

    minor: int


# When each newer thing appeared: (type, None) for a message type, (type,
# field) for a field added to an older type, -> the minor. What is not here
# is of minor 0. `message` writes it; the sender reads it.
SINCE: dict[tuple[bytes, str | None], int] = {}


class Message:
    """Base of all wire messages; subclasses are dataclasses made by `message`."""

    TYPE: ClassVar[bytes] = b""
    # (field name, annotation, predicate) for each field, in declaration order
    _checks: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()
    _names: ClassVar[tuple[str, ...]] = ()  # the fields, in declaration order
    _defaults: ClassVar[dict[str, Any]] = {}  # fields of a later minor: their defaults
    _tuples: ClassVar[frozenset[str]] = frozenset()  # fields sent as lists, kept as tuples
    _prefix: ClassVar[bytes] = b""  # version and type, the start of the envelope
    # Declared for type checkers: `message` makes every subclass a dataclass.
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def problem(self) -> str | None:
        """What is wrong across this message's fields, or None (override it)."""
        return None

    # What dataclass would generate, written once here: generating them for
    # every message class cost more than a third of importing the messages.
    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name, _, _ in self._checks)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name, _, _ in self._checks)


_REGISTRY: dict[bytes, type[Message]] = {}
M = TypeVar("M", bound=Message)
_F = TypeVar("_F")

# `message` makes frozen dataclasses at runtime; dataclass_transform says so to
# type checkers. They read typing_extensions' (typeshed's stubs, no runtime
# dependency), which they know for every Python version checked; at runtime
# typing's own marks the function from 3.11, and 3.10 has nothing to mark.
if typing.TYPE_CHECKING:
    from typing_extensions import dataclass_transform
elif sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:

    def dataclass_transform(**_: object) -> Callable[[_F], _F]:
        return lambda decorated: decorated


@dataclass_transform(frozen_default=True)
def message(type_name: bytes, since: int = 0) -> Callable[[type[M]], type[M]]:
    """Register a dataclass as the message carried under `type_name`, a type
    of protocol minor `since` (peers of an older minor are not sent it)."""

    def register(cls: type[M]) -> type[M]:
        if type_name in _REGISTRY:
            raise InternalError(f"message type {type_name!r} is registered twice")
        if b" " in type_name or b"\n" in type_name:
            raise InternalError(f"message type {type_name!r} may not hold a space or newline")
        if since > PROTOCOL_MINOR:
            raise InternalError(
                f"message type {type_name!r} of minor {since} is newer than this protocol "
                f"({PROTOCOL_MAJOR}.{PROTOCOL_MINOR})"
            )
        cls = dataclasses.dataclass(frozen=True, slots=True, repr=False, eq=False)(cls)
        cls.TYPE = type_name
        cls._prefix = VERSION + b" " + type_name + b"\n"
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls)
        cls._checks = tuple((f.name, hints[f.name], _checker(hints[f.name])) for f in fields)
        cls._names = tuple(f.name for f in fields)
        cls._tuples = frozenset(
            name for name, hint, _ in cls._checks if typing.get_origin(_bare(hint)) is tuple
        )
        late = {f.name: _since(hints[f.name]) for f in fields if _since(hints[f.name]) > since}
        for name, minor in late.items():
            field = next(f for f in fields if f.name == name)
            if minor > PROTOCOL_MINOR:
                raise InternalError(
                    f"field {name!r} of {type_name!r} is of minor {minor}, newer than this "
                    f"protocol ({PROTOCOL_MAJOR}.{PROTOCOL_MINOR})"
                )
            if field.default is dataclasses.MISSING:
                raise InternalError(
                    f"field {name!r} of {type_name!r} appeared in minor {minor} and needs a "
                    "default: peers of older minors do not send it"
                )
            SINCE[type_name, name] = minor
        cls._defaults = {f.name: f.default for f in fields if f.name in late}
        if since:
            SINCE[type_name, None] = since
        _REGISTRY[type_name] = cls
        return cls

    return register


def known_at(msg: Message, minor: int) -> bool:
    """Whether a peer of protocol minor `minor` knows `msg`'s type."""
    return SINCE.get((msg.TYPE, None), 0) <= minor


def encode(msg: Message, payload: Sequence[Frame] = (), minor: int | None = None) -> list[Frame]:
    """The frames that carry `msg` and its payload; for a peer of protocol
    minor `minor` (None: ours), without the fields it does not know."""
    names: Sequence[str] = msg._names
    if minor is not None and msg._defaults:
        names = [n for n in names if SINCE.get((msg.TYPE, n), 0) <= minor]
    header = msgpack.packb({name: getattr(msg, name) for name in names})
    return [msg._prefix + header, *payload]


def refusal() -> list[bytes]:
    """The answer to a message of another major: this node's version, in the
    form every major reads (see `refused_by`)."""
    return [VERSION + b" " + REFUSED + b"\n" + msgpack.packb({})]


def refused_by(frames: Sequence[Frame]) -> tuple[int, int] | None:
    """The version of a node that refused us, if `frames` are its `refusal()`."""
    if len(frames) != 1:
        return None
    head = frame_bytes(frames[0])[: _MAX_VERSION_WORD + len(REFUSED) + 2]
    word, _, rest = head.partition(b" ")
    return parse_version(word) if rest.startswith(REFUSED + b"\n") else None


def refusal_reason(theirs: tuple[int, int]) -> str:
    """Why a peer of protocol `theirs` (another major) is refused, naming both versions."""
    older = "this node" if theirs[0] > PROTOCOL_MAJOR else "that node"
    return (
        f"peer speaks protocol {theirs[0]}.{theirs[1]}, this node "
        f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}; nodes of another major version do not "
        f"interoperate: upgrade {older}"
    )



def parse_version(word: bytes) -> tuple[int, int] | None:
    """(major, minor) from an envelope's first word, b"HV1.0"; None if it is not one."""
    if not word.startswith(b"HV") or len(word) > _MAX_VERSION_WORD:
        return None
    major, dot, minor = word[2:].partition(b".")
    if not (dot and major.isdigit() and minor.isdigit()):
        return None
    return int(major), int(minor)


def peer_version(frames: Sequence[Frame]) -> tuple[int, int] | None:
    """The protocol version a peer speaks, or None if its first frame is not ours."""
    if not frames:
        return None
    head = frame_bytes(frames[0])[: _MAX_VERSION_WORD + 1]
    return parse_version(head.partition(b" ")[0].partition(b"\n")[0])


def decode(frames: Sequence[Frame]) -> tuple[Message, list[Frame]]:
    """Decode and check one message; return it and its payload frames."""
    if not frames:
        raise RemoteProtocolError("empty message")
    envelope = frame_bytes(frames[0])
    head, sep, raw = envelope.partition(b"\n")
    version, _, type_name = head.partition(b" ")
    minor = PROTOCOL_MINOR
    if version != VERSION or not sep:
        got = peer_version(frames)
        if got is None:
            raise RemoteProtocolError(f"not a hived message (starts {envelope[:16]!r})")
        if got[0] != PROTOCOL_MAJOR:
            raise OtherMajorVersion(got, refusal_reason(got))
        if not sep:
            raise RemoteProtocolError(f"truncated envelope {envelope[:32]!r}")
        minor = got[1]
    cls = _REGISTRY.get(type_name)
    if cls is None:
        if minor > PROTOCOL_MINOR:
            raise NewerMinorType(
                type_name, f"message type {type_name[:32]!r} of protocol {PROTOCOL_MAJOR}.{minor} "
                f"is newer than this node's {PROTOCOL_MAJOR}.{PROTOCOL_MINOR}"
            )
        raise RemoteProtocolError(f"unknown message type {type_name[:32]!r}")
    if len(raw) > MAX_HEADER_BYTES:
        raise RemoteProtocolError(f"{type_name.decode()} header of {len(raw)} bytes is too large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise RemoteProtocolError(f"{type_name.decode()} header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError(f"{type_name.decode()} header is not a map")
    values = []
    absent = 0  # fields of a later minor the sender left out
    for name, hint, ok in cls._checks:
        try:
            value = header[name]
        except KeyError:
            if name not in cls._defaults:
                raise RemoteProtocolError(f"{type_name.decode()} lacks field {name!r}") from None
            values.append(cls._defaults[name])
            absent += 1
            continue
        if not ok(value):
            raise RemoteProtocolError(
                f"{type_name.decode()} field {name!r} should be {_describe(hint)}, "
                f"got {_show(value)}"
            )
        values.append(tuple(value) if name in cls._tuples else value)
    if len(header) + absent > len(values) and minor <= PROTOCOL_MINOR:
        # a newer minor's fields are dropped; from ours or older, one is a fault
        unknown = sorted(str(k)[:32] for k in header if k not in cls._names)
        raise RemoteProtocolError(
            f"{type_name.decode()} has unknown field(s) {', '.join(map(repr, unknown[:4]))} "
            f"(protocol {PROTOCOL_MAJOR}.{minor}); expected only {', '.join(cls._names) or 'none'}"
        )
    msg = cls(*values)
    problem = msg.problem()
    if problem is not None:
        raise RemoteProtocolError(f"{type_name.decode()}: {problem}")
    return msg, list(frames[1:])


def _checker(hint: Any) -> Callable[[Any], bool]:
    """A predicate for values that match the annotation `hint`, built once per field."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base = _checker(hint.__origin__)
        rules = [r.ok for r in hint.__metadata__ if isinstance(r, Rule)]
        return lambda value: base(value) and all(ok(value) for ok in rules)
    if hint is Any:
        return lambda value: True
    if hint is float:
        return lambda value: type(value) is float or type(value) is int
    if hint in (int, str, bytes, bool):
        return lambda value: type(value) is hint
    if hint is type(None):
        return lambda value: value is None
    if origin in (Union, types.UnionType):
        options = [_checker(arg) for arg in typing.get_args(hint)]
        return lambda value: any(ok(value) for ok in options)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        item = _checker(args[0] if args else Any)
        return lambda value: type(value) is list and all(item(v) for v in value)
    if origin is dict:
        key, val = (_checker(a) for a in (typing.get_args(hint) or (Any, Any)))
        return lambda value: type(value) is dict and all(
            key(k) and val(v) for k, v in value.items()
        )
    raise InternalError(f"field annotation {hint!r} is not supported on the wire")


def _since(hint: Any) -> int:
    """The minor a field appeared in: its `Since`, or 0."""
    if typing.get_origin(hint) is not Annotated:
        return 0
    return max((m.minor for m in hint.__metadata__ if isinstance(m, Since)), default=0)


def _bare(hint: Any) -> Any:
    """`hint` without its rules."""
    return hint.__origin__ if typing.get_origin(hint) is Annotated else hint


def _describe(hint: Any) -> str:
    """What a value of `hint` is, in words an error message can quote."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        rules = [r.expects for r in hint.__metadata__ if isinstance(r, Rule)]
        return " and ".join(rules) if rules else _describe(hint.__origin__)
    if origin in (list, tuple) and typing.get_args(hint):
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _show(value: Any) -> str:
    """A peer's value, short enough for one log line."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
