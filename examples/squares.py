"""Square numbers on the hive: the local daemon if one runs, else an embedded one.

    python examples/squares.py
"""

import os

from hived import hive


def square(x: int) -> int:
    return x * x


def where(_: int) -> str:
    return f"pid {os.getpid()}"


if __name__ == "__main__":
    squares = list(hive.map(square, range(10_000)))
    print(f"sum of the first 10,000 squares: {sum(squares):,}")
    print(f"ran on {hive!r}")
    print("worker processes:", sorted(set(hive.map(where, range(100)))))
