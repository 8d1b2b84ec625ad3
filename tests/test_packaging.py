"""What `pip install` gets: the distribution's name, its commands, its version,
py.typed and the Pythons it supports."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hived
from hived.testing.childenv import REPO, child_env

SUPPORTED = ("3.10", "3.11", "3.12", "3.13")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel of this checkout, built from a copy so the tree gets no build/."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        REPO, src,
        ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache"),
    )
    # Without isolation the build uses what is installed and needs no index.
    offline = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
         *(["--no-build-isolation"] if offline else []), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    built = list((tmp / "dist").glob("*.whl"))
    assert len(built) == 1, built
    return zipfile.ZipFile(built[0])


def _member(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_the_wheel_is_named_hived_mesh(wheel: zipfile.ZipFile) -> None:
    # `hived` on the package index is someone else's project.
    assert Path(wheel.filename).name.startswith(f"hived_mesh-{hived.__version__}-")
    metadata = dict(
        line.split(": ", 1) for line in _member(wheel, "METADATA").splitlines()[:20] if ": " in line
    )
    assert metadata["Name"] == "hived-mesh"
    assert metadata["Version"] == hived.__version__


def test_the_wheel_keeps_the_package_and_commands_named_hived(wheel: zipfile.ZipFile) -> None:
    assert "hived/__init__.py" in wheel.namelist()
    scripts = _member(wheel, "entry_points.txt")
    assert "hived = hived.daemon:main" in scripts
    assert "hivectl = hived.cli:main" in scripts



def test_the_wheel_ships_py_typed(wheel: zipfile.ZipFile) -> None:
    # PEP 561: without the marker, type checkers ignore hived's annotations.
    assert "hived/py.typed" in wheel.namelist()


TESTING = ("netns", "meshnet", "simnet", "campaign", "campaign_client", "childenv", "waiting")
# Fails the import of pytest and hypothesis (test-only dependencies), then imports TESTING.
WITHOUT_TEST_DEPENDENCIES = """
import importlib, sys
class NoTestDependencies:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("pytest", "_pytest", "hypothesis"):
            raise ImportError(f"{name} is a test-only dependency")
sys.meta_path.insert(0, NoTestDependencies())
for name in sys.argv[1:]:
    importlib.import_module(f"hived.testing.{name}")
"""


def test_the_wheel_ships_what_tests_and_benchmarks_share(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert {f"hived/testing/{m}.py" for m in ("__init__", *TESTING)} <= names
    assert not [n for n in names if n.startswith("tests/")]


def test_hived_testing_imports_without_pytest_or_hypothesis() -> None:
    out = subprocess.run([sys.executable, "-c", WITHOUT_TEST_DEPENDENCIES, *TESTING],
                         env=child_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_classifiers_name_every_supported_python_and_typed(wheel: zipfile.ZipFile) -> None:
    head = _member(wheel, "METADATA").split("\n\n", 1)[0]  # the headers, not the README
    fields = [line.split(": ", 1) for line in head.splitlines() if ": " in line]
    classifiers = {value for key, value in fields if key == "Classifier"}
    listed = {c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Programming Language :: Python :: 3.")}
    assert listed == set(SUPPORTED)
    assert "Typing :: Typed" in classifiers
    assert dict(fields)["Requires-Python"] == f">={SUPPORTED[0]}"

@pytest.mark.parametrize(("module", "command"), [("hived.daemon", "hived"), ("hived.cli", "hivectl")])
def test_both_commands_print_their_version(module: str, command: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        env=child_env(), capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{command} {hived.__version__}"


def test_no_doc_tells_anyone_to_install_the_name_hived() -> None:
    # A literal `pip install hived` fetches the unrelated project.
    docs = [Path(REPO, "README.md"), Path(REPO, "docs", "architecture.md"),
            *Path(REPO, "examples").rglob("*.md"), Path(REPO, "systemd", "hived.service")]
    for doc in docs:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            assert not re.search(r"pip install\s+hived(?![-\w])", line), (
                f"{os.path.relpath(doc, REPO)}:{number}: {line}"
            )
