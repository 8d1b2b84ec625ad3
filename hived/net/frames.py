"""ZeroMQ frames as every socket sends them: what a frame is, and when not copying one pays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Frame = Any  # bytes-like, or a zmq.Frame
# pyzmq's zero-copy send costs a Python object per frame, more than copying a
# small frame does; from this size up, not copying pays.
ZERO_COPY_MIN = 64 * 1024


def zero_copy(frames: Sequence[Frame]) -> bool:
    """Whether sending `frames` without a copy pays: only when one is large."""
    return any(len(f) >= ZERO_COPY_MIN for f in frames)


def frame_bytes(frame: Frame) -> bytes:
    """The bytes of a frame, whether a zmq.Frame or a bytes-like object."""
    data = getattr(frame, "bytes", None)
    return data if isinstance(data, bytes) else bytes(frame)
