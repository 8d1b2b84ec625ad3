"""A client must not hang or crash on what its daemon says (issue 9).

Against a fake daemon (a real ROUTER, tests/fakedaemon.py) that answers
wrongly, `hived.connect`, `submit`, `map` and hivectl end within a bounded
time with a HiveError (RemoteProtocolError where the daemon broke the
protocol) or their own right answer, never a raw KeyError, TypeError or
ValueError, and never a hang. The fuzz test at the end draws the fake's
answers from the message definitions.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fakedaemon import FakeDaemon, welcome
from hostile import ANY, Count, messages, registered
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hived
from hived import cli
from hived.config import DEFAULT_HEARTBEAT
from hived.errors import UNKNOWN_BLOB, HiveError, RemoteProtocolError
from hived.protocol import serialization
from hived.protocol.control import (
    LINK_TIMEOUT,
    AddChunk,
    Answer,
    Call,
    Hello,
    JobRefused,
    OpenJob,
    Output,
    Ping,
    Pong,
    Result,
    StatusQuery,
    Unwelcome,
    Welcome,
)
from hived.protocol.wire import encode

# A fake that never answers the job: the caller's 4 s, then the link's
# window for a node that answers no ping, then a heartbeat's slack.
BOUND = 4 + LINK_TIMEOUT + 1.5


def three() -> list[Any]:
    return serialization.dumps_result([3], "the result")


@pytest.fixture
def fake() -> Iterator:
    made: list[FakeDaemon] = []
    dirs: list[tempfile.TemporaryDirectory] = []

    def make(answer) -> FakeDaemon:
        tmp = tempfile.TemporaryDirectory(prefix="hived-fake-")
        dirs.append(tmp)
        made.append(FakeDaemon(tmp.name, answer))
        return made[-1]

    yield make
    for f in made:
        f.close()
    for tmp in dirs:
        tmp.cleanup()


def on_work(reply):
    """An answer: WELCOME to HELLO, `reply(fake, client, job, chunk)` to a CALL or CHUNK."""

    def answer(fake: FakeDaemon, client: bytes, msg: Any, payload: list[Any]) -> None:
        welcome(fake, client, msg, payload)
        if isinstance(msg, Call):
            reply(fake, client, msg.job, 0)
        elif isinstance(msg, AddChunk):
            reply(fake, client, msg.job, msg.chunk)

    return answer


def submit_abs(address: str) -> Any:
    """The issue's statement, timed: its value or its exception, and how long it took."""
    began = time.monotonic()
    try:
        with hived.connect(address, reconnect_timeout=0) as h:
            outcome: Any = h.submit(abs, -3).result(timeout=4)
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - began


SILENT_ANSWERS = {
    "welcome, then silence": lambda fake, client, job, chunk: None,
    "a result for another job": lambda fake, client, job, chunk: fake.send(
        client, Result(job + 1000, chunk, 0, 1, 0.01, 0), three()
    ),
}


@pytest.mark.parametrize("answer", SILENT_ANSWERS.values(), ids=SILENT_ANSWERS.keys())
def test_a_daemon_that_never_answers_the_job_ends_in_bounded_time(fake, answer) -> None:
    daemon = fake(on_work(answer))
    outcome, took = submit_abs(daemon.address)
    assert isinstance(outcome, (TimeoutError, HiveError)), repr(outcome)
    assert took < BOUND, took
    with hived.connect(daemon.address, reconnect_timeout=0) as h:  # waiting on it: the node is declared gone
        with pytest.raises(hived.HiveUnavailable, match="answered no ping"):
            h.submit(abs, -3).result(timeout=BOUND)


class Discard(io.TextIOBase):
    """Stands in for stdout where a fake floods the client with output."""

    written = 0

    def write(self, text: str) -> int:
        Discard.written += len(text)
        return len(text)


