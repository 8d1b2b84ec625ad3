"""Local users against each other (issue 9): real processes under other uids.

`setpriv` runs the other side as another user: `nobody` squats the victim's
default control directory (/tmp/hived-UID, XDG_RUNTIME_DIR unset) and binds
a fake daemon whose answer runs code when unpickled; the victim's client,
hivectl and daemon must refuse that directory, and nothing may run as the
victim. Then `nobody` tries a root daemon's control socket and gets nowhere.

Needs root (to become other users) and a Python the other user can run with
this checkout's hived and its dependencies importable: CI runs as root and
never skips these; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import site
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from hived.testing.childenv import REPO, child_env
from hived.testing.waiting import wait_for

NOBODY = 65534
TESTS = os.path.dirname(os.path.abspath(__file__))


def unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the privilege tests must run in CI: {reason}")
    pytest.skip(reason)


def as_user(uid: int, argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        env=env, cwd="/", capture_output=True, text=True, **kw,
    )


def copy_dependencies(distribution: str, into: str) -> None:
    """Copy the installed files of what `distribution` needs to run (its
    requirements but the extras', and theirs) into one directory."""
    todo, seen = [distribution], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # a requirement for other platforms or Pythons
            continue
        if name != distribution:
            for file in dist.files or ():
                if not str(file).startswith(".."):  # scripts, outside site-packages
                    target = os.path.join(into, str(file))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(dist.locate_file(file), target, follow_symlinks=False)
        todo += [re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]
                 for r in dist.requires or () if "extra ==" not in r]


@pytest.fixture(scope="module")
def python() -> Iterator[tuple[str, dict[str, str]]]:
    """A Python and an environment in which another user imports this hived.

    Where the checkout or its venv lies in a directory other users cannot
    enter (a clone under a 0700 temp dir, say), a copy of hived, the tests
    and its dependencies go to a directory they can read."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        unavailable("needs root and setpriv to act as another user")
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, shutil.which(version, path="/usr/local/bin:/usr/bin")]
    with tempfile.TemporaryDirectory(prefix="hived-privilege-py-") as copy:
        os.chmod(copy, 0o755)
        repo, tests, packages = (os.path.join(copy, name) for name in ("repo", "tests", "site"))
        for paths in ([REPO, TESTS, *site.getsitepackages()], [repo, tests, packages]):
            if paths[0] == repo:
                shutil.copytree(os.path.join(REPO, "hived"), os.path.join(repo, "hived"), symlinks=True)
                shutil.copytree(TESTS, tests, symlinks=True)
                copy_dependencies("hived-mesh", packages)
            env = child_env()
            env["PYTHONPATH"] = os.pathsep.join(paths)
            for var in ("XDG_RUNTIME_DIR", "HIVED_ADDRESS", "HIVED_KEY_FILE"):
                env.pop(var, None)
            for candidate in candidates:
                probe = [candidate or "", "-c", "import hived.caller.client"]
                if candidate and as_user(NOBODY, probe, env).returncode == 0:
                    yield candidate, env
                    return
    unavailable(f"no Python that user nobody can run imports hived from {REPO} or a readable"
                f" copy (tried {sys.executable} and /usr/bin/{version})")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may use (pytest's own are root's alone)."""
    with tempfile.TemporaryDirectory(prefix="hived-privilege-") as tmp:
        os.chmod(tmp, 0o777)
        yield Path(tmp)


@pytest.fixture
def victim() -> Iterator[int]:
    """A uid of no one, whose default control directory nobody has made yet."""
    uid = 40000 + os.getpid() % 20000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if not os.path.exists(f"/tmp/hived-{uid}"):
                break
        uid += 1
    yield uid
    shutil.rmtree(f"/tmp/hived-{uid}", ignore_errors=True)


