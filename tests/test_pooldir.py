"""A pool's directory outlives a killed node only until the next pool starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from hived.node import pooldir
from hived.testing.childenv import child_env

OWNER = "from hived.node import pooldir; print(pooldir.make(), flush=True); input()"


def test_a_killed_owners_directory_is_swept_and_a_live_ones_kept(tmp_path) -> None:
    os.environ["TMPDIR"] = str(tmp_path)  # only this test's directories are swept
    try:
        dead = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=child_env())
        live = subprocess.Popen([sys.executable, "-c", OWNER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=child_env())
        dead_dir, live_dir = dead.stdout.readline().strip(), live.stdout.readline().strip()
        os.symlink(live_dir, os.path.join(os.path.dirname(live_dir), "hived-pool-1-0-link"))
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        pooldir.sweep(os.path.dirname(dead_dir))
        assert not os.path.exists(dead_dir)
        assert os.path.isdir(live_dir)
    finally:
        os.environ.pop("TMPDIR")
        for proc in (dead, live):
            proc.kill()
            proc.wait()
