"""What tasks emit: what workers write to fds 1 and 2, and `logging` records.

Theory of operation
-------------------
The pool starts each worker with fds 1 and 2 on pipes of its own, so
everything the task writes there reaches the pool: `print`, `os.write`, a C
library's `printf`, and the output of the task's own children, who inherit
the fds. The pool reads the pipes in its event loop, feeds the bytes to one
`Lines` per stream, and sends the whole lines to the caller of the task that
worker is running at that moment (as Ray's workers' output reaches the
driver), so nothing of the user's lands in the daemon's own log.

    worker's fds 1, 2 ──two pipes──▶ Lines.feed ───┐
                                                   ├─ Pieces ─▶ sink.on_output(job, piece, pid)
    root logger: RecordPipe ──pipe──▶ Records.feed ┘

A `logging` record a task emits goes, by a handler the worker puts on its
root logger, to a pipe of its own as msgpack [logger name, level, message
with its formatted exception]; the caller re-creates the record and hands
it to its logger of that name, so its level and handlers decide as they
would for a record of its own (as Dask's `forward_logging` does). The
worker's root logger keeps Python's default level, WARNING, so what a task
logs at INFO is forwarded only where the task lowers its logger's level.

Bounded: a line longer than MAX_LINE is passed on in pieces, so a stream
with no newline holds no more than that, and a record's message is cut at
MAX_LINE; each stream (and the records) may write BURST bytes at once and
RATE per second after that. Past that budget, output is dropped, and one
line (or record) saying how much was dropped comes in its place, so a task
that floods its stdout or its log cannot grow the node's or the caller's
memory without bound.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import msgpack

MAX_LINE = 64 * 1024  # bytes held waiting for a newline before they go as they are
RATE = 1 << 20  # bytes per second a stream may write, sustained
BURST = 8 << 20  # bytes a stream may write at once above RATE
RECORDS = 0  # the stream number of the record pipe (1 and 2 are stdout and stderr)
DROPPED = f"more than {BURST >> 20} MiB at once or {RATE >> 20} MiB/s"


class Piece(NamedTuple):
    """What a task emitted: text on its stdout (1) or stderr (2), or a
    `logging` record (`logger` set, on stream 2, `text` its message)."""

    stream: int
    text: str
    logger: str = ""
    level: int = 0


class Budget:
    """BURST bytes at once, refilled at RATE per second."""

    def __init__(self, now: float) -> None:
        self.left, self.at = float(BURST), now

    def take(self, n: int, now: float) -> bool:
        self.left = min(float(BURST), self.left + (now - self.at) * RATE)
        self.at = now
        if n > self.left:
            return False
        self.left -= n
        return True


class Lines:
    """One stream of one worker: bytes in, whole lines out, a flood dropped."""

    def __init__(self, stream: int, now: float) -> None:
        self.stream, self.budget = stream, Budget(now)
        self.partial = b""  # the start of a line whose newline has not come yet
        self.dropped = 0  # bytes dropped since the last line that said so

    def feed(self, data: bytes, now: float) -> list[Piece]:
        """The complete lines `data` ends (maybe none), with a drop notice first."""
        if not self.budget.take(len(data), now):
            # The line under way is broken anyway: drop it with the flood.
            self.dropped += len(data) + len(self.partial)
            self.partial = b""
            return []
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        if len(data) - cut > MAX_LINE:
            cut = len(data)
        self.partial = data[cut:]
        return self._pieces(data[:cut])

    def flush(self) -> list[Piece]:
        """What is held (a line with no newline yet, a drop count): the task ended."""
        data, self.partial = self.partial, b""
        return self._pieces(data)

    def _pieces(self, data: bytes) -> list[Piece]:
        text = data.decode(errors="replace")
        if self.dropped:
            text = f"[hived: {self.dropped} bytes of this task's output dropped: {DROPPED}]\n" + text
            self.dropped = 0
        return [Piece(self.stream, text)] if text else []


class Records:
    """A worker's record pipe: msgpack [logger, level, text] in, Pieces out."""

    def __init__(self, now: float) -> None:
        self.budget = Budget(now)
        self.unpacker = self._unpacker()
        self.dropped = 0  # records dropped since the last record that said so

    @staticmethod
    def _unpacker() -> Any:
        # A record's text is at most MAX_LINE characters, 4 bytes each in UTF-8.
        return msgpack.Unpacker(raw=False, max_buffer_size=8 * MAX_LINE)

    def feed(self, data: bytes, now: float) -> list[Piece]:
        pieces: list[Piece] = []
        try:
            self.unpacker.feed(data)
            for value in self.unpacker:
                if not _is_record(value):
                    raise ValueError("not a record")
                if not self.budget.take(len(value[2]), now):
                    self.dropped += 1
                    continue
                pieces.extend(self.flush())
                pieces.append(Piece(2, value[2], value[0], value[1]))
        except (ValueError, msgpack.UnpackException):
            # The task wrote to the pipe itself: what is in it is lost, and
            # records from here on are read again from a clean start.
            self.unpacker, self.dropped = self._unpacker(), self.dropped + 1
        return pieces

    def flush(self) -> list[Piece]:
        """A record saying how many were dropped, if any were."""
        if not self.dropped:
            return []
        text = f"hived: {self.dropped} log records of this task dropped: {DROPPED}"
        self.dropped = 0
        return [Piece(2, text, "hived", logging.WARNING)]


def _is_record(value: Any) -> bool:
    return (
        type(value) is list and len(value) == 3 and type(value[0]) is str and value[0] != ""
        and type(value[1]) is int and type(value[2]) is str
    )


class RecordPipe(logging.Handler):
    """In a worker, on the root logger: each record, to the pool's record pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        # the exception's text, as a caller's would show it (not Handler.formatter:
        # the message itself is sent unformatted)
        self.traceback_text = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self.traceback_text.formatException(record.exc_info)
            if record.stack_info:
                text += "\n" + self.traceback_text.formatStack(record.stack_info)
            data = memoryview(msgpack.packb([record.name, record.levelno, text[:MAX_LINE]]))
            while data:  # a pipe may take a large write in parts
                data = data[os.write(self.fd, data):]
        except Exception:
            self.handleError(record)


def emit_record(piece: Piece, prefix: str) -> None:
    """In the caller: a record a task emitted, re-created and handed to the
    logger of its name, which filters it by level as its own records."""
    logger = logging.getLogger(piece.logger)
    if logger.isEnabledFor(piece.level):
        logger.handle(logging.makeLogRecord({
            "name": piece.logger,
            "levelno": piece.level,
            "levelname": logging.getLevelName(piece.level),
            "msg": prefix + piece.text,
        }))
