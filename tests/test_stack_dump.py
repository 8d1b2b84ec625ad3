"""A hung daemon is diagnosable: SIGUSR1 writes every thread's stack to its log,
and a test that times out shows the stacks of the daemons it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import Daemon

from hived.daemon import STACKS_WRITTEN
from hived.protocol.control import StatusQuery, ask
from hived.testing.childenv import REPO, child_env
from hived.testing.waiting import wait_for

TESTS = os.path.dirname(os.path.abspath(__file__))

# A real daemon whose event loop gets stuck in one callback that never returns:
# its status reporter spins in pure Python as soon as the daemon serves.
WEDGED_DAEMON = """\
import sys
import hived.daemon

async def wedged_report(self):
    while True:
        pass

hived.daemon.Daemon._report = wedged_report
sys.exit(hived.daemon.main(sys.argv[1:]))
"""


def stacks_after(daemon: Daemon, offset: int) -> str:
    def written() -> str | None:
        text = daemon.log[offset:]
        return text if STACKS_WRITTEN in text else None

    return wait_for(written, 10, what=f"the stacks in the log:\n{daemon.log}")


def test_sigusr1_writes_every_threads_stack_and_the_daemon_goes_on(daemon: Daemon) -> None:
    offset = len(daemon.log)
    daemon.proc.send_signal(signal.SIGUSR1)
    stacks = stacks_after(daemon, offset)
    assert "(most recent call first):" in stacks
    assert "hived/daemon.py" in stacks and " in main" in stacks  # the main thread's frames
    assert daemon.status()["nodes"]
    assert daemon.proc.poll() is None


def test_sigusr1_reaches_a_daemon_whose_loop_is_wedged(make_daemon) -> None:
    wedged = make_daemon(start=False)
    i = wedged.args.index("-m")
    wedged.args[i : i + 2] = ["-c", WEDGED_DAEMON]
    wedged.start(wait=False)
    wait_for(lambda: " serving " in wedged.log, 20, what=f"hived to serve; log:\n{wedged.log}")
    assert ask(wedged.address, StatusQuery(1), timeout=0.5) is None  # wedged indeed
    offset = len(wedged.log)
    wedged.proc.send_signal(signal.SIGUSR1)
    stacks = stacks_after(wedged, offset)
    assert "in wedged_report" in stacks and " in main" in stacks


def test_a_test_that_times_out_shows_the_stacks_of_its_daemons(tmp_path: Path) -> None:
    (tmp_path / "test_hangs.py").write_text(textwrap.dedent("""\
        import time

        def test_hangs(daemon):
            time.sleep(60)
    """))
    # The suite's conftest as a plugin: its fixtures and its timeout hook.
    env = child_env(PYTHONPATH=os.pathsep.join([TESTS, REPO]))
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
         "--timeout=6", "-q", "--rootdir", str(tmp_path), str(tmp_path / "test_hangs.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 1, report
    assert "Timeout (>6.0s" in report, report
    section = report[report.index("Captured hived stacks timeout"):]
    assert "after SIGUSR1:" in section and "(most recent call first):" in section, report
    assert "hived/daemon.py" in section and " in main" in section, report
    assert STACKS_WRITTEN in section, report
