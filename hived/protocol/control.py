"""The control plane between clients (and hivectl) and the node they talk to.

A client speaks to one node, its job's *owner*: through the node's control
socket (a ROUTER on a Unix socket, or TCP with CURVE) when a daemon runs, or
through an in-process link when the node is embedded in the caller. Both
carry the same messages, so the node cannot tell them apart.

    client                                   node (owner)
      HELLO (version) ───────────────────────▶
      ◀──────────────── WELCOME (name, slots, the hive's nodes), or UNWELCOME (why not)
      JOB (function blob once per client) ──▶
      CHUNK × n (opaque payload) ───────────▶
      CLOSE (no more chunks) ───────────────▶
      ◀──────────── RESULT × n / ERROR / OUT
      PING every heartbeat; a silent client is dropped with its jobs.
      ◀──────────────── NODES whenever the hive's nodes change

A client takes its node as lost once it answers no PING for the node's
`dead_after`, or once it refuses a job with kind STOPPED (it stops, or
drains); the client then greets another node (or the same one, back) and
sends again what was not delivered (`hived.caller.failover`).

The node never unpickles a payload frame: only headers are decoded. It
serves only clients that said HELLO with a compatible version: anything else
from a client it does not know gets an error (STRANGER, or an ANSWER holding
"error") and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import zmq

from hived import __version__
from hived.errors import HiveError, InternalError, RemoteProtocolError
from hived.net.reactor import Channel
from hived.net.socketdir import check_access, check_socket, make_socket_dir
from hived.protocol.fields import Address, Seconds, at_most
from hived.protocol.wire import Message, decode, encode, message

log = logging.getLogger(__name__)

EMBEDDED_CLIENT = b"embedded"


@message(b"C.HELLO")
class Hello(Message):
    client: str  # a label for logs: host and pid
    version: str


@message(b"C.UNWELCOME")
class Unwelcome(Message):
    """The node's answer to a HELLO of an incompatible version: it will run
    no job for this client (it still answers its queries)."""

    node: str
    text: str


# A release and what it is compatible with: the same major version, and
# from 0.x the same minor (0.x releases may break the protocol, as semver allows).
_RELEASE = re.compile(r"(\d{1,9})\.(\d{1,9})(?:\.\d{1,9})?(?:[.+-]?[0-9A-Za-z]{1,32})*")


def version_problem(theirs: str, ours: str = __version__) -> str | None:
    """Why a peer running release `theirs` cannot work with us, or None if it can."""
    found = _RELEASE.fullmatch(theirs)
    if found is None:
        return f"version {theirs[:40]!r} is not a hived release (expected one like {ours})"
    series = _RELEASE.fullmatch(ours)
    if series is None:
        raise InternalError(f"this hived's own version {ours!r} is not a release")
    if _series(found) != _series(series):
        return (
            f"hived {theirs} cannot work with hived {ours}: install the same release "
            f"(`pip install hived-mesh=={ours}`) on both sides"
        )
    return None


def _series(release: re.Match[str]) -> tuple[int, ...]:
    major, minor = int(release[1]), int(release[2])
    return (major,) if major else (0, minor)


# At most this many addresses in a WELCOME or NODES: enough for a client to
# find another node, and a bound on what it keeps.
MAX_NODES = 1024
NodeAddresses = Annotated[list[Address], at_most(MAX_NODES, "tcp://host:port addresses")]


@message(b"C.WELCOME")
class Welcome(Message):
    node: str
    version: str
    slots: int  # worker slots the caller may count on, for sizing its window
    heartbeat: Seconds  # how often the client must show it is alive
    dead_after: Seconds  # silence after which the client takes this node as lost
    draining: bool  # it takes no new jobs: a client looking for a node passes it over
    nodes: NodeAddresses  # where clients reach the hive's live nodes, this one included


@message(b"C.NODES")
class Nodes(Message):
    """The hive's live nodes changed: where clients reach them now."""

    nodes: NodeAddresses


