"""The directory of an ipc:// control socket: who could have put a socket there.

A client hands its control socket code to run and unpickles what comes
back, so the socket must be its own daemon's (or the system service's),
never one that another user put there. With XDG_RUNTIME_DIR unset a user's
default socket lies in /tmp/hived-UID, a name any user can create first.
So, as tmux and OpenSSH do, both ends check a path before they use it:

- the socket's directory is a real directory (not a symlink), writable by
  its owner alone (no group or other write bit), and owned by a trusted
  user: this process's own user or root, or whoever owns the directory when
  its parent is writable by those two alone (then only they could have made
  it and handed it over: /run/hived, made by systemd for user hived);
- every directory above it is owned by a trusted user and writable by nobody
  else, or sticky (/tmp), so nobody can move the directory aside and put
  another in its place;
- the socket, where it exists, is a socket owned by a trusted user or by the
  directory's owner.

A client refuses a path that fails (`check_socket`, before it connects); a
daemon makes a missing directory itself and refuses to bind into one that
fails (`make_socket_dir`).

A socket that is there but closed to this user (the system daemon's, for a
user outside group `hived`) is a `HivePermissionError` naming the socket,
the group that may open it and the fix (`check_access`): such a user meant
the daemon, and must not be handed a one-node embedded hive in silence.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from hived.errors import HiveError, HivePermissionError

# Others may not add, remove or rename entries: no group or other write bit.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def check_access(path: str) -> bool:
    """Whether something is at `path`; raises HivePermissionError where
    something is, but this user may not connect to it (or cannot tell)."""
    path = os.path.abspath(path)
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except PermissionError:
        # A directory on the way lets us not in: find the first one.
        above = [str(d) for d in reversed(Path(path).parents)]
        closed = next(
            (d for d in above if not os.access(d, os.X_OK, effective_ids=True)), above[-1]
        )
        raise HivePermissionError(_denied(path, closed, stat.S_IXGRP)) from None
    if not os.access(path, os.W_OK, effective_ids=True):  # connecting needs write permission
        raise HivePermissionError(_denied(path, path, stat.S_IWGRP))
    return True


def _denied(path: str, closed: str, group_bit: int) -> str:
    """Why this user may not reach socket `path` past `closed`, and the fix."""
    st = os.stat(closed)
    owner, name, me = user_name(st.st_uid), group_name(st.st_gid), user_name(os.geteuid())
    try:
        members = grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        members = []
    head = (
        f"permission denied: the control socket ipc://{path} is there, but {closed} "
        f"(owner {owner}, group {name}, mode {stat.S_IMODE(st.st_mode):04o})"
    )
    if not st.st_mode & group_bit or st.st_gid == 0:  # group root: no group to join
        if owner == "root":
            return f"{head} lets in only root; run as root"
        return (
            f"{head} lets in only {owner}; run as {owner} or root, or, if {owner} is not the "
            f"daemon's user, remove it (`rm -r {closed}`, as root) and start hived again"
        )
    if me in members or _primary_gid(me) == st.st_gid:
        return (
            f"{head} lets in only {owner} and group {name}, which user {me} joined after this "
            f"login began; log in again (or `newgrp {name}`)"
        )
    return (
        f"{head} lets in only {owner} and group {name}, and user {me} is not in it; add the "
        f"user to the group (`usermod -aG {name} {me}`, as root) and log in again"
    )


def _primary_gid(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_socket(path: str) -> None:
    """Raise HiveError (naming the path and the fix) unless `path` is safe to
    connect to, HivePermissionError where this user may not connect to it."""
    check_access(path)
    problem = _directory_problem(path) or _socket_problem(path)
    if problem:
        raise HiveError(f"refusing control socket ipc://{path}: {problem}")


def make_socket_dir(path: str) -> None:
    """Make the directory of socket `path` (mode 0750) unless it is there;
    raise HiveError (naming the path and the fix) if another user could put
    a socket in it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.dirname(directory), exist_ok=True)
    try:
        os.mkdir(directory, 0o750)
    except FileExistsError:
        pass  # checked below like any other: it may be someone else's
    problem = _directory_problem(path)
    if problem:
        raise HiveError(f"refusing to bind ipc://{path}: {problem}")


def _trusted() -> set[int]:
    return {0, os.geteuid()}


def _directory_problem(path: str) -> str | None:
    directory = os.path.dirname(os.path.abspath(path))
    trusted = _trusted()
    above = parent = os.path.dirname(directory)
    while True:  # every directory above: nobody else may swap ours out
        try:
            st = os.stat(above)
        except OSError as exc:
            return f"cannot check {above}: {exc.strerror}"
        if above == parent:
            parent_st = st
        if st.st_uid not in trusted or (st.st_mode & _WRITABLE_BY_OTHERS and not st.st_mode & stat.S_ISVTX):
            return (
                f"{above} is {_described(st)}, so another user could replace {directory}; "
                f"make {above} writable by its owner alone (`chmod go-w {above}`) or use another place"
            )
        if above == os.path.dirname(above):
            break
        above = os.path.dirname(above)
    try:
        st = os.lstat(directory)
    except OSError as exc:
        return f"cannot check {directory}: {exc.strerror}"
    if parent_st.st_uid in trusted and not parent_st.st_mode & _WRITABLE_BY_OTHERS:
        trusted.add(st.st_uid)  # only a trusted user could have made it, for this owner
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory; remove it and start hived again"
    if st.st_uid not in trusted:
        return (
            f"its directory {directory} is {_described(st)}, so another user could have put a "
            f"socket there; remove it (`rm -r {directory}`, as root or its owner) and start "
            "hived again, or set XDG_RUNTIME_DIR to a directory of your own"
        )
    if st.st_mode & _WRITABLE_BY_OTHERS:
        return (
            f"its directory {directory} is {_described(st)}, so others could replace the socket; "
            f"`chmod 0750 {directory}`"
        )
    return None


def _socket_problem(path: str) -> str | None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None  # nothing there: nobody answers, nothing is trusted
    except OSError as exc:
        return f"cannot check it: {exc.strerror}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket; remove it and start hived again"
    if st.st_uid not in _trusted() | {os.stat(directory).st_uid}:
        return f"it is {_described(st)}, not the daemon's; remove it and start hived again"
    return None


def _described(st: os.stat_result) -> str:
    return f"owned by {user_name(st.st_uid)} (uid {st.st_uid}) with mode {stat.S_IMODE(st.st_mode):04o}"
