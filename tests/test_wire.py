"""The wire format: round trips, and hostile frames become RemoteProtocolError only."""

from __future__ import annotations

import math
from typing import Annotated, Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hived.errors import HiveError, InternalError, RemoteProtocolError
from hived.mesh.matchmaking import Point, RangeDone, RangeLost, RangeMsg
from hived.protocol import control  # noqa: F401 - registers their message types
from hived.protocol.wire import Message, Rule, decode, encode, message, peer_version


@message(b"T.SAMPLE")
class Sample(Message):
    seq: int
    name: str
    tags: tuple[str, ...]
    load: float
    note: str | None  # noqa: UP007 - the wire checker reads typing forms too
    extra: dict[str, Any]


def test_round_trip_keeps_types_and_payload():
    msg = Sample(7, "n", ("a", "b"), 0.5, None, {"k": [1, 2]})
    got, payload = decode(encode(msg, [b"p1", b"p2"]))
    assert got == msg and payload == [b"p1", b"p2"]


def test_a_control_message_is_one_frame():
    assert len(encode(control.Ping())) == 1


@pytest.mark.parametrize(
    "frames, match",
    [
        ([], "empty"),
        ([b"GET / HTTP/1.1\r\n"], "not a hived message"),
        ([b"HV9.9 C.PING\n\x80"], "peer speaks protocol 9.9, this node 1.0; .* upgrade this node"),
        ([b"HV1.0 NOPE\n\x80"], "unknown message type"),
        ([b"HV1.0 C.PING"], "truncated"),
        ([b"HV1.0 T.SAMPLE\n\xc1"], "not msgpack"),
        ([b"HV1.0 T.SAMPLE\n" + msgpack.packb([1, 2])], "not a map"),
        ([b"HV1.0 T.SAMPLE\n" + msgpack.packb({"seq": 1})], "lacks field 'name'"),
        ([b"HV1.0 T.SAMPLE\n" + msgpack.packb(
            {"seq": "1", "name": "", "tags": [], "load": 1, "note": None, "extra": {}})],
         "field 'seq' should be int, got str"),
        ([b"HV1.0 T.SAMPLE\n" + msgpack.packb(
            {"seq": True, "name": "", "tags": [], "load": 1, "note": None, "extra": {}})],
         "field 'seq' should be int, got bool"),
        ([b"HV1.0 T.SAMPLE\n" + msgpack.packb(
            {"seq": 1, "name": "", "tags": [1], "load": 1, "note": None, "extra": {}})],
         "field 'tags'"),
        ([b"HV1.0 T.SAMPLE\n" + b"\x00" * (2 << 20)], "too large"),
    ],
)
def test_bad_frames_name_what_was_wrong(frames, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(frames)


def test_peer_version_reads_other_versions():
    assert peer_version([b"HV2.3 X\n"]) == (2, 3)
    assert peer_version([b"junk"]) is None


def test_registering_a_type_twice_is_an_internal_error_not_a_hive_error():
    with pytest.raises(InternalError, match="twice"):
        try:

            @message(b"T.SAMPLE")
            class Again(Message):
                x: int

        except HiveError:  # what a user's code catches: hived's own bug must get past it
            pytest.fail("a registration bug was caught as a HiveError")


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes_never_escape_as_anything_but_a_protocol_error(frames):
    try:
        decode(frames)
    except RemoteProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"T.SAMPLE", b"C.JOB", b"C.CHUNK", b"W.RUN", b"W.DONE", b"C.ANSWER"]),
    st.dictionaries(
        st.sampled_from(["seq", "name", "job", "fn", "chunk", "count", "start", "stop", "body",
                         "assignment", "has_blob", "tags", "load", "note", "extra"]),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text() | st.binary(),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
            max_leaves=8,
        ),
    ),
)
def test_hostile_headers_of_real_types_are_refused_cleanly(type_name, header):
    try:
        decode([b"HV1.0 " + type_name + b"\n" + msgpack.packb(header)])
    except RemoteProtocolError:
        pass


@pytest.mark.parametrize(
    "msg, match",
    [
        # a POINT naming an owner ZeroMQ cannot dial once reached sock.connect
        (Point(3, ["not an address"]), "'owners' should be a list of at most 16 tcp://host:port"),
        (Point(3, ["tcp://*:7700"]), "'owners' should be"),
        (Point(3, ["tcp://a:7700"] * 17), "at most 16"),
        (RangeMsg(1, 1, b"f", False, 5, 2, 1, 0, True), "range 5-2 ends before it starts"),
        (RangeDone(1, 0, 2**62, 0.1, 0), "'stop' should be a count"),
        (RangeDone(1, 0, 1, math.nan, 0), "'elapsed' should be a finite number"),
        (RangeLost(1, -4, "x"), "'crashed_at' should be an item index"),
    ],
)
def test_rules_in_a_message_definition_are_checked_where_it_is_decoded(msg, match):
    with pytest.raises(RemoteProtocolError, match=match):
        decode(encode(msg))


@message(b"T.RULED")
class Ruled(Message):
    small: Annotated[int, Rule("a small number", lambda v: 0 <= v < 10)]
    pair: list[int]

    def problem(self) -> str | None:
        return None if len(self.pair) == 2 else "pair should hold two numbers"


def test_a_rule_names_what_it_expects_and_what_came():
    assert decode(encode(Ruled(3, [1, 2])))[0] == Ruled(3, [1, 2])
    with pytest.raises(RemoteProtocolError, match="'small' should be a small number, got int 12"):
        decode(encode(Ruled(12, [1, 2])))
    with pytest.raises(RemoteProtocolError, match="T.RULED: pair should hold two numbers"):
        decode(encode(Ruled(1, [1])))
