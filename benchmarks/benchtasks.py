"""The benchmark's task functions, importable by every engine's workers."""

from __future__ import annotations

from typing import Any


def identity(x: Any) -> Any:
    return x


def burn(n: int) -> int:
    """Pure-Python CPU work, n loop turns."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def burn_where(n: int) -> int:
    """burn(n), then say which process did it."""
    import os

    burn(n)
    return os.getpid()


def nbytes(array: Any) -> int:
    return int(array.nbytes)