@message(b"C.JOB")
class OpenJob(Message):
    job: int
    fn: bytes
    has_blob: bool  # the function blob is the first payload frame
    cpus: int
    gpus: int
    retries: int
    label: str  # the function's name, for `hivectl jobs`


@message(b"C.CALL")
class Call(Message):
    """A `submit`: a job of one item on one CPU, opened and closed at once.
    Payload: [function blob if `has_blob`] + the item's frames."""

    job: int
    fn: bytes
    has_blob: bool
    retries: int
    label: str


@message(b"C.CHUNK")
class AddChunk(Message):
    job: int
    chunk: int
    count: int


@message(b"C.CLOSE")
class CloseJob(Message):
    job: int


@message(b"C.CANCEL")
class CancelJob(Message):
    job: int


# Either end of a client link that hears nothing from the other for this
# long takes it as gone: the node drops the client's jobs, the client fails
# its calls with HiveUnavailable. Each end pings the other every heartbeat.
LINK_TIMEOUT = 5.0


@message(b"C.PING")
class Ping(Message):
    pass


@message(b"C.PONG")
class Pong(Message):
    """The node's answer to a PING: it is alive and knows this client."""


@message(b"C.STRANGER")
class Stranger(Message):
    """The node holds nothing of this client's (it restarted, or dropped the
    client as silent): whatever the client had running there is lost."""

    node: str


@message(b"C.BYE")
class Bye(Message):
    pass


@message(b"C.RESULT")
class Result(Message):
    job: int
    chunk: int
    start: int
    stop: int
    elapsed: float  # seconds the worker spent on these items, for chunk sizing
    failures: int  # how many of them raised: none spares the caller a scan


@message(b"C.ERROR")
class ItemsFailed(Message):
    """Items [start, stop) of a chunk failed for a reason of hived's, not the task's."""

    job: int
    chunk: int
    start: int
    stop: int
    kind: str  # CRASHED, SERIALIZATION or UNAVAILABLE (hived.errors)
    text: str


@message(b"C.JOBERR")
class JobRefused(Message):
    job: int
    kind: str  # UNKNOWN_BLOB, INVALID, UNAVAILABLE, CANCELLED or STOPPED (hived.errors)
    text: str


@message(b"C.OUT")
class Output(Message):
    """What a task emitted (a `hived.node.taskoutput.Piece`): text, or a log record."""

    job: int
    stream: int
    text: str
    source: str  # "node pid=1234"
    logger: str = ""  # a record's logger name; "" for text on the stream
    level: int = 0  # a record's level


@message(b"C.STATUS")
class StatusQuery(Message):
    request: int


@message(b"C.JOBS")
class JobsQuery(Message):
    request: int


@message(b"C.DRAIN")
class DrainRequest(Message):
    request: int
    node: str


@message(b"C.UNDRAIN")
class UndrainRequest(Message):
    """End a `hivectl drain` of the named node: it takes work again."""

    request: int
    node: str


@message(b"C.CANCELJOB")
class CancelRequest(Message):
    """`hivectl cancel`: end the job of this id (as `hivectl jobs` lists it),
    wherever in the hive it is owned; its client gets JobCancelled."""

    request: int
    job_id: str  # not `job`: that field names a client's own job number


@message(b"C.RELOAD")
class ReloadRequest(Message):
    """`hived --reload`: read the configuration again, as SIGHUP does, and
    answer once it is applied ({"applied": [...], "restart": [...]}) or
    refused ({"error": why})."""

    request: int


@message(b"C.ANSWER")
class Answer(Message):
    request: int
    body: dict[str, Any]


Handler = Callable[[bytes, Message, list[Any]], None]
# What `ask` sends: the control messages that a node answers with an Answer.
Query = StatusQuery | JobsQuery | DrainRequest | UndrainRequest | CancelRequest | ReloadRequest


