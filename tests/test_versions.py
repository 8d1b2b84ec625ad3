"""Protocol versions, sans-IO: what a node accepts, ignores and refuses, and
what it sends to a peer of an older minor.

The types here are registered as a minor-1 protocol would have them: a type
new in minor 1 (T.NEWS) and a field added in minor 1 to an older type
(T.GROWN.note). Each test then plays a node of minor 0 or 1 by setting
`hived.protocol.wire.PROTOCOL_MINOR`, as tests/speak.py does for a whole daemon.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Annotated

import msgpack
import pytest

from hived.errors import InternalError, NewerMinorType, OtherMajorVersion, RemoteProtocolError
from hived.mesh.versions import PeerVersions
from hived.protocol import wire
from hived.protocol.wire import (
    SINCE,
    Message,
    Since,
    decode,
    encode,
    known_at,
    message,
    parse_version,
    peer_version,
    refusal,
    refused_by,
)


@contextlib.contextmanager
def speaking(minor: int) -> Iterator[None]:
    saved = wire.PROTOCOL_MINOR, wire.VERSION
    wire.PROTOCOL_MINOR, wire.VERSION = minor, b"HV%d.%d" % (wire.PROTOCOL_MAJOR, minor)
    try:
        yield
    finally:
        wire.PROTOCOL_MINOR, wire.VERSION = saved


with speaking(1):

    @message(b"T.NEWS", since=1)
    class News(Message):
        said: str

    @message(b"T.GROWN")
    class Grown(Message):
        seq: int
        note: Annotated[str, Since(1)] = ""


@message(b"T.PLAIN")
class Plain(Message):
    seq: int
    name: str


@pytest.fixture
def minor1() -> Iterator[None]:
    with speaking(1):
        yield


def frame(version: bytes, type_name: bytes, header: dict) -> list[bytes]:
    return [version + b" " + type_name + b"\n" + msgpack.packb(header)]


# -- the table ---------------------------------------------------------------------------


def test_the_table_says_when_each_newer_thing_appeared() -> None:
    assert SINCE[b"T.NEWS", None] == 1
    assert SINCE[b"T.GROWN", "note"] == 1
    assert (b"T.GROWN", None) not in SINCE and (b"T.GROWN", "seq") not in SINCE
    assert (b"M.BEAT", None) not in SINCE  # every type of today is of minor 0


def test_a_type_or_field_newer_than_the_protocol_is_refused_at_registration() -> None:
    with pytest.raises(InternalError, match="minor 1 is newer than this protocol"):

        @message(b"T.TOONEW", since=1)
        class TooNew(Message):
            x: int

    with pytest.raises(InternalError, match="field 'y' of b'T.TOONEWF' is of minor 1"):

        @message(b"T.TOONEWF")
        class TooNewField(Message):
            y: Annotated[int, Since(1)] = 0


def test_a_later_field_needs_a_default(minor1: None) -> None:
    with pytest.raises(InternalError, match="appeared in minor 1 and needs a default"):

        @message(b"T.NODEFAULT")
        class NoDefault(Message):
            seq: int
            z: Annotated[int, Since(1)]


# -- sending: each pair speaks the lower minor -------------------------------------------


def test_the_sender_speaks_each_peer_its_own_minor(minor1: None) -> None:
    peers = PeerVersions()
    peers.heard("tcp://a:1", b"HV1.0")
    peers.heard("tcp://b:1", b"HV1.1")
    peers.heard("tcp://c:1", b"HV1.7")  # newer than us: we speak ours
    assert [peers.minor_for(p) for p in ("tcp://a:1", "tcp://b:1", "tcp://c:1", "tcp://new:1")] == [
        0, 1, 1, 0]  # fmt: skip
    news = News("hi")
    assert not known_at(news, peers.minor_for("tcp://a:1"))
    assert known_at(news, peers.minor_for("tcp://b:1"))
    assert not known_at(news, peers.minor_for("tcp://new:1"))  # not heard: minor 0
    assert known_at(Plain(1, "x"), 0)

    grown = Grown(3, "kept")
    to_a, to_b = encode(grown, minor=0), encode(grown, minor=1)
    assert msgpack.unpackb(to_a[0].partition(b"\n")[2]) == {"seq": 3}
    assert msgpack.unpackb(to_b[0].partition(b"\n")[2]) == {"seq": 3, "note": "kept"}
    assert encode(grown) == to_b  # no minor: ours, every field
    # what the older peer was sent decodes here too: the later field takes its default
    assert decode(to_a)[0] == Grown(3, "")
    assert decode(to_b)[0] == grown


def test_a_peer_is_heard_again_when_it_is_upgraded(minor1: None, caplog) -> None:
    peers = PeerVersions()
    peers.heard("tcp://a:1", b"HV1.0")
    with caplog.at_level(logging.INFO, logger="hived.mesh.versions"):
        peers.heard("tcp://a:1", b"HV1.1")
    assert peers.version_of("tcp://a:1") == "1.1" and peers.minor_for("tcp://a:1") == 1
    assert "tcp://a:1 now speaks protocol 1.1 (was 1.0)" in caplog.text
    peers.heard("tcp://a:1", b"HV2.0")  # another major is refused, never believed
    peers.heard("tcp://a:1", b"junk")
    assert peers.version_of("tcp://a:1") == "1.1"


def test_the_version_table_is_bounded() -> None:
    peers = PeerVersions(max_peers=3)
    for i in range(5):
        peers.heard(f"tcp://p{i}:1", b"HV1.0")
    assert [peers.version_of(f"tcp://p{i}:1") for i in range(5)] == [None, None, "1.0", "1.0", "1.0"]


# -- receiving --------------------------------------------------------------------------


def test_any_minor_of_our_major_is_accepted() -> None:
    for version in (b"HV1.0", b"HV1.1", b"HV1.12"):
        assert decode(frame(version, b"T.PLAIN", {"seq": 1, "name": "n"}))[0] == Plain(1, "n")


def test_a_type_of_a_newer_minor_is_to_be_ignored() -> None:
    with pytest.raises(NewerMinorType, match="'M.LATER' of protocol 1.1 is newer than this node's 1.0") as info:
        decode(frame(b"HV1.1", b"M.LATER", {"x": 1}))
    assert info.value.type_name == b"M.LATER"


def test_an_unknown_type_from_our_minor_is_a_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type") as info:
        decode(frame(b"HV1.0", b"M.LATER", {}))
    assert not isinstance(info.value, NewerMinorType)


def test_an_unknown_type_from_an_older_minor_is_a_protocol_error(minor1: None) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type") as info:
        decode(frame(b"HV1.0", b"M.LATER", {}))
    assert not isinstance(info.value, NewerMinorType)


def test_fields_of_a_newer_minor_are_dropped() -> None:
    got, _ = decode(frame(b"HV1.1", b"T.PLAIN", {"seq": 1, "name": "n", "shiny": [1, 2]}))
    assert got == Plain(1, "n")


@pytest.mark.parametrize("version, minor", [(b"HV1.0", 0), (b"HV1.0", 1), (b"HV1.1", 1)])
def test_unknown_fields_from_our_minor_or_an_older_one_are_refused(
    version: bytes, minor: int
) -> None:
    with speaking(minor), pytest.raises(
        RemoteProtocolError,
        match=r"T.PLAIN has unknown field\(s\) 'shiny' \(protocol 1.\d\); expected only seq, name",
    ):
        decode(frame(version, b"T.PLAIN", {"seq": 1, "name": "n", "shiny": 1}))


@pytest.mark.parametrize("version", [b"HV1.0", b"HV1.1", b"HV1.9"])
def test_a_missing_field_is_an_error_whatever_the_minor(version: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="T.PLAIN lacks field 'name'"):
        decode(frame(version, b"T.PLAIN", {"seq": 1, "extra": 2}))


def test_a_newer_minor_still_gets_every_check() -> None:
    with pytest.raises(RemoteProtocolError, match="field 'seq' should be int, got str"):
        decode(frame(b"HV1.3", b"T.PLAIN", {"seq": "1", "name": "n"}))


def test_another_major_is_refused_naming_both_versions() -> None:
    for version, older in ((b"HV2.0", "this node"), (b"HV0.4", "that node")):
        theirs = parse_version(version)
        with pytest.raises(OtherMajorVersion) as info:
            decode(frame(version, b"T.PLAIN", {"seq": 1, "name": "n"}))
        assert info.value.theirs == theirs
        assert str(info.value) == (
            f"peer speaks protocol {theirs[0]}.{theirs[1]}, this node 1.0; nodes of another "
            f"major version do not interoperate: upgrade {older}"
        )


def test_a_type_of_a_newer_minor_is_counted_and_logged_once_per_peer(caplog) -> None:
    peers = PeerVersions()
    with caplog.at_level(logging.DEBUG, logger="hived.mesh.versions"):
        for _ in range(3):
            for sender in ("tcp://a:1", "tcp://b:1"):
                peers.heard(sender, b"HV1.1")
                peers.ignored(sender, b"M.LATER")
    assert peers.ignored_by_type == {"M.LATER": 6}
    lines = [r.getMessage() for r in caplog.records if r.name == "hived.mesh.versions"]
    assert lines == [
        "mesh: ignored M.LATER from tcp://a:1 (protocol 1.1): a newer minor's type, not ours",
        "mesh: ignored M.LATER from tcp://b:1 (protocol 1.1): a newer minor's type, not ours",
    ]
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "hived.mesh.versions")


# -- the refusal every major reads ---------------------------------------------------------


def test_a_refusal_names_the_refusers_version() -> None:
    assert refusal() == [b"HV1.0 M.REFUSED\n\x80"]
    assert refused_by(refusal()) == (1, 0)
    assert refused_by([b"HV2.3 M.REFUSED\n\x80"]) == (2, 3)
    assert refused_by([b"HV2.3 M.BEAT\n\x80"]) is None
    assert refused_by([b"HV2.3 M.REFUSED\n\x80", b"more"]) is None
    assert refused_by([b"junk"]) is None


@pytest.mark.parametrize("word, expected", [
    (b"HV1.0", (1, 0)), (b"HV12.34", (12, 34)), (b"HV1", None), (b"HV1.x", None),
    (b"HV-1.0", None), (b"XX1.0", None), (b"HV" + b"1" * 20 + b".0", None),
])
def test_parse_version(word: bytes, expected: tuple[int, int] | None) -> None:
    assert parse_version(word) == expected
    assert peer_version([word + b" T\n"]) == expected
