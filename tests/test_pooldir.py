"""A pool's directory outlives a killed node only until the next pool starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest import Daemon

from hived.node import pooldir
from hived.testing.childenv import child_env
from hived.testing.waiting import wait_for

OWNER = "from hived.node import pooldir; print(pooldir.make(), flush=True); input()"


def _owner(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_a_killed_owners_directory_is_swept_and_a_live_ones_kept(tmp_path) -> None:
    env = dict(child_env(), TMPDIR=str(tmp_path))  # only this test's directories are swept
    dead, live = _owner(env), _owner(env)
    try:
        dead_dir, live_dir = dead.stdout.readline().strip(), live.stdout.readline().strip()
        assert os.path.dirname(dead_dir) == os.path.dirname(live_dir) == str(tmp_path)
        # Named like a dead owner's, but a symlink; and one of another pid namespace.
        link = tmp_path / f"{pooldir.PREFIX}{pooldir.pid_namespace()}-1-0-link"
        link.symlink_to(live_dir)
        elsewhere = tmp_path / f"{pooldir.PREFIX}1-{os.path.basename(dead_dir).split('-')[3]}-0-other"
        elsewhere.mkdir()
        old_form = tmp_path / f"{pooldir.PREFIX}abc123"
        old_form.mkdir()
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        pooldir.sweep(str(tmp_path))
        assert not os.path.exists(dead_dir)
        assert os.path.isdir(live_dir) and link.is_symlink() and elsewhere.is_dir() and old_form.is_dir()
    finally:
        for proc in (dead, live):
            proc.kill()
            proc.wait()


def test_a_daemon_killed_with_kill_9_leaves_its_pool_directory_to_the_next_one() -> None:
    # A short TMPDIR of the test's own (pytest's paths are too long for ipc addresses).
    with tempfile.TemporaryDirectory(prefix="hp-", dir="/tmp") as tmp:
        _killed_then_swept(Path(tmp))


def _killed_then_swept(tmp_path: Path) -> None:
    env = dict(child_env(), TMPDIR=str(tmp_path))
    for name in ("first", "second"):
        (tmp_path / name).mkdir(mode=0o700)
    daemons = [Daemon(str(tmp_path / name), env=env) for name in ("first", "second")]
    try:
        first, second = daemons
        first.start()
        (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(pooldir.PREFIX)]
        first.kill()
        assert left.is_dir()  # nothing removed it: the node was killed
        second.start()
        wait_for(lambda: not left.exists(), 10, what=f"{left} swept by the next daemon")
        (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(pooldir.PREFIX)]
        assert any(kept.glob("worker-*.box"))  # the live one's own, untouched
        assert second.stop() == 0
        assert not kept.exists()  # and removed by its stop
    finally:
        for d in daemons:
            d.kill()