def test_an_output_flood_does_not_keep_a_dead_node_alive(fake, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", Discard())

    def flood(fake: FakeDaemon, client: bytes, job: int, chunk: int) -> None:
        fake.flood = encode(Output(job, 1, "spam\n" * 20, "fake pid=1"))

    daemon = fake(on_work(flood))
    outcome, took = submit_abs(daemon.address)
    assert isinstance(outcome, (TimeoutError, HiveError)), repr(outcome)
    assert took < BOUND, took
    assert Discard.written > 0  # the flood did reach the client, which printed it


MALFORMED = {
    "stop < start": (Result, dict(start=1, stop=0), "expected 0 <= start < stop"),
    "start=-5, stop=2**62": (Result, dict(start=-5, stop=2**62), "expected 0 <= start < stop"),
    "chunk=2**63": (Result, dict(chunk=2**63), "chunk"),
    "elapsed=nan": (Result, dict(elapsed=float("nan")), "elapsed=nan"),
    "elapsed=-1": (Result, dict(elapsed=-1.0), "elapsed=-1"),
    "failures=7": (Result, dict(failures=7), "failures=7"),
    "two values for one item": (Result, dict(payload=serialization.dumps_result([3, 4], "r")),
                                "2 values"),
    "not a list": (Result, dict(payload=serialization.dumps_result(3, "r")), "a int"),
}


@pytest.mark.parametrize("kind, fields, match", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_result_is_a_remote_protocol_error(fake, kind, fields, match) -> None:
    fields = dict(fields)
    payload = fields.pop("payload", three())

    def bad(fake: FakeDaemon, client: bytes, job: int, chunk: int) -> None:
        values = dict(job=job, chunk=chunk, start=0, stop=1, elapsed=0.01, failures=0)
        fake.send(client, kind(**{**values, **fields}), payload)

    daemon = fake(on_work(bad))
    outcome, took = submit_abs(daemon.address)
    assert isinstance(outcome, RemoteProtocolError), repr(outcome)
    assert match in str(outcome)
    assert took < 2, took
    with hived.connect(daemon.address) as h:  # a map fails the same way, at once
        with pytest.raises(RemoteProtocolError, match=match.replace("(", r"\(")):
            list(h.map(abs, [-1, -2, -3], chunksize=3, timeout=BOUND))


def test_unknown_blob_for_ever_is_answered_once(fake) -> None:
    def refuse(fake: FakeDaemon, client: bytes, msg: Any, payload: list[Any]) -> None:
        welcome(fake, client, msg, payload)
        if isinstance(msg, (Call, OpenJob)):
            fake.send(client, JobRefused(msg.job, UNKNOWN_BLOB, "no such function"))

    daemon = fake(refuse)
    outcome, took = submit_abs(daemon.address)
    assert isinstance(outcome, RemoteProtocolError), repr(outcome)
    assert "lacks the job's function" in str(outcome)
    assert took < 2, took
    calls = [m for m in daemon.received if isinstance(m, Call)]
    assert [c.has_blob for c in calls] == [True, True]  # sent, then sent once more, then no more
    with hived.connect(daemon.address) as h:
        with pytest.raises(RemoteProtocolError, match="lacks the job's function"):
            list(h.map(abs, [-1, -2], timeout=BOUND))


@pytest.mark.parametrize(
    "greeting, error, match",
    [
        (Welcome("fake", "7.0.0", 2, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []), HiveError, "hived 7.0.0 cannot work with hived"),
        (Welcome("fake", "banana", 2, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []), HiveError, "is not a hived release"),
        (Welcome("fake", "0.1.0", 2**62, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []), RemoteProtocolError, "slots"),
        (Welcome("fake", "0.1.0", -1, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []), RemoteProtocolError, "slots"),
        (Unwelcome("fake", "go away"), HiveError, "go away"),
    ],
)
def test_a_greeting_that_cannot_be_believed_is_refused(fake, greeting, error, match) -> None:
    def greet(fake: FakeDaemon, client: bytes, msg: Any, payload: list[Any]) -> None:
        if isinstance(msg, Hello):
            fake.send(client, greeting)

    daemon = fake(greet)
    with pytest.raises(error, match=match):
        hived.connect(daemon.address)


BAD_BODIES = [
    {},
    {"nodes": "x"},
    {"nodes": ["a row that is text"]},
    {"coordinator": "x", "nodes": []},
    {"coordinator": {"name": 5}, "nodes": []},
    {"nodes": [{"name": b"bytes"}]},
    {"jobs": 5},
    {"jobs": [{"id": "a", "owner": 1}]},
    {"error": {"not": "text"}},
    {"draining": 42},
]


def answering(body: dict) -> Any:
    def answer(fake: FakeDaemon, client: bytes, msg: Any, payload: list[Any]) -> None:
        welcome(fake, client, msg, payload)
        request = getattr(msg, "request", None)
        if request is not None:
            fake.send(client, Answer(request, body))

    return answer


def run_hivectl(address: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--connect", address, *args])
    return code, out.getvalue(), err.getvalue()


def check_hivectl(address: str, command: list[str]) -> None:
    """hivectl on whatever answer: its output, or one line `hivectl: ...` and exit 1."""
    code, out, err = run_hivectl(address, *command)
    if code:
        assert code == 1 and out == "", (code, out, err)
        assert err.startswith("hivectl: ") and err.count("\n") == 1, err
    else:
        assert err == "", err


@pytest.mark.parametrize("body", BAD_BODIES, ids=[repr(b)[:40] for b in BAD_BODIES])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["jobs"], ["jobs", "--json"],
                                     ["drain", "fake"]])
def test_hivectl_on_a_malformed_answer_gives_one_clear_line(fake, body, command) -> None:
    daemon = fake(answering(body))
    code, out, err = run_hivectl(daemon.address, *command)
    assert code == 1 and out == "", (out, err)
    assert err.startswith("hivectl: ") and err.count("\n") == 1, err


# -- fuzz: the fake's answers drawn from the message definitions --------------------

CONTROL_TYPES = registered(b"C.")
# The client's first job is 1, its first chunk 0; a submit's one item is [0, 1).
LIVE = {"job": [1, 2], "chunk": [0, 1, -1], "start": [0], "stop": [1, 2], "request": [1]}
counts = {"answers": Count("answers from a fake daemon"), "hivectl": Count("hivectl answers")}


@pytest.fixture(scope="module")
def fuzz_dir() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="hived-fuzz-") as tmp:
        yield tmp


