"""The daemon's log lines: a timestamp each, or journald's priority prefix.

Theory of operation
-------------------
On a terminal or in a file every line starts with its time. Under systemd,
stderr is a stream into journald, which stamps each line with its own time
(a second one of ours would only cost width) and reads a leading ``<N>`` as
the line's syslog priority (sd-daemon(3): ``<3>`` error, ``<4>`` warning,
``<6>`` info, ``<7>`` debug)::

    record ──▶ JournalFormatter ──▶ "<4>WARNING hived.node.pool: worker 812 ..."
                                    "<4>Traceback (most recent call last):"
                                    "<4>  File ..."            ──▶ stderr ──▶ journald

journald splits the stream into lines, so every line of a record carries
the prefix: a traceback's lines keep its record's priority instead of
taking the unit's default. systemd tells a service that its stderr is such
a stream in ``$JOURNAL_STREAM``, the device and inode of that stream as
``DEV:INODE`` in decimal (systemd.exec(5)); the variable is inherited, so a
process whose stderr was redirected elsewhere (a file in ExecStart, a
terminal) would see it too, which is why the stream itself is compared.

What writes to fd 2 without passing through `logging` (faulthandler's
stacks on SIGUSR1, the interpreter's own last words) has no prefix; the
unit's ``SyslogLevel=warning`` gives such lines a warning's priority.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TextIO

# logging's levels, highest first, and the syslog priority each maps to.
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7
# The current format: time first. Under journald the time is journald's.
TIMESTAMPED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
UNSTAMPED = "%(levelname)s %(name)s: %(message)s"


def priority(levelno: int) -> int:
    """The syslog priority of a `logging` level (a level between two takes the lower's)."""
    return next((p for level, p in PRIORITIES if levelno >= level), DEBUG_PRIORITY)


def is_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal stream that $JOURNAL_STREAM names."""
    device, colon, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (colon and device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or no fd (a StringIO)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def prefixed(text: str, levelno: int) -> str:
    """Every line of `text` with the priority prefix of `levelno`."""
    prefix = f"<{priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


class JournalFormatter(logging.Formatter):
    """No time (journald's is on every line); each line with the record's priority."""

    def __init__(self) -> None:
        super().__init__(UNSTAMPED)

    def format(self, record: logging.LogRecord) -> str:
        return prefixed(super().format(record), record.levelno)


def configure(level: str, stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Send the root logger's records to `stream` at `level`; True if that is journald."""
    journal = is_journal(stream, environ)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if journal else logging.Formatter(TIMESTAMPED))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return journal


def say(text: str, stream: TextIO, levelno: int = logging.ERROR,
        environ: Mapping[str, str] = os.environ) -> None:
    """Write one message that bypasses `logging` (a command's error or result line)
    to `stream`, with journald's prefix when `stream` is the journal."""
    stream.write((prefixed(text, levelno) if is_journal(stream, environ) else text) + "\n")
    stream.flush()
