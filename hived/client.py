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
from hived.addresses import local_control_addresses
from hived.control import (
    Call,
    CancelJob,
    Hello,
    ItemsFailed,
    JobRefused,
    OpenJob,
    Output,
    Result,
    Stranger,
    Unwelcome,
    Welcome,
    version_problem,
)
from hived.errors import HiveError, HiveUnavailable, RemoteProtocolError, SerializationError
from hived.links import EmbeddedLink, SocketLink
from hived.mapping import (
    FAILURE_TYPES,
    MapStream,
    check_range,
    lacks_function_again,
    load_values,
    raise_for,
)
from hived.node import NodeSettings
from hived.resources import detect_gpus, usable_cpus
from hived.security import client_curve
from hived.wire import Message, decode, encode
from hived.worker import KEYWORDS

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
CONNECT_TIMEOUT = 2.0
MAX_SLOTS = 1 << 20  # more than any hive has: a WELCOME claiming more is not believed


class Hive(concurrent.futures.Executor):
    """A connection to one node of a hive (or an embedded one)."""

    def __init__(self, address: str | None = None, *, key_file: str | None = None) -> None:
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}
        self._job_numbers = itertools.count(1)
        self._sent_fns: set[bytes] = set()
        self._welcome = threading.Event()
        self._unwelcome: HiveError | None = None  # why the node will not serve us
        self._futures: set[concurrent.futures.Future] = set()
        self._closed = False
        self._link_closing = False
        self._link_closed = False
        self._lost: str | None = None  # why the node is gone, once it is
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
        curve = client_curve(address, key_file)
        return self._greet(SocketLink(address, self._on_frames, on_lost=self._on_lost, curve=curve))

    def _greet(self, link: Any) -> Any:
        """Say HELLO on `link` and wait for the node's WELCOME."""
        link.send(encode(Hello(f"{socket.gethostname()} pid {os.getpid()}", __version__)))
        if not self._welcome.wait(CONNECT_TIMEOUT):
            link.close()
            raise HiveUnavailable(_no_daemon(self.address))
        if self._unwelcome is not None:
            link.close()
            raise self._unwelcome
        return link

    # -- messages from the node (on the link's thread) ------------------------

    def _on_frames(self, frames: list[Any]) -> None:
        try:
            msg, payload = decode(frames)
        except HiveError as exc:
            log.warning("dropped a malformed message from %s: %s", self.address, exc)
            return
        if isinstance(msg, (Welcome, Unwelcome)):
            if not self._welcome.is_set():
                self._on_greeting(msg)
                self._welcome.set()
        elif isinstance(msg, Stranger):
            self._on_lost(f"hived on {msg.node} at {self.address} holds nothing of this "
                          "client's (it restarted, or took this client for gone)")
        elif isinstance(msg, Output):
            stream = sys.stdout if msg.stream == 1 else sys.stderr
            for line in msg.text.splitlines(keepends=True):
                stream.write(f"({msg.source}) {line}")
            stream.flush()
        else:
            target = self._streams.get(getattr(msg, "job", None))
            if target is not None:
                target.deliver(msg, payload)

    def _on_greeting(self, msg: Welcome | Unwelcome) -> None:
        if isinstance(msg, Unwelcome):
            problem = msg.text
        elif not 0 <= msg.slots <= MAX_SLOTS:
            self._unwelcome = RemoteProtocolError(
                f"hived at {self.address} says it has {msg.slots} slots; expected 0 to {MAX_SLOTS}"
            )
            return
        else:
            problem = version_problem(msg.version)
        if problem is not None:
            self._unwelcome = HiveError(f"hived on {msg.node} at {self.address} will not serve this client: {problem}")
            return
        self.node_name, self.slots = msg.node, max(msg.slots, 1)

    # -- jobs -----------------------------------------------------------------

    def _open_job(
        self, fn: Callable[..., Any], cpus: int, gpus: int, retries: int
    ) -> tuple[int, Callable[[bool], list[Any]]]:
        """A job number and the function that makes its OpenJob message."""
        _check_count("cpus", cpus, 1)
        _check_count("gpus", gpus, 0)
        _check_count("retries", retries, 0)
        job, digest, label, blob_for = self._function(fn)

        def open_job(force_blob: bool = False) -> list[Any]:
            blob = blob_for(force_blob)
            return encode(OpenJob(job, digest, bool(blob), cpus, gpus, retries, label), blob)

        return job, open_job

    def _function(self, fn: Callable[..., Any]) -> tuple[int, bytes, str, Callable[[bool], list[Any]]]:
        """A new job number, the function's hash and name, and `blob_for(force)`:
        the blob as a frame the first time this client uses the function (or
        when `force` says the node lost it), else nothing."""
        blob, digest = serialization.dumps_function(fn)
        label = getattr(fn, "__qualname__", type(fn).__name__)

        def blob_for(force: bool) -> list[Any]:
            with self._lock:
                first = digest not in self._sent_fns
                self._sent_fns.add(digest)
            return [blob] if force or first else []

        return next(self._job_numbers), digest, label, blob_for

    def _on_lost(self, reason: str) -> None:
        """The node is gone, and every job we had there with it (on the link's thread)."""
        with self._lock:
            if self._lost is not None or self._link_closed:
                return
            self._lost = reason
        self.link.lost = True
        log.warning("%s; its jobs are lost", reason)
        for stream in list(self._streams.values()):
            stream.deliver(JobRefused(stream.job, "unavailable", f"{reason}; this job is lost"), [])

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
            send=self._send,
            opener=opener,
            forget=self._forget,
            iterables=iterables,
            slots=self.slots,
            chunksize=chunksize,
            ordered=ordered,
            timeout=timeout,
            progress=progress,
        )
        self._streams[job] = stream  # before the first send: results may come back at once
        try:
            stream.start()
        except BaseException:
            self._forget(job)
            raise
        return stream.results()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        """Run fn(*args, **kwargs) on the hive; returns a concurrent.futures.Future."""
        self._check_open()
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            job, digest, label, blob_for = self._function(fn)
            frames = serialization.dumps((KEYWORDS, [(args, kwargs)]), "the arguments")
        except SerializationError as exc:
            # The task's failure, so the future's (as in ProcessPoolExecutor).
            future.set_exception(exc)
            return future

        def call(force_blob: bool) -> list[Any]:
            blob = blob_for(force_blob)
            return encode(Call(job, digest, bool(blob), 2, label), [*blob, *frames])

        single = _Single(self, job, future, call)
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
            self._link_closing = wait  # else the last future's callback closes it
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        # A map still being read ends with an error where it would wait for
        # the node, rather than waiting for ever (maps read their input
        # lazily, so what they have not sent yet cannot complete).
        for stream in list(self._streams.values()):
            if isinstance(stream, MapStream):
                stream.deliver(JobRefused(stream.job, "shutdown", _SHUT_DOWN), [])
        if wait:
            concurrent.futures.wait(futures)
            self._close_link()
        else:
            # As ProcessPoolExecutor does: what was submitted still completes;
            # the link closes once the last future is done.
            self._close_if_idle(in_callback=False)

    def _close_if_idle(self, in_callback: bool = True) -> None:
        with self._lock:
            if not self._closed or self._futures or self._link_closing:
                return
            self._link_closing = True
        if in_callback:  # maybe on the link's own thread, which close() waits for
            threading.Thread(target=self._close_link, name="hived-close", daemon=True).start()
        else:
            self._close_link()

    def _send(self, *messages: list[Any]) -> None:
        """link.send while the link is open and the node there knows us; after,
        nothing (a map's last CancelJob, the BYE)."""
        with self._lock:
            if not self._link_closed and self._lost is None:
                self.link.send(*messages)

    def _close_link(self) -> None:
        with self._lock:  # no send is under way once this is set
            self._link_closed = True
        self.link.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("cannot schedule new work after shutdown")
        if self._lost is not None:
            raise HiveUnavailable(f"{self._lost}; connect again")

    def __repr__(self) -> str:
        return f"<Hive {self.address} node={self.node_name!r} slots={self.slots}>"


