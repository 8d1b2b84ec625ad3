"""Looking inside an embedded hive from the caller's thread, as tests do."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from hived.caller.client import Hive

T = TypeVar("T")


def on_node_loop(hive: Hive, fn: Callable[[], T], timeout: float = 10.0) -> T:
    """Run `fn` on the loop of `hive`'s embedded node (whose state only that
    loop's thread may touch) and return what it returns, or raise what it raised."""
    node = hive.link.node
    done: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # handed to the caller's thread
            done.set_exception(exc)

    node.loop.call_soon_threadsafe(run)
    return done.result(timeout)


def pool_valid(hive: Hive) -> bool:
    """True when the embedded node's pool holds its invariants (`Pool.validate`);
    the InternalError naming those that do not hold, otherwise."""
    on_node_loop(hive, hive.link.node.pool.validate)
    return True
