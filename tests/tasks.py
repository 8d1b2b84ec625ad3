"""Task functions shared by the test modules (importable, so the peers'
executors reach them by reference; hived pickles them by value)."""

from __future__ import annotations

import time


def nap(seconds):
    time.sleep(seconds)
    return seconds


def nap_then(args):
    """Sleep, then return the value: (seconds, value)."""
    seconds, value = args
    time.sleep(seconds)
    return value
