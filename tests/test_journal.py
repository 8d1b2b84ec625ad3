"""hived.service.journal: the daemon's log lines under journald, and the lines its owner,
drains and stop write; with a real daemon whose stderr $JOURNAL_STREAM names."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hived
from hived.daemon import STACKS_WRITTEN
from hived.protocol.control import DrainRequest, UndrainRequest, ask
from hived.service.journal import JournalFormatter, configure, is_journal, priority, say
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


def stream_of(path: Path) -> str:
    """$JOURNAL_STREAM as systemd would set it for a stream that is this file."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


# -- the format ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "expected"),
    [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6),
     (logging.DEBUG, 7), (logging.INFO + 5, 6), (logging.WARNING - 1, 6), (1, 7)],
)
def test_levels_map_to_syslog_priorities(level: int, expected: int) -> None:
    assert priority(level) == expected


def test_every_line_of_a_record_carries_its_priority_and_none_a_timestamp() -> None:
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.getLogger("hived.node.pool").makeRecord(
            "hived.node.pool", logging.ERROR, __file__, 1, "worker %d: %s", (7, "two\nlines"),
            sys.exc_info(),
        )
    lines = JournalFormatter().format(record).split("\n")
    assert lines[:2] == ["<3>ERROR hived.node.pool: worker 7: two", "<3>lines"]
    assert lines[2] == "<3>Traceback (most recent call last):"
    assert lines[-2:] == ["<3>ValueError: bad", "<3>value"]
    assert all(line.startswith("<3>") for line in lines), lines
    assert not any(TIMESTAMP.search(line) for line in lines)


def test_journal_stream_must_name_this_very_stream(tmp_path: Path) -> None:
    ours, other = tmp_path / "ours.log", tmp_path / "other.log"
    ours.touch()
    other.touch()
    with open(ours, "a") as stream:
        assert is_journal(stream, {"JOURNAL_STREAM": stream_of(ours)})
        # inherited from a parent whose stderr was the journal: not ours
        assert not is_journal(stream, {"JOURNAL_STREAM": stream_of(other)})
        for junk in ("", "12", "a:b", ":", f"{stream_of(ours)}x", "-1:5"):
            assert not is_journal(stream, {"JOURNAL_STREAM": junk}), junk
        assert not is_journal(stream, {})
    assert not is_journal(io.StringIO(), {"JOURNAL_STREAM": stream_of(ours)})  # no fd at all


