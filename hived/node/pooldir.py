"""A pool's directory, named after the process that owns it.

A node that dies without stopping its pool (kill -9, out of memory, a power
cut) cannot remove its directory. So the name says whose it is,
`hived-pool-<pid>-<start time>-<random>`, the start time (from
/proc/<pid>/stat) telling the owner apart from a later process given the same
pid; and a pool that starts removes its own user's directories whose owner is
gone. Never another user's, never a live owner's, never through a symlink;
two nodes sweeping at once only race to remove the same directory, which
both tolerate.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

PREFIX = "hived-pool-"


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot, or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    # Field 22; the name (field 2) may hold spaces and parentheses, so count after its end.
    fields = text[text.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def owner_gone(name: str) -> bool:
    """Whether a directory named by `make` belongs to a process that no longer runs.
    A name in another form (older hived) says nothing of its owner: never gone."""
    parts = name[len(PREFIX) :].split("-")
    if not name.startswith(PREFIX) or len(parts) != 3 or not parts[0].isdigit():
        return False
    return start_time(int(parts[0])) != parts[1]


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
    return tempfile.mkdtemp(prefix=f"{PREFIX}{pid}-{start_time(pid) or 0}-", dir=parent)


def remove(path: str) -> None:
    """Remove a stopped pool's directory: its socket and black boxes, then itself."""
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)