FAKE = """
import os, sys, zmq
from fakedaemon import FakeDaemon, welcome
from hived.protocol.control import Call, Result

class Payload:  # unpickling it makes the directory, as whoever unpickles it
    def __reduce__(self):
        return (os.mkdir, (sys.argv[2],))

def answer(fake, client, msg, payload):
    welcome(fake, client, msg, payload)
    if isinstance(msg, Call):
        import pickle
        fake.send(client, Result(msg.job, 0, 0, 1, 0.0, 0), [pickle.dumps([Payload()])])

os.umask(0)  # a socket anyone may connect to, as a squatter makes it
fake = FakeDaemon(sys.argv[1], answer)
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
fake.close()
"""

VICTIM_CLIENT = """
import hived
try:
    with hived.connect() as h:
        print("result", h.submit(abs, -3).result(timeout=10))
except hived.HiveError as exc:
    print("refused", exc)
"""


def test_a_squatted_control_directory_is_refused_by_client_hivectl_and_daemon(
    python, victim, shared: Path
) -> None:
    interpreter, env = python
    tmp_path = shared
    marker = tmp_path / "ran-as-victim"
    squat = f"/tmp/hived-{victim}"
    script = tmp_path / "fake.py"
    script.write_text(FAKE)
    # nobody gets there first: the directory, world-writable, and a fake daemon in it
    assert as_user(NOBODY, ["mkdir", "-m", "0777", squat], env).returncode == 0
    fake = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         interpreter, str(script), squat, str(marker)],
        env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert fake.stdout.readline() == "ready\n"
        client = tmp_path / "client.py"
        client.write_text(textwrap.dedent(VICTIM_CLIENT))
        out = as_user(victim, [interpreter, str(client)], env, timeout=60)
        assert out.stdout.startswith("refused refusing control socket ipc:///tmp/hived-"), out
        assert f"its directory {squat} is owned by nobody (uid {NOBODY}) with mode 0777" in out.stdout
        assert f"`rm -r {squat}`" in out.stdout
        assert not marker.exists(), "the fake daemon's payload ran as the victim"

        out = as_user(victim, [interpreter, "-m", "hived.cli", "status"], env, timeout=60)
        assert out.returncode == 1 and out.stdout == "", out
        assert out.stderr.startswith(f"hivectl: refusing control socket ipc://{squat}/hived.sock"), out

        data = tmp_path / "data"
        out = as_user(victim, [interpreter, "-m", "hived.daemon", "--bind", "tcp://127.0.0.1:0",
                               "--data-dir", str(data), "--cpus", "1", "--gpus", "0"], env, timeout=60)
        assert out.returncode == 1, out
        assert f"ipc://{squat}/hived.sock" in out.stderr and "owned by nobody" in out.stderr, out
        assert not marker.exists()
    finally:
        fake.stdin.close()
        try:
            fake.wait(10)
        except subprocess.TimeoutExpired:
            fake.kill()
            fake.wait()
        fake.stdout.close()


NOBODY_CLIENT = """
import os, sys, hived
try:
    with hived.connect(sys.argv[1]) as h:
        print("ran as", h.submit(os.getuid).result(timeout=10))
except hived.HiveError as exc:
    print("refused", type(exc).__name__, exc)
"""


def test_another_user_cannot_use_a_root_daemon(python, daemon, shared: Path) -> None:
    interpreter, env = python
    client = shared / "client.py"
    client.write_text(textwrap.dedent(NOBODY_CLIENT))
    for mode in (0o700, 0o755):  # the socket hidden, then in sight (mode 0660, root's)
        os.chmod(daemon.dir, mode)
        out = as_user(NOBODY, [interpreter, str(client), daemon.address], env, timeout=60)
        assert out.stdout.startswith("refused HivePermissionError permission denied: "), out
        assert out.stdout.endswith(" lets in only root; run as root\n"), out
        assert "ran as" not in out.stdout
        out = as_user(NOBODY, [interpreter, "-m", "hived.cli", "--connect", daemon.address, "status"],
                      env, timeout=60)
        assert out.returncode == 1 and out.stderr.startswith("hivectl: "), out
        assert out.stderr.count("\n") == 1, out
    os.chmod(daemon.dir, 0o700)
    row = daemon.status()["nodes"][0]
    assert row["tasks_done"] == 0 and row["state"] == "alive"
    wait_for(lambda: "Traceback" not in daemon.log, 1, what="a clean log")


