"""What tasks write reaches the caller, from real worker processes.

Everything a task writes to fds 1 and 2 (Python's print, os.write, C's
printf, a child process) comes to the caller, embedded and through a real daemon, and none
of it goes into the daemon's own log; a flood is cut short with a line that
says how much was dropped.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess

import msgpack
import pytest

import hived
from hived.node.taskoutput import BURST, MAX_LINE, Lines, Piece, Records
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

FLOOD_MIB = 64


def writes_everywhere(x):
    os.write(1, f"fd one {x}\n".encode())
    subprocess.run(["echo", f"child {x}"], check=True)
    libc = ctypes.CDLL(None)
    libc.printf(b"c printf %d\n", ctypes.c_int(x))
    print(f"half {x} ", end="")
    print("whole")
    os.write(2, f"fd two {x}\n".encode())
    return x


def logs(x):
    log = logging.getLogger("hived_tests.tasklog")
    log.warning("careful %d", x)
    log.info("not forwarded: the worker's loggers keep the default level")
    try:
        raise KeyError(x)
    except KeyError:
        log.exception("went wrong %d", x)
    return x


def dies_talking(_):
    os.write(2, b"last words\n")
    os._exit(3)


def floods(_):
    chunk = b"x" * 1023 + b"\n"
    for _ in range(FLOOD_MIB * 1024):
        os.write(1, chunk)
    return "done"


@pytest.fixture(params=["embedded", "daemon"])
def where(request, monkeypatch) -> tuple[str, object]:
    """An address and the daemon behind it (None when embedded). Workers get
    no PYTHONUNBUFFERED, which would leave C's stdout unbuffered: the worker
    must line-buffer it itself."""
    if request.param == "embedded":
        monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
        return "embedded", None
    env = child_env()
    del env["PYTHONUNBUFFERED"]
    daemon = request.getfixturevalue("make_daemon")(env=env)
    return daemon.address, daemon


def _gather(capfd, done) -> tuple[str, str]:
    out, err = "", ""

    def enough() -> bool:
        nonlocal out, err
        o, e = capfd.readouterr()
        out, err = out + o, err + e
        return done(out, err)

    wait_for(enough, 30, what="the tasks' output")
    return out, err


def test_everything_a_task_writes_reaches_the_caller(where, capfd):
    address, daemon = where
    with hived.connect(address) as hive:
        assert list(hive.map(writes_everywhere, range(3))) == [0, 1, 2]
        out, err = _gather(capfd, lambda o, e: o.count("whole") == 3 and e.count("fd two") == 3)
        node = re.escape(hive.node_name)
    prefix = "" if daemon is None else rf"\({node} pid=\d+\) "
    for i in range(3):
        for line in (f"fd one {i}", f"child {i}", f"c printf {i}", f"half {i} whole"):
            assert re.search(rf"^{prefix}{line}$", out, re.M), out
        assert re.search(rf"^{prefix}fd two {i}$", err, re.M), err
        assert f"fd two {i}" not in out and f"fd one {i}" not in err
    if daemon is not None:
        for word in ("fd one", "child", "c printf", "half", "whole", "fd two"):
            assert word not in daemon.log, daemon.log


def test_logging_records_reach_the_callers_logger_with_their_level(where, caplog):
    address, daemon = where
    with hived.connect(address) as hive:
        assert list(hive.map(logs, range(2))) == [0, 1]
        node = re.escape(hive.node_name)

        def mine() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "hived_tests.tasklog"]

        wait_for(lambda: len(mine()) == 4, 30, what="the tasks' records")
    prefix = "" if daemon is None else rf"\({node} pid=\d+\) "
    for x in range(2):
        (warning,) = [r for r in mine() if f"careful {x}" in r.getMessage()]
        assert warning.levelno == logging.WARNING and warning.levelname == "WARNING"
        assert re.fullmatch(rf"{prefix}careful {x}", warning.getMessage())
        (error,) = [r for r in mine() if f"went wrong {x}" in r.getMessage()]
        assert error.levelno == logging.ERROR
        assert "Traceback" in error.getMessage() and f"KeyError: {x}" in error.getMessage()
    if daemon is not None:
        for word in ("careful", "went wrong"):
            assert word not in daemon.log, daemon.log


def test_what_a_worker_wrote_before_it_died_reaches_the_caller(capfd):
    with hived.connect("embedded") as hive:
        with pytest.raises(hived.WorkerCrashed):
            list(hive.map(dies_talking, [0], retries=0))
        _, err = _gather(capfd, lambda o, e: "last words" in e)
    assert re.search(r"^last words$", err, re.M), err


def test_a_flood_is_cut_short_with_a_count(where, capfd):
    address, daemon = where
    with hived.connect(address) as hive:
        assert hive.submit(floods, 0).result(timeout=60) == "done"
        out, _ = _gather(capfd, lambda o, e: "dropped" in o)
    dropped = [int(n) for n in re.findall(r"\[hived: (\d+) bytes of this task's output dropped", out)]
    assert dropped, out[-500:]
    passed = out.count("x" * 1023)
    assert passed * 1024 < 2 * BURST, f"{passed} KiB passed"
    assert sum(dropped) >= (FLOOD_MIB << 20) - 2 * BURST
    if daemon is not None:
        assert "x" * 100 not in daemon.log


def test_lines_are_held_until_their_newline_and_long_ones_go_in_pieces():
    lines = Lines(1, 0.0)
    assert lines.feed(b"half ", 0.0) == []
    assert lines.feed(b"whole\nnext", 0.0) == [Piece(1, "half whole\n")]
    assert lines.flush() == [Piece(1, "next")]
    long = b"y" * (MAX_LINE + 1)
    assert lines.feed(long, 0.0) == [Piece(1, long.decode())]


def test_records_past_the_budget_are_counted_and_garbage_is_skipped():
    records, text, n = Records(0.0), "z" * MAX_LINE, BURST // MAX_LINE
    pipe = b"".join(msgpack.packb(["app", logging.ERROR, text]) for _ in range(n + 5))
    got = [p for at in range(0, len(pipe), 65536) for p in records.feed(pipe[at:at + 65536], 0.0)]
    assert got == [Piece(2, text, "app", logging.ERROR)] * n
    (notice,) = records.flush()
    assert notice.logger == "hived" and notice.level == logging.WARNING and " 5 log records" in notice.text
    assert records.feed(b"\xc1 not msgpack", 0.0) == []
    assert records.feed(msgpack.packb(["app", 20, "again"]), 1000.0)[-1] == Piece(2, "again", "app", 20)
