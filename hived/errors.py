"""Every error hived raises, in one place, and the error kinds a node sends.

What each class means:

* `HiveError` and its subclasses are for users: what `except HiveError`
  catches is something that happened to their work or their setup (a
  crash, a timeout, no daemon, a bad config), never a bug of hived's.
* `RemoteProtocolError`: a peer or a node sent something malformed or
  hostile. A node logs it with the peer's name and drops the message (or
  the peer), never letting it crash the daemon; a client fails the call it
  concerns with it.
* `LocalProtocolError`: a client asked the node's job book for something
  the job's state does not allow (a chunk for a job that is not open, a
  repeat chunk). The node refuses that job (kind INVALID), which the
  client raises as a `HiveError`; nothing else is disturbed.
* `InternalError`: hived's own code broke one of its rules (an illegal
  state move, a broken invariant, a message type registered twice, a core
  built with settings its caller should have checked). Not a `HiveError`:
  a user's `except HiveError` does not hide it. It is a bug to report.

A node says why it failed items (C.ERROR) or refused a job (C.JOBERR) with
one of the error kinds at the end of this module; `error_type` is the one
place that turns a kind into the exception the caller gets.
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
    """A client asked for something its job's state does not allow; the node
    refuses the job with kind INVALID (see the module docstring)."""


class InternalError(Exception):
    """hived's own code broke one of its rules: a bug, never the user's doing.

    Deliberately not a `HiveError`, so that `except HiveError` does not
    swallow it."""


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


# The error kinds a node sends in C.ERROR and C.JOBERR (their `kind` field).
CRASHED = "crashed"  # the worker running the items died on every try
SERIALIZATION = "serialization"  # the function or an argument would not unpickle
UNAVAILABLE = "unavailable"  # no node of the hive can run the job (or it was lost)
CANCELLED = "cancelled"  # an operator cancelled the job (`hivectl cancel`)
INVALID = "invalid"  # the job's request broke the protocol
UNKNOWN_BLOB = "unknown-blob"  # the node lacks the job's function: send it along
STOPPED = "stopped"  # the node stops or drains: take the job to another
SHUTDOWN = "shutdown"  # the client's own: its hive was shut down mid-map
ERROR_KINDS = (CRASHED, SERIALIZATION, UNAVAILABLE, CANCELLED, INVALID, UNKNOWN_BLOB, STOPPED, SHUTDOWN)

_ERROR_TYPES: dict[str, type[HiveError]] = {
    CRASHED: WorkerCrashed,
    SERIALIZATION: SerializationError,
    UNAVAILABLE: HiveUnavailable,
    CANCELLED: JobCancelled,
}


def error_type(kind: str) -> type[HiveError]:
    """The exception a node's error `kind` becomes in the caller: `HiveError`
    for a kind with no class of its own, or one this release does not know."""
    return _ERROR_TYPES.get(kind, HiveError)
