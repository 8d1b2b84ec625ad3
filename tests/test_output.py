"""What tasks write reaches the caller, from real worker processes.

Everything a task writes to fds 1 and 2 (Python's print, os.write, a child
process) comes to the caller, embedded and through a real daemon, and none
of it goes into the daemon's own log; a flood is cut short with a line that
says how much was dropped.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from netns import wait_for

import hived
from hived.taskoutput import BURST, Lines

FLOOD_MIB = 64


def writes_everywhere(x):
    os.write(1, f"fd one {x}\n".encode())
    subprocess.run(["echo", f"child {x}"], check=True)
    print(f"half {x} ", end="")
    print("whole")
    os.write(2, f"fd two {x}\n".encode())
    return x


def floods(_):
    chunk = b"x" * 1023 + b"\n"
    for _ in range(FLOOD_MIB * 1024):
        os.write(1, chunk)
    return "done"


@pytest.fixture(params=["embedded", "daemon"])
def where(request) -> tuple[str, object]:
    """An address and the daemon behind it (None when embedded)."""
    if request.param == "embedded":
        return "embedded", None
    daemon = request.getfixturevalue("daemon")
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
        for line in (f"fd one {i}", f"child {i}", f"half {i} whole"):
            assert re.search(rf"^{prefix}{line}$", out, re.M), out
        assert re.search(rf"^{prefix}fd two {i}$", err, re.M), err
        assert f"fd two {i}" not in out and f"fd one {i}" not in err
    if daemon is not None:
        for word in ("fd one", "child", "half", "whole", "fd two"):
            assert word not in daemon.log, daemon.log


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
    lines = Lines(0.0)
    assert lines.feed(b"half ", 0.0) == ""
    assert lines.feed(b"whole\nnext", 0.0) == "half whole\n"
    assert lines.flush() == "next"
    long = b"y" * (70 * 1024)
    assert lines.feed(long, 0.0) == long.decode()
