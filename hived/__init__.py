"""hived: a brokerless Python compute mesh on ZeroMQ.

    from hived import hive
    squares = list(hive.map(pow2, range(10_000)))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from hived.errors import (  # noqa: E402
    HiveError,
    HiveUnavailable,
    JobCancelled,
    SerializationError,
    TaskTimeout,
    WorkerCrashed,
)

__all__ = [
    "Hive",
    "HiveError",
    "HiveUnavailable",
    "JobCancelled",
    "SerializationError",
    "TaskTimeout",
    "WorkerCrashed",
    "__version__",
    "connect",
    "hive",
]


if TYPE_CHECKING:  # what __getattr__ below gives, for type checkers
    from hived.caller.client import Hive, connect, hive


def __getattr__(name: str) -> object:
    # The client pulls in zmq and threads; import it only when first used so
    # `import hived` stays cheap (worker processes import hived.node.worker only).
    if name in ("Hive", "connect", "hive"):
        from hived.caller import client

        return getattr(client, name)
    raise AttributeError(f"module 'hived' has no attribute {name!r}")
