"""Interpreters of the Python versions hived declares, for tests that run under each.

An interpreter of a version is taken from HIVED_PYTHONS (paths,
space-separated), else found on PATH or under pyenv; where the one found
lacks what the tests import, a venv of it is made with this checkout's
dependencies (setup.cfg's install_requires) and those packages installed
(what a fresh machine needs: the README's test command stays the whole
install). The tests run hived from the checkout (PYTHONPATH), so it is not
built into the venv. Where no interpreter of the version
exists the test fails under CI (CI set) and is skipped with the reason
elsewhere, never passed.
"""

from __future__ import annotations

import configparser
import glob
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The versions setup.cfg's classifiers name; CI runs the whole suite on one.
DECLARED = ("3.10", "3.11", "3.12", "3.13")
# What a test under another interpreter imports, and the packages that give it.
NEEDS = "zmq, cloudpickle, msgpack, psutil, pytest, pytest_timeout, hypothesis, numpy"
PACKAGES = ("pytest", "pytest-timeout", "hypothesis", "numpy")
VENV_TIMEOUT = 240  # seconds to make a venv and install into it


def requirements() -> list[str]:
    """hived's dependencies as setup.cfg's install_requires names them."""
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"))
    lines = (line.split("#")[0].strip() for line in config["options"]["install_requires"].splitlines())
    return [line for line in lines if line]


def version_of(python: str) -> str | None:
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _candidates(version: str) -> list[str]:
    named = os.environ.get("HIVED_PYTHONS", "").split()
    pyenv = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    return [*named, sys.executable, f"python{version}", *pyenv]


def interpreter(version: str, venvs: str) -> str:
    """An interpreter of `version` that imports NEEDS (a venv made under
    `venvs` if need be), or fail/skip saying why."""
    problems, bare = [], None
    for python in _candidates(version):
        if version_of(python) != version:
            continue
        bare = bare or python
        deps = subprocess.run([python, "-c", f"import {NEEDS}"], capture_output=True, text=True, timeout=60)
        if deps.returncode == 0:
            return python
        problems.append(f"{python} lacks a dependency ({deps.stderr.strip().splitlines()[-1]})")
    if bare is not None:
        venv = os.path.join(venvs, f"python{version}")
        made = _make_venv(bare, venv)
        if made.returncode == 0:
            return f"{venv}/bin/python"
        problems.append(f"a venv of {bare} failed: {made.stderr.strip()[-500:]}")
    reason = (
        f"no Python {version} that imports {NEEDS} ({'; '.join(problems) or 'none found'}): "
        f"make one with `python{version} -m venv V && V/bin/pip install -e . {' '.join(PACKAGES)}` "
        f"and name V/bin/python in HIVED_PYTHONS"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _make_venv(python: str, venv: str) -> subprocess.CompletedProcess:
    command = (
        f"{shlex.quote(python)} -m venv {shlex.quote(venv)} && {shlex.quote(venv)}/bin/python -m pip install -q "
        + " ".join(shlex.quote(r) for r in (*requirements(), *PACKAGES))
    )
    return subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=VENV_TIMEOUT, stdin=subprocess.DEVNULL
    )
