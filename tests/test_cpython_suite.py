"""CPython's own concurrent.futures tests pass with hived.Hive as the executor.

tests/cpython_suite.py runs them; here each form of the suite runs under
the interpreter that ships it (the 3.13 package, the 3.10 single file), in
a process of its own: the tests reap children and count threads, and they
start interpreters of their own. The interpreters come from
tests/pythons.py (a venv of pyenv's where the one found lacks hived's
dependencies). The runs start together with tests/test_pythons.py's
(tests/subruns.py), last in the session; each test collects its own.

The suite takes about a minute per version alone (52 s on 3.13, 74 s on
3.10 on a 2-core machine), most of it in tests that wait
by design (a 6 s task against a 5 s map timeout, interpreters started to
test exit, crashed workers retried).
"""

from __future__ import annotations

import json
import os

import pytest
import subruns
from pythons import VENV_TIMEOUT

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUITE_TIMEOUT = 280  # seconds; the suite itself takes about 60

# version: (the suite's form, how many of its tests are generic, left out)
SUITES = {"3.13": ("package", 61, 15), "3.10": ("file", 55, 11)}
REPORT = "report.json"

subruns.declare(
    "test_cpython_executor_suite_passes_against_hive", SUITES,
    lambda out_dir: [os.path.join(HERE, "cpython_suite.py"), os.path.join(out_dir, REPORT)],
    SUITE_TIMEOUT,
)  # fmt: skip


@pytest.mark.timeout(SUITE_TIMEOUT + VENV_TIMEOUT)
@pytest.mark.parametrize("version", sorted(SUITES))
def test_cpython_executor_suite_passes_against_hive(version, subruns):
    form, generic, left_out = SUITES[version]
    run = subruns.result("test_cpython_executor_suite_passes_against_hive", version)
    out = os.path.join(run.out_dir, REPORT)
    assert run.returncode == 0 and os.path.exists(out), run.report(SUITE_TIMEOUT)
    with open(out) as f:
        report = json.load(f)
    print(
        f"CPython {report['python']} ({report['form']}): {report['collected']} generic tests, "
        f"{report['ran']} ran, {len(report['passed'])} passed, {len(report['left_out'])} left out, "
        f"{len(report['skipped_by_cpython'])} skipped by CPython itself, in {report['seconds']} s"
    )
    failures = "\n\n".join(f"{name}\n{tb}" for name, tb in report["failures"])
    assert not report["failures"], failures
    assert report["form"] == form
    # The same tests as when this was written: one renamed, added or gone
    # upstream is looked at, not silently counted.
    assert report["collected"] == generic, report
    assert len(report["left_out"]) == left_out, report["left_out"]
    assert len(report["passed"]) == report["ran"] > 0
