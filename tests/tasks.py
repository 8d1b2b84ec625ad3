"""Task functions shared by the test modules (importable, so the peers'
executors reach them by reference; hived pickles them by value)."""

from __future__ import annotations

import os
import pickle
import sys
import time


def nap(seconds):
    time.sleep(seconds)
    return seconds


def nap_then(args):
    """Sleep, then return the value: (seconds, value)."""
    seconds, value = args
    time.sleep(seconds)
    return value


def mark_then_nap(args):
    """Create the file `path` (the call has started), sleep, return the value."""
    path, seconds, value = args
    open(path, "a").close()
    time.sleep(seconds)
    return value


def append_line(path, text="x"):
    with open(path, "a") as f:
        f.write(text + "\n")


class Buffer(bytearray):
    """A weakly referable argument whose bytes travel out of band, as a numpy
    array's do (so an executor that keeps its frames keeps it alive)."""

    def __reduce_ex__(self, protocol):
        if protocol >= 5:
            return type(self), (pickle.PickleBuffer(self),)
        return type(self), (bytes(self),)


def length(data):
    return len(data)


class Thing:
    """A weakly referable result."""


def make_thing(_=None):
    return Thing()


class ExitAtPickle:
    """A result whose pickling calls sys.exit."""

    def __reduce__(self):
        sys.exit(3)


def log_then_return_exit_at_pickle(path):
    append_line(path)
    return ExitAtPickle()


class FailAtPickle:
    """An argument whose pickling fails (with PicklingError, as CPython's test has it)."""

    def __reduce__(self):
        raise pickle.PicklingError("refused by FailAtPickle")


def crash():
    os._exit(9)


SHARED = ValueError("one instance, raised by every call")


def raise_shared(_=None):
    raise SHARED
