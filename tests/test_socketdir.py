"""Who could have put a control socket where it is (hived.net.socketdir).

Run as root (as CI does), so that the directories can be given to another
user; as anyone else the tests that need that are skipped, never in CI.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hived.errors import HiveError
from hived.net.socketdir import check_socket, make_socket_dir

NOBODY = 65534
root_only = pytest.mark.skipif(
    os.geteuid() != 0 and os.environ.get("CI") != "true", reason="needs root to chown (CI runs it)"
)


def bound_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


def test_our_own_private_directory_is_trusted(tmp_path: Path) -> None:
    directory = tmp_path / "hived"
    make_socket_dir(str(directory / "hived.sock"))
    assert (directory.stat().st_mode & 0o777) == 0o750
    with bound_socket(directory / "hived.sock"):
        check_socket(str(directory / "hived.sock"))
    check_socket(str(directory / "absent.sock"))  # nothing there: nothing to trust or refuse


@root_only
def test_a_squatted_directory_is_refused_by_client_and_daemon(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o1777)  # as /tmp is
    squat = tmp_path / "hived-4242"
    squat.mkdir()
    os.chown(squat, NOBODY, NOBODY)
    os.chmod(squat, 0o777)
    path = squat / "hived.sock"
    with bound_socket(path):
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(HiveError) as raised:
            check_socket(str(path))
    message = str(raised.value)
    assert f"refusing control socket ipc://{path}" in message
    assert f"{squat} is owned by nobody (uid {NOBODY}) with mode 0777" in message
    assert f"`rm -r {squat}`" in message and "XDG_RUNTIME_DIR" in message
    with pytest.raises(HiveError, match=f"refusing to bind ipc://{path}: its directory {squat} is owned by"):
        make_socket_dir(str(path))


@root_only
def test_a_directory_root_made_for_the_daemon_user_is_trusted(tmp_path: Path) -> None:
    # /run/hived: systemd makes it in root's /run, for user hived, mode 0750.
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    directory = run / "hived"
    directory.mkdir(mode=0o750)
    os.chown(directory, NOBODY, NOBODY)
    path = directory / "hived.sock"
    with bound_socket(path):
        os.chown(path, NOBODY, NOBODY)
        check_socket(str(path))
        os.chmod(run, 0o1777)  # but not where anybody could have made it (as in /tmp)
        with pytest.raises(HiveError, match="another user could have put a socket there"):
            check_socket(str(path))


@root_only
def test_a_socket_of_another_user_in_our_directory_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hived.sock"
    with bound_socket(path):
        os.chown(path, NOBODY, NOBODY)
        with pytest.raises(HiveError, match="owned by nobody .*not the daemon's"):
            check_socket(str(path))


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_a_directory_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    directory = tmp_path / "hived"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(HiveError, match=f"so others could replace the socket; `chmod 0750 {directory}`"):
        check_socket(str(directory / "hived.sock"))
    with pytest.raises(HiveError, match="refusing to bind"):
        make_socket_dir(str(directory / "hived.sock"))


def test_a_directory_above_that_others_may_write_is_refused(tmp_path: Path) -> None:
    above = tmp_path / "shared"
    above.mkdir()
    os.chmod(above, 0o777)  # not sticky: anyone may move our directory aside
    (above / "hived").mkdir(mode=0o700)
    with pytest.raises(HiveError, match=f"{above} is owned by .* mode 0777, so another user could replace"):
        check_socket(str(above / "hived" / "hived.sock"))


def test_a_symlink_or_a_file_is_not_a_socket_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(HiveError, match="is not a directory"):
        check_socket(str(tmp_path / "link" / "hived.sock"))
    (tmp_path / "real" / "hived.sock").write_text("not a socket")
    with pytest.raises(HiveError, match="is not a socket"):
        check_socket(str(tmp_path / "real" / "hived.sock"))
