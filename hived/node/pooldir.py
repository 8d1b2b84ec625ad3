"""A pool's directory, named after the process that owns it.

A node that dies without stopping its pool (kill -9, out of memory, a power
cut) cannot remove its directory. So the name says whose it is,
`hived-pool-<pid namespace>-<pid>-<start time>-<random>` (numbers in base
36, to keep it short), the start time
(from /proc/<pid>/stat) telling the owner apart from a later process given
the same pid; and a pool that starts removes its own user's directories
whose owner is gone. Only directories of its own pid namespace: a container
sharing the directory numbers its processes otherwise. Never another
user's, never a live owner's, never through a symlink;
two nodes sweeping at once only race to remove the same directory, which
both tolerate.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

PREFIX = "hived-pool-"


def _base36(n: int) -> str:
    digits = ""
    while True:
        n, d = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        if not n:
            return digits


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (base 36), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # Field 22; the name (field 2) may hold spaces and parentheses, so count after its end.
    fields = text[text.rfind(b")") + 2 :].split()
    return _base36(int(fields[19])) if len(fields) > 19 and fields[19].isdigit() else None


def pid_namespace() -> str:
    """This process's pid namespace (its inode), "0" where /proc does not say."""
    try:
        return _base36(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def owner_gone(name: str) -> bool:
    """Whether a directory named by `make` belongs to a process of our pid
    namespace that no longer runs. A name in another form (older hived), or
    of another namespace, says nothing we can check: never gone."""
    parts = name[len(PREFIX) :].split("-")
    if not name.startswith(PREFIX) or len(parts) != 4 or not parts[1].isalnum():
        return False
    return parts[0] == pid_namespace() and start_time(int(parts[1], 36)) != parts[2]


def sweep(parent: str) -> None:
    """Remove this user's pool directories under `parent` whose owner is gone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    uid = os.getuid()
    for entry in entries:
        if not owner_gone(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # removed meanwhile by another node's sweep
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            # rmtree works through directory fds and never follows a symlink inside.
            shutil.rmtree(entry.path, ignore_errors=True)


def make() -> str:
    """Clear away dead pools' directories, then make this process's own."""
    parent = tempfile.gettempdir()
    sweep(parent)
    pid = os.getpid()
    owner = f"{pid_namespace()}-{_base36(pid)}-{start_time(pid) or 0}"
    return tempfile.mkdtemp(prefix=f"{PREFIX}{owner}-", dir=parent)


def remove(path: str) -> None:
    """Remove a stopped pool's directory: its black boxes, then itself."""
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