def test_a_pipe_is_a_stream_too() -> None:
    read, write = os.pipe()
    with os.fdopen(read) as reader, os.fdopen(write, "w") as writer:
        st = os.fstat(write)
        assert is_journal(writer, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        say("hived: no good", writer, environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        say("hived: fine", writer, logging.INFO, environ={})
        writer.close()
        assert reader.read() == "<3>hived: no good\nhived: fine\n"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, its handlers and level put back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("journal", [True, False], ids=["journald", "file"])
def test_configure_stamps_lines_unless_journald_does(
    tmp_path: Path, root_logger: logging.Logger, journal: bool
) -> None:
    path, elsewhere = tmp_path / "stderr", tmp_path / "elsewhere"
    elsewhere.touch()
    with open(path, "a") as stream:
        environ = {"JOURNAL_STREAM": stream_of(path if journal else elsewhere)}
        assert configure("info", stream, environ) is journal
        logging.getLogger("hived.test").warning("one\ntwo")
        logging.getLogger("hived.test").debug("not at info")
    text = path.read_text()
    if journal:
        assert text == "<4>WARNING hived.test: one\n<4>two\n"
    else:  # the format as before: one timestamp a record, on its first line
        first, second, end = text.split("\n")
        assert TIMESTAMP.match(first) and first.endswith(" WARNING hived.test: one"), text
        assert (second, end) == ("two", "")


# -- a daemon under journald -----------------------------------------------------------


def fails(x: int) -> int:
    raise RuntimeError(f"no {x}")


def slow(x: int) -> int:
    time.sleep(0.3)
    return x


def held(gate: str) -> str:
    """Runs until the file `gate` exists (a task that is surely running while the test acts)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return "released"


LINE = re.compile(r"<([2-7])>(CRITICAL|ERROR|WARNING|INFO|DEBUG) \S+: ")
LEVELS = {"CRITICAL": "2", "ERROR": "3", "WARNING": "4", "INFO": "6", "DEBUG": "7"}


def test_a_daemon_under_journald(make_daemon, tmp_path: Path) -> None:
    config = tmp_path / "hived.toml"
    config.write_text("[timing]\ndrain_timeout = 1.0\n")
    daemon = make_daemon("--config", str(config), "--log-level", "debug", start=False)
    Path(daemon.log_path).touch()  # its stderr: the file the fixture opens for appending
    daemon.env = child_env(JOURNAL_STREAM=stream_of(Path(daemon.log_path)))
    daemon.start()
    with hived.connect(daemon.address, reconnect_timeout=0) as h:
        assert list(h.map(abs, range(-30, 0))) == list(range(30, 0, -1))
        with pytest.raises(RuntimeError, match="no 3"):
            h.submit(fails, 3).result(timeout=30)
        results = h.map(slow, range(20), chunksize=1)
        assert next(results) == 0
        results.close()  # the caller leaves: the job is cancelled on its owner

        # a hivectl drain, its end once the last task ran, and the undrain
        gate = tmp_path / "gate"
        running = h.submit(held, str(gate))
        wait_for(lambda: daemon.status()["nodes"][0]["slots_busy"] == 1, 20, what="a task running")
        assert ask(daemon.address, DrainRequest(1, "testnode"), timeout=5).body == {"draining": "testnode"}
        gate.touch()
        assert running.result(timeout=30) == "released"
        wait_for(lambda: "drained: no task runs here any more" in daemon.log, 10, what="the drain's end")
        assert ask(daemon.address, UndrainRequest(2, "testnode"), timeout=5).body == {"undrained": "testnode"}

        os.kill(daemon.proc.pid, signal.SIGUSR1)
        wait_for(lambda: STACKS_WRITTEN in daemon.log, 10, what="the stacks")

        # stopped with a task running past drain_timeout
        stuck = h.submit(time.sleep, 60)
        wait_for(lambda: daemon.status()["nodes"][0]["slots_busy"] == 1, 20, what="a task running")
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log
        with pytest.raises(hived.HiveError):
            stuck.result(timeout=30)

    log = daemon.log
    lines = log.splitlines()
    stacks = [i for i, line in enumerate(lines) if line.startswith(("Thread 0x", "Current thread 0x"))]
    assert stacks, log
    stamped = [line for line in lines if TIMESTAMP.search(line)]
    assert not stamped, stamped  # journald stamps each line; ours would be a second time
    # Every line of ours carries the priority of its record, continuation lines too;
    # faulthandler's stacks come from C, bypass logging, and have none (the
    # unit's SyslogLevel=warning makes them warnings).
    end_of_stacks = lines.index(f"<4>WARNING hived: {STACKS_WRITTEN}")
    ours = lines[:stacks[0]] + lines[end_of_stacks:]
    for line in ours:
        assert line[:1] == "<", line
    for line in ours:
        found = LINE.match(line)
        if found:
            assert found[1] == LEVELS[found[2]], line

    job = r"job [0-9a-f]{8}/\d+"
    expected = [
        rf"<6>INFO hived\.node\.node: {job} started: abs, client \S+ pid {os.getpid()}, cpus=1 gpus=0 "
        r"retries=2, tasks as they come",
        rf"<6>INFO hived\.node\.node: {job} \(abs, client \S+ pid \d+\) finished after \d+\.\d\d s: "
        r"30 done, 0 failed, 0 cancelled",
        rf"<7>DEBUG hived\.node\.node: {job} started: fails, client .*, 1 task \(a submit\)",
        rf"<7>DEBUG hived\.node\.node: {job} \(fails, .*\) finished after \d+\.\d\d s: "
        r"0 done, 1 failed, 0 cancelled",
        rf"<6>INFO hived\.node\.node: {job} \(slow, .*\) cancelled \(its client cancelled it\) after "
        r"\d+\.\d\d s: "
        r"[1-9]\d* done, 0 failed, [1-9]\d* cancelled",
        r"<6>INFO hived\.node\.node: draining \(asked by testnode via hivectl\)",
        r"<6>INFO hived\.node\.node: drained: no task runs here any more",
        r"<6>INFO hived\.node\.node: drain ended \(asked by testnode via hivectl\)",
        r"<6>INFO hived: SIGTERM: draining",
        r"<6>INFO hived\.node\.node: draining to stop: 1 task\(s\) running may finish within "
        r"drain_timeout 1 s; nothing new starts",
        r"<4>WARNING hived\.node\.node: drain timeout: 1 task\(s\) still running after 1 s are stopped",
        rf"<7>DEBUG hived\.node\.node: {job} \(sleep, .*\) cancelled \(the node stopped\) after "
        r"\d+\.\d\d s: 0 done, 0 failed, 1 cancelled",
        # the two maps, the three submits; the tasks the workers ran to the end
        r"<6>INFO hived: hived stopped after \d+\.\d s: (\d+) task\(s\) run here, 5 job\(s\) "
        r"owned \(3 finished, 2 cancelled\), 0 worker crash\(es\)$",
    ]
    at = 0
    for pattern in expected:  # each once, in this order
        found = [i for i, line in enumerate(lines) if re.match(pattern, line)]
        assert len(found) == 1, f"{pattern!r}: {[lines[i] for i in found]}\n{log}"
        assert found[0] >= at, f"{pattern!r} out of order:\n{log}"
        at = found[0]
    run = int(re.match(expected[-1], lines[at])[1])
    assert 30 + 1 + 1 + 1 <= run < 30 + 1 + 20 + 1, lines[at]  # abs, fails, some of slow, held
