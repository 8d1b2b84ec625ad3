"""The Python API: `hived.connect()` and `hive`, a concurrent.futures.Executor.

`connect()` finds a node the way DESIGN.md says (HIVED_ADDRESS, else the
local daemon's control socket if a daemon answers there, else an embedded
node in this process) and returns a `Hive`. A Hive turns `submit` and `map`
into jobs on that node: `map` is a `MapStream` read in the caller's thread;
`submit` is a one-item job whose result completes a real
`concurrent.futures.Future` on the link's thread.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hived import __version__, serialization
from hived.config import local_control_addresses
from hived.control import (
    AddChunk,
    CancelJob,
    CloseJob,
    Hello,
    ItemsFailed,
    JobRefused,
    OpenJob,
    Output,
    Result,
    Welcome,
)
from hived.errors import HiveError, HiveUnavailable
from hived.links import EmbeddedLink, SocketLink
from hived.mapping import FAILURE_TYPES, MapStream, raise_for
from hived.node import NodeSettings
from hived.resources import detect_gpus, usable_cpus
from hived.wire import Message, decode, encode
from hived.worker import KEYWORDS

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
CONNECT_TIMEOUT = 2.0


class Hive(concurrent.futures.Executor):
    """A connection to one node of a hive (or an embedded one)."""

    def __init__(self, address: str | None = None, *, key_file: str | None = None) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}
        self._job_numbers = itertools.count(1)
        self._sent_fns: set[bytes] = set()
        self._welcome = threading.Event()
        self._futures: set[concurrent.futures.Future] = set()
        self._closed = False
        self.node_name = ""
        self.slots = 1
        self.link = self._open_link(address, key_file)

    def _open_link(self, address: str | None, key_file: str | None) -> Any:
        address = address or os.environ.get("HIVED_ADDRESS") or None
        if address is None:
            for control in local_control_addresses():
                if not os.path.exists(control[len("ipc://") :]):
                    continue  # no socket file: no daemon, and no time spent asking
                try:
                    return self._socket_link(control, key_file)
                except HiveUnavailable:
                    log.info("no daemon answered at %s", control)
            address = EMBEDDED
        self.address = address
        if address == EMBEDDED:
            settings = NodeSettings(cpus=usable_cpus(), gpus=detect_gpus())
            return self._greet(EmbeddedLink(settings, self._on_frames))
        return self._socket_link(address, key_file)

    def _socket_link(self, address: str, key_file: str | None) -> SocketLink:
        """A link to a daemon, once it has answered our HELLO."""
        if not (address.startswith("ipc://") or address.startswith("tcp://")):
            raise HiveError(
                f"address {address!r}: expected 'embedded', 'ipc://PATH' or 'tcp://HOST:PORT'"
            )
        self.address = address
        return self._greet(SocketLink(address, self._on_frames))

    def _greet(self, link: Any) -> Any:
        """Say HELLO on `link` and wait for the node's WELCOME."""
        link.send(encode(Hello(f"{socket.gethostname()} pid {os.getpid()}", __version__)))
        if not self._welcome.wait(CONNECT_TIMEOUT):
            link.close()
            raise HiveUnavailable(_no_daemon(self.address))
        return link

    # -- messages from the node (on the link's thread) ------------------------

    def _on_frames(self, frames: list[Any]) -> None:
        try:
            msg, payload = decode(frames)
        except HiveError as exc:
            log.warning("dropped a malformed message from %s: %s", self.address, exc)
            return
        if isinstance(msg, Welcome):
            self.node_name, self.slots = msg.node, max(msg.slots, 1)
            self._welcome.set()
        elif isinstance(msg, Output):
            stream = sys.stdout if msg.stream == 1 else sys.stderr
            for line in msg.text.splitlines(keepends=True):
                stream.write(f"({msg.source}) {line}")
            stream.flush()
        else:
            target = self._streams.get(getattr(msg, "job", None))
            if target is not None:
                target.deliver(msg, payload)
            elif hasattr(msg, "request"):
                target = self._streams.get(("request", msg.request))
                if target is not None:
                    target.deliver(msg, payload)

    # -- jobs -----------------------------------------------------------------

    def _open_job(
        self, fn: Callable[..., Any], cpus: int, gpus: int, retries: int
    ) -> tuple[int, Callable[[bool], list[Any]]]:
        """A job number and the function that makes its OpenJob message.

        The function's blob rides along the first time this client uses it,
        or when `force_blob` says the node lost it.
        """
        _check_count("cpus", cpus, 1)
        _check_count("gpus", gpus, 0)
        _check_count("retries", retries, 0)
        blob, digest = serialization.dumps_function(fn)
        job = next(self._job_numbers)
        label = getattr(fn, "__qualname__", type(fn).__name__)

        def open_job(force_blob: bool = False) -> list[Any]:
            with self._lock:
                has_blob = force_blob or digest not in self._sent_fns
                self._sent_fns.add(digest)
            msg = OpenJob(job, digest, has_blob, cpus, gpus, retries, label)
            return encode(msg, [blob] if has_blob else [])

        return job, open_job

    def _forget(self, job: int) -> None:
        self._streams.pop(job, None)

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        ordered: bool = True,
        timeout: float | None = None,
        cpus: int = 1,
        gpus: int = 0,
        retries: int = 2,
        progress: bool = False,
    ) -> Iterator[Any]:
        """Like builtin map over the hive: starts at once, yields in input order."""
        self._check_open()
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if chunksize is not None:
            _check_count("chunksize", chunksize, 1)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
        job, opener = self._open_job(fn, cpus, gpus, retries)
        stream = MapStream(
            job=job,
            send=self.link.send,
            opener=opener,
            forget=self._forget,
            iterables=iterables,
            slots=self.slots,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            progress=progress,
        )
        self._streams[job] = stream
        return stream.results()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn(*args, **kwargs) on the hive; returns a concurrent.futures.Future."""
        self._check_open()
        job, opener = self._open_job(fn, 1, 0, 2)
        frames = serialization.dumps((KEYWORDS, [(args, kwargs)]), "the arguments")
        future: concurrent.futures.Future = concurrent.futures.Future()
        single = _Single(self, job, future, opener, frames)
        self._streams[job] = single
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(single.done)
        single.send(force_blob=False)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            concurrent.futures.wait(futures)
        self.link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot schedule new work after shutdown")

    def __repr__(self) -> str:
        return f"<Hive {self.address} node={self.node_name!r} slots={self.slots}>"


class _Single:
    """The one-item job behind a `submit`."""

    def __init__(
        self,
        hive: Hive,
        job: int,
        future: concurrent.futures.Future,
        opener: Callable[[bool], list[Any]],
        frames: list[Any],
    ):
        self.hive, self.job, self.future = hive, job, future
        self.opener, self.frames = opener, frames

    def send(self, force_blob: bool) -> None:
        self.hive.link.send(
            self.opener(force_blob),
            encode(AddChunk(self.job, 0, 1), self.frames),
            encode(CloseJob(self.job)),
        )

    def deliver(self, msg: Message, payload: list[Any]) -> None:
        if self.future.done():
            return
        try:
            if isinstance(msg, Result):
                (value,) = serialization.loads(payload, "the result")
                self.future.set_result(raise_for(value))
            elif isinstance(msg, ItemsFailed):
                self.future.set_exception(FAILURE_TYPES.get(msg.kind, HiveError)(msg.text))
            elif isinstance(msg, JobRefused):
                if msg.kind == "unknown-blob":
                    self.send(force_blob=True)
                else:
                    self.future.set_exception(FAILURE_TYPES.get(msg.kind, HiveError)(msg.text))
        except BaseException as exc:  # the task's own exception, re-raised by raise_for
            if not self.future.done():
                self.future.set_exception(exc)

    def done(self, future: concurrent.futures.Future) -> None:
        self.hive._forget(self.job)
        with self.hive._lock:
            self.hive._futures.discard(future)
        if future.cancelled():
            self.hive.link.send(encode(CancelJob(self.job)))


def _check_count(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _no_daemon(address: str) -> str:
    return (
        f"no daemon answered at {address}; is hived running? "
        "`systemctl status hived`, or start one with `hived`"
    )


def connect(address: str | None = None, *, key_file: str | None = None) -> Hive:
    """A Hive: the daemon at `address` (or HIVED_ADDRESS, or the local one), else embedded."""
    return Hive(address, key_file=key_file)


class _DefaultHive:
    """`hived.hive`: connects on first use, shuts down at exit."""

    def __init__(self) -> None:
        self._hive: Hive | None = None
        self._lock = threading.Lock()

    def _get(self) -> Hive:
        with self._lock:
            if self._hive is None:
                self._hive = connect()
                atexit.register(self._hive.shutdown, wait=False)
            return self._hive

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __repr__(self) -> str:
        return repr(self._hive) if self._hive else "<Hive (not connected yet)>"


hive = _DefaultHive()