class _Single:
    """The one-item job behind a `submit`."""

    def __init__(
        self,
        hive: Hive,
        job: int,
        future: concurrent.futures.Future,
        call: Callable[[bool], list[Any]],
    ):
        self.hive, self.job, self.future, self.call = hive, job, future, call
        self.resent = False  # the function went again after the node said it lacked it

    def send(self, force_blob: bool) -> None:
        self.hive._send(self.call(force_blob))

    def deliver(self, msg: Message, payload: list[Any]) -> None:
        if self.future.done():
            return
        try:
            if isinstance(msg, (Result, ItemsFailed)):
                if msg.chunk != 0:
                    raise RemoteProtocolError(f"the node sent a result for chunk {msg.chunk} of a submit")
                check_range(msg, 1)
            if isinstance(msg, Result):
                (value,) = load_values(payload, 1, "the result")
                self.future.set_result(raise_for(value))
            elif isinstance(msg, ItemsFailed):
                self.future.set_exception(FAILURE_TYPES.get(msg.kind, HiveError)(msg.text))
            elif isinstance(msg, JobRefused):
                if msg.kind != "unknown-blob":
                    self.future.set_exception(FAILURE_TYPES.get(msg.kind, HiveError)(msg.text))
                elif self.resent:
                    self.future.set_exception(lacks_function_again())
                else:
                    self.resent = True
                    self.send(force_blob=True)
        except BaseException as exc:  # the task's own exception, re-raised by raise_for
            if not self.future.done():
                self.future.set_exception(exc)

    def done(self, future: concurrent.futures.Future) -> None:
        self.hive._forget(self.job)
        with self.hive._lock:
            self.hive._futures.discard(future)
        if future.cancelled():
            # What an executor owes a cancelled future: without it,
            # concurrent.futures.wait/as_completed never count it as done.
            future.set_running_or_notify_cancel()
            self.hive._send(encode(CancelJob(self.job)))
        self.hive._close_if_idle()


_SHUT_DOWN = "the hive was shut down while this map was running; no more results will come"


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