GROUP_CLIENT = """
import hived
from hived.errors import HivePermissionError
try:
    with hived.connect() as h:
        print("ran on", h.node_name, h.submit(abs, -3).result(timeout=30))
except HivePermissionError as exc:
    print("denied", exc)
"""


def test_a_user_outside_the_daemons_group_is_told_so_not_given_an_embedded_hive(
    python, make_daemon, shared: Path
) -> None:
    """The system daemon's layout (RuntimeDirectoryMode=0750, Group=hived,
    UMask=0007) with a group nobody is not in, found the way a client finds
    a local daemon: the socket is there, so it is that daemon or an error."""
    interpreter, env = python
    group = next(g for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid)
                 if 0 < g.gr_gid < 1000 and "nobody" not in g.gr_mem)
    top = tempfile.mkdtemp(prefix="hived-group-")  # root's, in the sticky /tmp
    try:
        os.chmod(top, 0o755)
        runtime = os.path.join(top, "run")  # stands for /run: root's, 0755
        os.mkdir(runtime, 0o755)
        sock = os.path.join(runtime, "hived", "hived.sock")
        daemon = make_daemon("--control", f"ipc://{sock}", start=False)
        daemon.address = f"ipc://{sock}"
        daemon.start()
        os.chown(os.path.dirname(sock), 0, group.gr_gid)
        os.chown(sock, 0, group.gr_gid)
        os.chmod(sock, 0o770)
        client = shared / "client.py"
        client.write_text(textwrap.dedent(GROUP_CLIENT))
        user_env = dict(env, XDG_RUNTIME_DIR=runtime)
        in_group = f"lets in only root and group {group.gr_name}"
        fix = (f"and user nobody is not in it; add the user to the group "
               f"(`usermod -aG {group.gr_name} nobody`, as root) and log in again")
        for closed, mode, socket_mode in ((os.path.dirname(sock), 0o750, 0o770), (sock, 0o755, 0o770)):
            os.chmod(os.path.dirname(sock), mode)
            os.chmod(sock, socket_mode)
            head = (f"permission denied: the control socket ipc://{sock} is there, but {closed} "
                    f"(owner root, group {group.gr_name}, mode {os.stat(closed).st_mode & 0o777:04o})")
            out = as_user(NOBODY, [interpreter, str(client)], user_env, timeout=60)
            assert out.stdout == f"denied {head} {in_group}, {fix}\n", out
            out = as_user(NOBODY, [interpreter, "-m", "hived.cli", "status"], user_env, timeout=60)
            assert (out.returncode, out.stdout) == (1, ""), out
            assert out.stderr == f"hivectl: {head} {in_group}, {fix}\n", out
        # Joined the group after this login began: the primary group, not this process's.
        os.chown(sock, 0, NOBODY)
        out = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={group.gr_gid}", "--clear-groups",
             interpreter, str(client)], env=user_env, cwd="/", capture_output=True, text=True,
            timeout=60,
        )
        assert out.stdout.endswith("which user nobody joined after this login began; log in "
                                   f"again (or `newgrp {grp.getgrgid(NOBODY).gr_name}`)\n"), out
        # The fix: in the group, the user reaches the daemon.
        os.chown(sock, 0, group.gr_gid)
        out = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={group.gr_gid}",
             interpreter, str(client)], env=user_env, cwd="/", capture_output=True, text=True,
            timeout=60,
        )
        assert out.stdout == "ran on testnode 3\n", out
    finally:
        shutil.rmtree(top)
