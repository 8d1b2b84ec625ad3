"""The Python API: `hived.connect()` and `hive`, a concurrent.futures.Executor.

`connect()` finds a node the way DESIGN.md says (HIVED_ADDRESS, else the
local daemon's control socket if a daemon answers there, else an embedded
node in this process) and returns a `Hive`. Given several addresses it
greets them all and keeps the first node that welcomes it; should that node
be lost, a thread of the Hive's ("hived-reconnect") finds another one
(`hived.caller.failover`) and the jobs go on there. A Hive turns `submit` and `map`
into jobs on that node: `map` is a `MapStream` read in the caller's thread;
`submit` is a one-item job whose result completes a real
`concurrent.futures.Future` on the link's thread.

Submitted calls wait in the Hive until fewer than slots + 1 are at the node,
as ProcessPoolExecutor's call queue holds max_workers + 1: a future is
running once its call is sent, so `cancel()` stops only calls that have not
left (and a running call always finishes), and `shutdown(cancel_futures=True)`
cancels only those. At interpreter exit every Hive lets what was submitted
finish first, as ProcessPoolExecutor's exit hook does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from hived import __version__
from hived.caller.failover import (
    EMBEDDED,
    RECONNECT_TIMEOUT,
    AddressBook,
    Moved,
    Reconnecting,
    check_reconnect_timeout,
    parse_addresses,
)
from hived.caller.greeting import (
    CONNECT_TIMEOUT,
    Greeting,
    Tried,
    greet_any,
    greet_embedded,
    no_daemon_answered,
)
from hived.caller.links import SocketLink
from hived.caller.mapping import (
    MapStream,
)
from hived.caller.progress import write_output
from hived.caller.submitted import SubmittedCall
from hived.errors import (
    SHUTDOWN,
    STOPPED,
    UNAVAILABLE,
    HiveError,
    HiveUnavailable,
    InternalError,
    SerializationError,
)
from hived.net.addresses import local_control_addresses
from hived.net.security import client_curve
from hived.net.socketdir import check_access
from hived.node.taskoutput import Piece, emit_record
from hived.node.worker import KEYWORDS
from hived.protocol import serialization
from hived.protocol.control import (
    LINK_TIMEOUT,
    Call,
    Hello,
    ItemsFailed,
    JobRefused,
    Nodes,
    OpenJob,
    Output,
    Result,
    Stranger,
    Unwelcome,
    Welcome,
)
from hived.protocol.wire import decode, encode

log = logging.getLogger(__name__)

# The ping period a client takes from its node's WELCOME, within these bounds
# (a node cannot make the client spin, nor go quiet past its own client_timeout).
PING_PERIOD = (0.05, 1.0)
QUEUED_AHEAD = 1  # calls sent beyond the slots, as ProcessPoolExecutor's EXTRA_QUEUED_CALLS

_live: weakref.WeakSet[Hive] = weakref.WeakSet()
_exiting = False  # the interpreter is shutting down: no new work


class Hive(concurrent.futures.Executor):
    """A connection to one node of a hive (or an embedded one)."""

    def __init__(
        self,
        address: str | list[str] | None = None,
        *,
        key_file: str | None = None,
        cpus: int | None = None,
        reconnect_timeout: float = RECONNECT_TIMEOUT,
    ) -> None:
        if cpus is not None:
            _check_count("cpus", cpus, 1)
        self.reconnect_timeout = check_reconnect_timeout(reconnect_timeout)
        self.key_file = key_file
        self._lock = threading.Lock()
        self._streams: dict[int, Any] = {}
        self._job_numbers = itertools.count(1)
        self._sent_fns: set[bytes] = set()  # function hashes the current node has from us
        self._futures: set[concurrent.futures.Future] = set()
        self._queued: collections.deque[SubmittedCall] = collections.deque()  # not sent yet
        self._sent = 0  # submitted calls at the node and not done
        self._closed = False
        self._link_closing = False
        self._link_closed = False
        self._link_gone = threading.Event()  # set once link.close() returned
        self._lost: str | None = None  # why no node serves us any more, once none does
        # Moving to another node: `_epoch` counts the links adopted, and what
        # went out on the current one is sent again only on the next.
        self._greeting: Greeting | None = None  # the current link's
        self._epoch = 0
        self._moving = False
        self._mover: threading.Thread | None = None
        self._stop_moving = threading.Event()  # set once the link closes
        self._silent_since: float | None = None  # when the last node that served us last answered
        # Not a bound method: a shut-down Hive the caller drops is freed at
        # once, with its node's thread, rather than at the next collection.
        self.book = AddressBook([], functools.partial(_dialable, key_file))
        self.address = ""
        self.node_name = ""
        self.slots = 1
        self.link = self._open_link(address, cpus)
        _live.add(self)

    def _open_link(self, address: str | list[str] | None, cpus: int | None) -> Any:
        if address is None or address == "":
            address = os.environ.get("HIVED_ADDRESS") or None
        if address is None:
            for control in local_control_addresses():
                # No socket file: no daemon, and no time spent asking. One
                # closed to this user raises: it meant that daemon.
                if not check_access(control[len("ipc://") :]):
                    continue
                try:
                    return self._first_link([control])
                except HiveUnavailable:
                    log.info("no daemon answered at %s", control)
            address = EMBEDDED
        addresses = parse_addresses(address)
        if addresses != [EMBEDDED]:
            return self._first_link(addresses)
        greeting = greet_embedded(cpus, hello=self._hello(), on_frames=self._on_frames)
        self._adopt(greeting)
        return greeting.link

    def _first_link(self, addresses: list[str]) -> SocketLink:
        """The link to the first of `addresses` whose node welcomes us."""
        self.book.given = addresses
        greeting, tried = self._greet(addresses, CONNECT_TIMEOUT)
        if greeting is None:
            problems = [p for p in tried.values() if isinstance(p, HiveError)]
            raise problems[0] if problems else HiveUnavailable(no_daemon_answered(tried))
        self._adopt(greeting)
        return greeting.link

    def _hello(self) -> list[Any]:
        return encode(Hello(f"{socket.gethostname()} pid {os.getpid()}", __version__))

    def _greet(self, addresses: list[str], timeout: float) -> tuple[Greeting | None, Tried]:
        return greet_any(addresses, timeout, key_file=self.key_file, hello=self._hello(),
                         on_frames=self._on_frames, on_lost=self._on_lost)

    def _adopt(self, greeting: Greeting) -> bool:
        """Talk to the node that welcomed `greeting` from now on; False if this
        Hive closed meanwhile."""
        welcome, link = greeting.welcome, greeting.link
        if welcome is None:  # greet_any and _open_link hand over only welcomed greetings
            raise InternalError(f"adopting the link to {greeting.address}, which did not welcome us")
        if isinstance(link, SocketLink):
            period = min(max(welcome.heartbeat, PING_PERIOD[0]), PING_PERIOD[1])
            link.watch(period, min(max(welcome.dead_after, 2 * period), LINK_TIMEOUT))
        self.book.learn(welcome.nodes)
        with self._lock:
            if self._link_closed:
                adopted = False
            else:
                adopted = True
                self._greeting, self.link, self.address = greeting, link, greeting.address
                self.node_name, self.slots = welcome.node, max(welcome.slots, 1)
                self._sent_fns.clear()  # this node may lack them
                self._epoch += 1
                self._moving = False
        if not adopted:
            link.close()
        return adopted

    # -- messages from the node (on the link's thread) ------------------------

    def _on_frames(self, greeting: Greeting, frames: list[Any]) -> None:
        try:
            msg, payload = decode(frames)
        except HiveError as exc:
            log.warning("dropped a malformed message from %s: %s", greeting.address, exc)
            return
        if isinstance(msg, (Welcome, Unwelcome)):
            if not greeting.answered_at:
                greeting.believe(msg)
            return
        if greeting is not self._greeting:
            return  # a link being tried, or one left behind: what it had runs again
        if isinstance(msg, Stranger):
            self._on_lost(greeting, f"hived on {msg.node} at {greeting.address} holds nothing "
                          "of this client's (it restarted, or took this client for gone)")
        elif isinstance(msg, Nodes):
            self.book.learn(msg.nodes)
        elif isinstance(msg, JobRefused) and msg.kind == STOPPED:
            self._on_lost(greeting, f"{msg.text} (at {greeting.address})")
        elif isinstance(msg, Output):
            # (An embedded hive's workers are this process's own children,
            # as a ProcessPoolExecutor's are: their lines as they wrote them.)
            prefix = "" if greeting.address == EMBEDDED else f"({msg.source}) "
            if msg.logger:
                emit_record(Piece(msg.stream, msg.text, msg.logger, msg.level), prefix)
                return
            stream = sys.stdout if msg.stream == 1 else sys.stderr
            text = msg.text
            if prefix:
                text = "".join(prefix + line for line in text.splitlines(keepends=True))
            write_output(stream, text)
        else:
            job = getattr(msg, "job", None)  # a job's message; anything else is not for a stream
            target = self._streams.get(job) if isinstance(job, int) else None
            if target is not None:
                greeting.served = greeting.served or isinstance(msg, (Result, ItemsFailed))
                target.deliver(msg, payload)

    def _on_lost(self, greeting: Greeting, reason: str) -> None:
        """The node is gone (on the link's thread): find another one, on a thread of our own."""
        with self._lock:
            if greeting is not self._greeting or self._moving or self._lost is not None \
                    or self._link_closed:
                return
            self._moving = True
            # reconnect_timeout runs from the last answer of a node that
            # served us: one that welcomes us and then fails every job (says
            # it holds nothing of ours, say) must not keep us for ever.
            link, now, silent_since = greeting.link, time.monotonic(), self._silent_since
            if greeting.served or silent_since is None \
                    or now - greeting.answered_at >= self.reconnect_timeout:
                silent_since = self._silent_since = link.last_pong or greeting.answered_at
            self._mover = threading.Thread(target=self._move, args=(greeting, reason, silent_since),
                                           name="hived-reconnect", daemon=True)
            self._mover.start()

    def _move(self, lost: Greeting, reason: str, silent_since: float) -> None:
        """Greet the candidates in rounds until one node takes us (the jobs go
        on there) or no node has answered a ping since `silent_since` plus
        reconnect_timeout."""
        lost.link.lost = True  # no more pings to it
        deadline = max(silent_since + self.reconnect_timeout, time.monotonic())
        if self.reconnect_timeout:
            log.warning("%s; looking for another node (for up to %.1fs)", reason,
                        deadline - time.monotonic())
        for stream in list(self._streams.values()):
            if isinstance(stream, MapStream):
                stream.deliver(Reconnecting(reason), [])
        lost.link.close()
        period = lost.link.heartbeat
        tried: Tried = {}
        while (left := deadline - time.monotonic()) > 0 and not self._stop_moving.is_set():
            began = time.monotonic()
            greeting, failed = self._greet(self.book.candidates(lost.address),
                                           min(CONNECT_TIMEOUT, left))
            tried.update(failed)
            if greeting is not None:
                if self._adopt(greeting):
                    log.warning("now on hived %s at %s; sending again what was not delivered",
                                self.node_name, greeting.address)
                    self._resubmit()
                return
            self._stop_moving.wait(min(max(period - (time.monotonic() - began), 0), left))
        self._give_up(reason, tried)

    def _resubmit(self) -> None:
        """On the new link: each map opens its job again and sends the chunks
        not answered (in its caller's thread); each call sent goes again."""
        with self._lock:
            epoch, streams = self._epoch, list(self._streams.values())
        for stream in streams:
            if isinstance(stream, MapStream):
                stream.deliver(Moved(epoch, self.address), [])
            else:
                stream.send(force_blob=True)

    def _give_up(self, reason: str, tried: Tried) -> None:
        """No node answered for reconnect_timeout: every call fails."""
        where = "; tried " + ", ".join(f"{a} ({why})" for a, why in tried.items()) if tried else ""
        text = f"{reason}; no node answered within reconnect_timeout={self.reconnect_timeout:g}s{where}"
        with self._lock:
            if self._link_closed:
                return
            self._lost, self._moving = text, False
        log.info("%s; its jobs are lost", text)  # each call raises it
        for stream in list(self._streams.values()):
            stream.deliver(JobRefused(stream.job, UNAVAILABLE, f"{text}; this job is lost"), [])
        self._dispatch()  # what was still queued here fails too

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
            # The task's failure, so the future's (as in ProcessPoolExecutor),
            # without this frame (and so this Hive) in its traceback.
            future.set_exception(exc.with_traceback(None))
            return future

        def call(force_blob: bool) -> list[Any]:
            blob = blob_for(force_blob)
            return encode(Call(job, digest, bool(blob), 2, label), [*blob, *frames])

        single = SubmittedCall(self, job, future, call)
        with self._lock:
            self._futures.add(future)
            self._queued.append(single)
        future.add_done_callback(single.done)
        self._dispatch()
        return future

    def _dispatch(self) -> None:
        """Send queued calls while fewer than slots + QUEUED_AHEAD are at the node;
        each one's future is running from then on."""
        out = []
        with self._lock:
            while self._queued and (self._lost or self._sent < self.slots + QUEUED_AHEAD):
                single = self._queued.popleft()
                future = single.future  # let go only once done, and so no longer QUEUED
                if single.state != SubmittedCall.QUEUED or future is None:
                    continue  # cancelled while queued
                if not future.set_running_or_notify_cancel():
                    single.state = SubmittedCall.DROPPED  # cancelled, its waiters now told
                    continue
                single.state = SubmittedCall.SENT
                self._sent += 1
                self._streams[single.job] = single
                out.append(single)
        for single in out:
            if self._lost is not None:
                lost = f"{self._lost}; this call is lost"
                single.deliver(JobRefused(single.job, UNAVAILABLE, lost), [])
            else:
                single.send(force_blob=False)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._link_closing = wait  # else the last future's callback closes it
            queued: list[SubmittedCall] = []
            if cancel_futures:  # out of the queue first, so that none is sent meanwhile
                queued, self._queued = list(self._queued), collections.deque()
        for single in queued:
            future = single.future  # None if it is done already
            if future is not None:
                future.cancel()
        # A map still being read ends with an error where it would wait for
        # the node, rather than waiting for ever (maps read their input
        # lazily, so what they have not sent yet cannot complete).
        for stream in list(self._streams.values()):
            if isinstance(stream, MapStream):
                stream.deliver(JobRefused(stream.job, SHUTDOWN, _SHUT_DOWN), [])
        if wait:
            self._finish()
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

    def _send(self, *messages: list[Any]) -> int | None:
        """link.send while the link is open and the node there knows us; the
        link's epoch, or None where nothing went: while moving (what was not
        delivered goes again on the next link), and after (a map's last
        CancelJob, the BYE)."""
        with self._lock:
            if self._link_closed or self._lost is not None or self._moving:
                return None
            self.link.send(*messages)
            return self._epoch

    def _send_call(self, single: SubmittedCall, frames: list[Any], again: bool) -> None:
        """A call's message, at most once per link unless `again` (the node
        asked for it): the mover and `_dispatch` may both send one that was
        sent as the link changed."""
        with self._lock:
            if self._link_closed or self._lost is not None or self._moving \
                    or (single.epoch == self._epoch and not again):
                return
            single.epoch = self._epoch
            self.link.send(frames)

    def _finish(self) -> None:
        """Wait for every submitted call, then close the link."""
        with self._lock:
            futures = list(self._futures)
        concurrent.futures.wait(futures)
        self._close_link()

    def _close_link(self) -> None:
        """Close the link once, whoever asks first; return once it is closed."""
        with self._lock:  # no send is under way once this is set
            first, self._link_closed = not self._link_closed, True
            mover = self._mover
        if first:
            self._stop_moving.set()
            if mover is not None and mover is not threading.current_thread():
                mover.join()  # within a round of greetings
            self.link.close()
            self._link_gone.set()
        self._link_gone.wait()

    def _check_open(self) -> None:
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._lost is not None:
            raise HiveUnavailable(f"{self._lost}; connect again")

    def __repr__(self) -> str:
        return f"<Hive {self.address} node={self.node_name!r} slots={self.slots}>"


_SHUT_DOWN = "the hive was shut down while this map was running; no more results will come"


def _dialable(key_file: str | None, address: str) -> bool:
    """Whether we can dial `address` (a tcp one off this machine needs the key)."""
    try:
        client_curve(address, key_file)
    except HiveError:
        return False
    return True


def _check_count(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def connect(
    address: str | list[str] | None = None,
    *,
    key_file: str | None = None,
    cpus: int | None = None,
    reconnect_timeout: float = RECONNECT_TIMEOUT,
) -> Hive:
    """A Hive: the first node at `address` (several: a list, or commas; else
    HIVED_ADDRESS, else the local daemon) that answers, else embedded. Should
    that node be lost, the Hive goes on on another one, or on the same once it
    is back; only when no node answers for `reconnect_timeout` seconds do its
    calls fail with HiveUnavailable.

    `cpus` sizes an embedded hive (else HIVED_CPUS, else this machine's usable
    CPUs); a daemon's slots are its own and `cpus` does not change them."""
    return Hive(address, key_file=key_file, cpus=cpus, reconnect_timeout=reconnect_timeout)


class _DefaultHive:
    """`hived.hive`: connects on first use."""

    def __init__(self) -> None:
        self._hive: Hive | None = None
        self._lock = threading.Lock()

    def _get(self) -> Hive:
        with self._lock:
            if self._hive is None:
                self._hive = connect()  # finished at exit, as every Hive is
            return self._hive

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def __repr__(self) -> str:
        return repr(self._hive) if self._hive else "<Hive (not connected yet)>"


hive = _DefaultHive()


def _finish_at_exit() -> None:
    """At interpreter exit, before atexit's handlers (as concurrent.futures'
    own exit hook): no new work, and what every Hive was given finishes."""
    global _exiting
    _exiting = True
    for live in list(_live):
        live._finish()


# threading's exit hooks run before atexit's, so a submit from an atexit
# handler is refused (it could never run) instead of waited for.
# (Private, and so not in typeshed; concurrent.futures registers its own hook so.)
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]
