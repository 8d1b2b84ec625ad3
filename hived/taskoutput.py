"""What worker processes write to their file descriptors 1 and 2, as lines.

Theory of operation
-------------------
The pool starts each worker with fds 1 and 2 on pipes of its own, so
everything the task writes there reaches the pool: `print`, `os.write`, a C
library's `printf`, and the output of the task's own children, who inherit
the fds. The pool reads the pipes in its event loop, feeds the bytes to one
`Lines` per stream, and sends the whole lines to the caller of the task that
worker is running at that moment (as Ray's workers' output reaches the
driver), so nothing of the user's lands in the daemon's own log.

    worker fd 1/2 ──pipe──▶ pool: Lines.feed ──lines──▶ sink.on_output(job, stream, text, pid)

Bounded: a line longer than MAX_LINE is passed on in pieces, so a stream
with no newline holds no more than that; and each stream may write BURST
bytes at once and RATE per second after that. Past that budget, output is
dropped, and one line saying how much was dropped comes in its place, so a
task that floods its stdout cannot grow the node's or the caller's memory
without bound.
"""

from __future__ import annotations

MAX_LINE = 64 * 1024  # bytes held waiting for a newline before they go as they are
RATE = 1 << 20  # bytes per second a stream may write, sustained
BURST = 8 << 20  # bytes a stream may write at once above RATE


class Lines:
    """One stream of one worker: bytes in, whole lines out, a flood dropped."""

    def __init__(self, now: float) -> None:
        self.partial = b""  # the start of a line whose newline has not come yet
        self.budget, self.at = float(BURST), now
        self.dropped = 0  # bytes dropped since the last line that said so

    def feed(self, data: bytes, now: float) -> str:
        """The complete lines `data` ends (maybe none), with a drop notice first."""
        self.budget = min(float(BURST), self.budget + (now - self.at) * RATE)
        self.at = now
        if len(data) > self.budget:
            # The line under way is broken anyway: drop it with the flood.
            self.dropped += len(data) + len(self.partial)
            self.partial = b""
            return ""
        self.budget -= len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        if len(data) - cut > MAX_LINE:
            cut = len(data)
        self.partial = data[cut:]
        return self._notice() + data[:cut].decode(errors="replace")

    def flush(self) -> str:
        """What is held (a line with no newline yet, a drop count): the task ended."""
        data, self.partial = self.partial, b""
        return self._notice() + data.decode(errors="replace")

    def _notice(self) -> str:
        if not self.dropped:
            return ""
        dropped, self.dropped = self.dropped, 0
        return (
            f"[hived: {dropped} bytes of this task's output dropped: "
            f"more than {BURST >> 20} MiB at once or {RATE >> 20} MiB/s]\n"
        )