def ask(
    address: str,
    query: Query,
    timeout: float,
    curve: Callable[[zmq.Socket], None] | None = None,
) -> Answer | None:
    """Say HELLO, send one query to a node's control socket, say BYE; its
    Answer, or None if none came in time. Queries are answered whatever our
    version; raises HiveError where an ipc socket is not to be trusted."""
    if not address.startswith(("ipc://", "tcp://")):
        raise HiveError(f"address {address!r}: expected ipc://PATH or tcp://HOST:PORT")
    if address.startswith("ipc://"):
        path = address[len("ipc://") :]
        if not check_access(path):
            return None
        check_socket(path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        if curve is not None:
            curve(sock)
        sock.connect(address)
        sock.send_multipart(encode(Hello(f"ask pid {os.getpid()}", __version__)))
        sock.send_multipart(encode(query))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            try:
                msg, _ = decode(sock.recv_multipart())
            except RemoteProtocolError as exc:
                log.warning("ignored a malformed answer from %s: %s", address, exc)
                continue
            if isinstance(msg, Answer) and msg.request == query.request:
                sock.linger = 100  # time for the BYE to leave, so the node forgets us now
                sock.send_multipart(encode(Bye()))
                return msg
        return None
    finally:
        sock.close()
        ctx.term()


class ControlServer:
    """Receives clients' messages on sockets and/or in-process links.

    Clients arrive on the control socket, on the mesh inbox (remote clients
    and `hivectl --connect tcp://...`), or in-process; each answer goes back
    the way its client came.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_message: Handler) -> None:
        self.loop, self.on_message = loop, on_message
        self.channel: Channel | None = None
        self.local: dict[bytes, Callable[[list[Any]], None]] = {}
        self.routes: dict[bytes, Channel] = {}  # client -> the socket it came on

    def bind(self, ctx: zmq.Context, address: str, curve: Callable[[zmq.Socket], None] | None) -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if curve is not None:
            curve(sock)
        if address.startswith("ipc://"):
            path = address[len("ipc://") :]
            make_socket_dir(path)
            # Group members may connect (the systemd unit puts users in the
            # daemon's group); nobody else may.
            old = os.umask(0o117)
            try:
                sock.bind(address)
            finally:
                os.umask(old)
        else:
            sock.bind(address)
        self.channel = channel = Channel(self.loop, sock, lambda frames: self.accept(channel, frames))

    def attach(self, client: bytes, deliver: Callable[[list[Any]], None]) -> Callable[..., None]:
        """Link an in-process client; returns `send(*messages)` for it (any thread)."""
        self.local[client] = deliver

        def send(*messages: list[Any]) -> None:
            self.loop.call_soon_threadsafe(self._on_local, client, messages)

        return send

    def detach(self, client: bytes) -> None:
        self.local.pop(client, None)
        self.routes.pop(client, None)

    def send(self, client: bytes, msg: Message, payload: Sequence[Any] = ()) -> None:
        local = self.local.get(client)
        if local is not None:
            local(encode(msg, payload))
            return
        channel = self.routes.get(client, self.channel)
        if channel is not None:
            channel.send([client, *encode(msg, payload)])

    def _on_local(self, client: bytes, messages: tuple[list[Any], ...]) -> None:
        for frames in messages:
            self._dispatch(client, frames)

    def accept(self, channel: Channel, frames: list[Any]) -> None:
        """A client's message from a ROUTER socket (routing id first)."""
        client = frames[0].bytes
        if channel is not self.channel:
            self.routes[client] = channel
        self._dispatch(client, frames[1:])

    def _dispatch(self, client: bytes, frames: list[Any]) -> None:
        try:
            msg, payload = decode(frames)
        except RemoteProtocolError as exc:
            log.warning("control: dropped a message from client %s: %s", client.hex(), exc)
            return
        self.on_message(client, msg, payload)

    def close(self) -> None:
        self.local.clear()  # in-process clients: nothing more reaches them
        if self.channel is not None:
            self.channel.close()
            self.channel = None
