"""Waiting on a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_for"]

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    what: str = "condition",
    ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    Raises ``AssertionError("timed out after Xs waiting for <what>")`` at the
    deadline.  Exceptions of the types in ``ignore`` count as "not yet" (the
    last one is chained to the AssertionError); any other exception propagates.
    The predicate is always tried at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        final = time.monotonic() >= deadline
        try:
            value = predicate()
        except ignore as exc:  # () catches nothing
            last_exc = exc
        else:
            if value:
                return value
        if final:
            detail = f" (last error: {last_exc!r})" if last_exc is not None else ""
            raise AssertionError(
                f"timed out after {timeout:g}s waiting for {what}{detail}"
            ) from last_exc
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))
