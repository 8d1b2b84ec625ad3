"""The suite's fast part under every other Python version hived declares.

CI runs the whole suite under one interpreter; here the tests of what
differs between versions (the wire and pickling, config parsing with
tomllib or tomli, the Executor and its maps, task output at the fd level,
the daemon's event loop and signals, the metrics responder on it) run again
under each other declared version, in a process of its
own, with the interpreters of tests/pythons.py. About a minute per version
on a 2-core machine, plus a venv to make where the interpreter lacks the
packages.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pythons import DECLARED, ROOT, VENV_TIMEOUT

FAST = ["test_wire.py", "test_serialization.py", "test_config.py", "test_map.py", "test_output.py",
        "test_daemon.py", "test_metrics.py"]  # fmt: skip
FAST_TIMEOUT = 420  # seconds; the part takes about 60 under each version
RUNNING = f"{sys.version_info.major}.{sys.version_info.minor}"


@pytest.mark.timeout(FAST_TIMEOUT + VENV_TIMEOUT + 30)
@pytest.mark.parametrize("version", [v for v in DECLARED if v != RUNNING])
def test_the_fast_part_passes_under_each_declared_python(version, python_of):
    python = python_of(version)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(os.path.join("tests", f) for f in FAST)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=FAST_TIMEOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"Python {version}: {run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-500:]}")
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
