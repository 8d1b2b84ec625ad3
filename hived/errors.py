"""Every error hived raises, in one place.

User-facing errors derive from `HiveError`. Protocol errors follow h11's split:
`LocalProtocolError` means our own caller misused us, `RemoteProtocolError`
means a peer sent something malformed or hostile; the latter is logged with the
peer's name and the peer is dropped, never allowed to crash the daemon.
"""

from __future__ import annotations

import concurrent.futures
import pickle
from concurrent.futures.process import BrokenProcessPool


class HiveError(Exception):
    """Base class of hived's own errors."""


# hived replaces a dead worker and fails only the task it ran, where
# ProcessPoolExecutor breaks the whole pool; the two classes below still
# derive from what ProcessPoolExecutor raises in their place (as loky's
# TerminatedWorkerError does), so handlers written for it catch them.


class WorkerCrashed(HiveError, BrokenProcessPool):
    """The process running a task died (segfault, OOM kill, os._exit) on every try."""


class TaskTimeout(HiveError, concurrent.futures.TimeoutError):
    """A result did not arrive within the caller's `timeout`."""


class JobCancelled(HiveError, concurrent.futures.CancelledError):
    """An operator cancelled the job (`hivectl cancel`): its undelivered items
    never will be. A CancelledError, as a future cancelled before it ran
    raises, so code written for an Executor's cancellation catches it."""


class HiveUnavailable(HiveError):
    """No daemon answered where one was named."""


class HivePermissionError(HiveError, PermissionError):
    """A daemon's control socket is there, but this user may not open it.

    Never a reason to fall back to an embedded hive: the user meant the daemon."""


class SerializationError(HiveError, pickle.PicklingError, BrokenProcessPool):
    """A function, argument or result could not be pickled or unpickled.

    ProcessPoolExecutor raises `pickle.PicklingError` where something will not
    pickle and `BrokenProcessPool` where it will not unpickle (in a worker, or
    a result in the caller): this is both."""


class RemoteError(HiveError):
    """Carries a remote traceback; set as `__cause__` of a task's own exception."""


class ConfigError(HiveError):
    """A configuration file, flag or environment variable is invalid."""


class LocalProtocolError(HiveError):
    """Our caller asked a protocol core for something it cannot do in its state."""


class RemoteProtocolError(HiveError):
    """A peer sent a malformed, truncated or hostile message.

    A node logs it and drops the message (or the peer); a client fails the
    call it concerns with it (a RESULT outside its chunk, say)."""


class OtherMajorVersion(RemoteProtocolError):
    """A peer speaks another major protocol version: nothing it sends is read.

    `theirs` is its (major, minor); the message names both versions."""

    def __init__(self, theirs: tuple[int, int], text: str) -> None:
        super().__init__(text)
        self.theirs = theirs


class NewerMinorType(RemoteProtocolError):
    """A message type this node does not know, from a peer of a newer minor:
    no fault of the peer's, so a node ignores it (the minors interoperate)."""

    def __init__(self, type_name: bytes, text: str) -> None:
        super().__init__(text)
        self.type_name = type_name
