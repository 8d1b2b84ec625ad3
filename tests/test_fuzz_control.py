"""Fuzz: control messages from a hostile local client against a real daemon.

Each example is a batch from one fresh DEALER: maybe a HELLO (so later
messages reach the handlers behind it), then messages of every registered
type (tests/hostile.py draws them from the definitions, so a new type is
fuzzed without new code here), then maybe a BYE. After every batch the
daemon must be alive, answer a status query within 2 s, run a map right
through a good client, have logged no traceback, and stay within a memory
bound. The counts are printed at the end (-s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest
import zmq
from hostile import Count, messages, registered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hived
from hived.protocol.control import Bye, Hello, StatusQuery, ask
from hived.protocol.wire import encode

# The daemon's own memory may grow this much over a fuzz run: what it holds
# of a hostile client is small and goes with the client.
MEMORY_BOUND = 64 << 20
NAME = "fuzzed-node-7f3a"  # no drawn DRAIN names it: draining is a HELLO'd client's right
LIVE = {"job": [1, 2, 3], "chunk": [0, 1, -1], "request": [1, 2], "has_blob": [True]}
count = Count("control messages from a local client")


def square(x: int) -> int:
    return x * x


@pytest.fixture
def target(make_daemon) -> Iterator:
    """One daemon for the whole fuzz run (hypothesis calls the test once per
    example inside one test call), and a good client of it."""
    daemon = make_daemon("--name", NAME)
    ctx = zmq.Context()
    try:
        with hived.connect(daemon.address) as good:
            assert list(good.map(square, range(10))) == [x * x for x in range(10)]
            baseline = psutil.Process(daemon.proc.pid).memory_info().rss
            yield daemon, good, ctx, baseline
    finally:
        ctx.term()
    print(count.report())


def healthy(daemon, good, baseline: int) -> None:
    assert daemon.proc.poll() is None, f"hived died; log:\n{daemon.log}"
    began = time.monotonic()
    answer = ask(daemon.address, StatusQuery(99), timeout=2)
    assert answer is not None and time.monotonic() - began < 2, "no status within 2 s"
    assert answer.body["nodes"][0]["name"] == NAME
    assert list(good.map(square, range(20), timeout=30)) == [x * x for x in range(20)]
    log = daemon.log
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]
    grown = psutil.Process(daemon.proc.pid).memory_info().rss - baseline
    assert grown < MEMORY_BOUND, f"hived grew by {grown >> 20} MiB"


# Control types three times as often as the rest: those are what the handlers behind HELLO take.
HOSTILE = st.one_of(*[messages(registered(b"C."), LIVE)] * 3, messages(registered(), LIVE))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hello=st.booleans(),
    batch=st.lists(HOSTILE, min_size=1, max_size=20),
    bye=st.booleans(),
)
def test_fuzz_control_messages(target, hello, batch, bye) -> None:
    daemon, good, ctx, baseline = target
    sent = ([(Hello("fuzzer", hived.__version__), [])] if hello else []) + batch
    sent += [(Bye(), [])] if bye else []
    count.add([m for m, _ in sent])
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 2000  # what is queued goes out before the socket closes
    try:
        sock.connect(daemon.address)
        for msg, payload in sent:
            sock.send_multipart(encode(msg, payload))
    finally:
        sock.close()
    healthy(daemon, good, baseline)