def link_threads() -> list[threading.Thread]:
    """The I/O threads of socket links (other tests' clients may hold some)."""
    return [t for t in threading.enumerate() if t.name == "hived-link"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    greeting=st.none() | messages(registered(b"C.WELCOME") + registered(b"C.UNWELCOME"), LIVE),
    replies=st.lists(messages(CONTROL_TYPES, LIVE), max_size=8),
    finish=st.booleans(),
)
def test_fuzz_answers_from_a_daemon(fuzz_dir, greeting, replies, finish) -> None:
    """Whatever the daemon says, the client ends in bounded time with its
    right answer or a HiveError. The fake answers pings (so only what it
    says decides) and, with `finish`, ends with the right RESULT."""
    counts["answers"].add([m for m, _ in ([greeting] if greeting else []) + replies])

    def answer(fake: FakeDaemon, client: bytes, msg: Any, payload: list[Any]) -> None:
        if isinstance(msg, Hello):
            if greeting is not None:
                fake.send(client, *greeting)
            fake.send(client, Welcome("fake", "0.1.0", 2, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []))
        elif isinstance(msg, Ping):
            fake.send(client, Pong())
        elif isinstance(msg, (Call, AddChunk)):
            for reply in replies:
                fake.send(client, *reply)
            if finish:
                chunk = msg.chunk if isinstance(msg, AddChunk) else 0
                fake.send(client, Result(msg.job, chunk, 0, 1, 0.01, 0), three())

    links_before = set(link_threads())
    with tempfile.TemporaryDirectory(dir=fuzz_dir) as tmp, contextlib.redirect_stdout(Discard()):
        daemon = FakeDaemon(tmp, answer)
        try:
            began = time.monotonic()
            try:
                with hived.connect(daemon.address, reconnect_timeout=0) as h:
                    # A submitted call the node has runs to its end (the Executor
                    # contract: cancel() is False once it runs, and the `with`
                    # waits for it), so only a fake that finishes gets one; a
                    # map, which a caller may abandon, meets every fake.
                    if finish:
                        assert h.submit(abs, -3).result(timeout=1) == 3
                    try:
                        assert list(h.map(abs, [-3], timeout=1 if finish else 0.2)) == [3]
                    except hived.TaskTimeout:
                        pass
            except HiveError:
                pass
            took = time.monotonic() - began
            # connect's wait, the two 1 s waits, the link's close: well inside 8 s
            assert took < 8, f"the client took {took:.1f}s"
        finally:
            daemon.close()
    assert not set(link_threads()) - links_before, "a link thread outlived its Hive"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.dictionaries(st.sampled_from(["coordinator", "nodes", "jobs", "error", "draining", "x"]),
                         ANY, max_size=4)
    | st.builds(lambda rows: {"coordinator": None, "nodes": rows, "jobs": rows},
                st.lists(st.dictionaries(st.sampled_from(["name", "address", "state", "cpus", "id",
                                                          "owner", "queued"]), ANY), max_size=3)),
    command=st.sampled_from([["status"], ["status", "--json"], ["jobs"], ["jobs", "--json"],
                             ["drain", "fake"]]),
)
def test_fuzz_hivectl_answers(fuzz_dir, body, command) -> None:
    counts["hivectl"].add([Answer(1, body)])
    with tempfile.TemporaryDirectory(dir=fuzz_dir) as tmp:
        daemon = FakeDaemon(tmp, answering(body))
        try:
            check_hivectl(daemon.address, command)
        finally:
            daemon.close()


def test_fuzz_counts() -> None:
    """What the fuzz tests above tried (run with -s to see)."""
    for count in counts.values():
        print(count.report())


def test_a_status_query_to_the_fake_is_answered() -> None:
    """The fakes above answer what hivectl asks: a sanity check of the fixture."""
    with tempfile.TemporaryDirectory() as tmp:
        daemon = FakeDaemon(tmp, answering({"coordinator": None, "nodes": []}))
        try:
            code, out, err = run_hivectl(daemon.address, "status")
            assert code == 0, err
            assert "coordinator: none known" in out
            assert any(isinstance(m, StatusQuery) for m in daemon.received)
        finally:
            daemon.close()
