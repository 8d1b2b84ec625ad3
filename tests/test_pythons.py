"""The suite's fast part under every other Python version hived declares.

CI runs the whole suite under one interpreter; here the tests of what
differs between versions (the wire and pickling, config parsing with
tomllib or tomli, the Executor and its maps, task output at the fd level,
the daemon's event loop and signals, the metrics responder on it) run again
under each other declared version, in a process of its
own, with the interpreters of tests/pythons.py. The versions' runs start
together with the CPython suite's (tests/subruns.py), last in the session,
when the first of these tests is reached; each test collects its own.
About a minute per version alone on a 2-core machine, plus a venv to make
where the interpreter lacks the packages.
"""

from __future__ import annotations

import os
import sys

import pytest
import subruns
from pythons import DECLARED, VENV_TIMEOUT

FAST = ["test_wire.py", "test_serialization.py", "test_config.py", "test_map.py", "test_output.py",
        "test_daemon.py", "test_metrics.py"]  # fmt: skip
FAST_TIMEOUT = 420  # seconds; the part takes about 60 under each version
RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"
VERSIONS = [v for v in DECLARED if v != RUNNING]

subruns.declare(
    "test_the_fast_part_passes_under_each_declared_python", VERSIONS,
    lambda out_dir: ["-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.join("tests", f) for f in FAST)],
    FAST_TIMEOUT,
)  # fmt: skip


@pytest.mark.timeout(FAST_TIMEOUT + VENV_TIMEOUT + 30)
@pytest.mark.parametrize("version", VERSIONS)
def test_the_fast_part_passes_under_each_declared_python(version, subruns):
    run = subruns.result("test_the_fast_part_passes_under_each_declared_python", version)
    lines = run.output.strip().splitlines()
    print(f"Python {version}: {lines[-1] if lines else '(no output)'} ({run.seconds:.0f} s)")
    assert run.returncode == 0, run.report(FAST_TIMEOUT)
