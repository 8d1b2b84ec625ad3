"""`[metrics] bind`: the node's figures in Prometheus's text format over HTTP.

Theory of operation
-------------------
Nothing here counts anything. `render` reads the figures where the node
already keeps them, at the moment of each scrape::

    Pool   slots by kind and state, tasks completed, worker crashes
    Owner  tasks failed (raised / crashed / serialization), tasks retried
    Mesh   peers by state, coordinator term, elections won, bytes in and out

`MetricsServer` is a small HTTP/1.1 responder on the daemon's own event
loop: one request per connection, then close. What a client may cost is
bounded, because anyone who reaches the port may connect: a request head of
at most `MAX_REQUEST` bytes, `CLIENT_TIMEOUT` seconds for the whole
exchange (a client that sends slowly, or never reads, is cut off), and at
most `MAX_CLIENTS` at once (more are closed at once). Whatever a client
sends, the worst it gets is an error status and a closed connection; the
node goes on.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from hived import __version__
from hived.errors import InternalError
from hived.net.addresses import is_loopback, split_metrics_bind

if TYPE_CHECKING:
    from hived.mesh.shell import Mesh
    from hived.node.pool import Pool
    from hived.node.scheduling import Owner

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 8192  # bytes of request line and headers; a scrape sends a few hundred
CLIENT_TIMEOUT = 5.0  # seconds for a whole request and its answer
MAX_CLIENTS = 16
# What `hivectl status` calls a peer's state.
PEER_STATES = ("alive", "suspect", "dead", "draining")

Labels = dict[str, str]


class Measured(Protocol):
    """What the metrics read of a daemon's node (hived.node.node.Node)."""

    @property
    def pool(self) -> Pool: ...
    @property
    def owner(self) -> Owner: ...
    @property
    def mesh(self) -> Mesh | None: ...


def render(node: Measured) -> str:
    """Every figure of a daemon's `node` (one on the mesh), as Prometheus's
    text exposition format (0.0.4)."""
    pool, owner, mesh = node.pool, node.owner, node.mesh
    if mesh is None:
        raise InternalError("metrics are served by a daemon's node, which is on a mesh")
    out = _Exposition()
    out.family(
        "hived_build_info", "gauge", "The hived version this node runs (always 1).",
        [({"version": __version__, "python": platform.python_version()}, 1)],
    )  # fmt: skip
    cpu_busy, gpu_busy = pool.cpu_slots_busy, pool.gpu_slots_busy
    out.family(
        "hived_slots", "gauge", "Slots of this node (one per usable CPU, one per GPU), by kind and state.",
        [
            ({"kind": "cpu", "state": "busy"}, cpu_busy),
            ({"kind": "cpu", "state": "free"}, max(pool.cpus - cpu_busy, 0)),
            ({"kind": "gpu", "state": "busy"}, gpu_busy),
            ({"kind": "gpu", "state": "free"}, len(pool.gpus) - gpu_busy),
        ],
    )  # fmt: skip
    out.family(
        "hived_tasks_completed_total", "counter",
        "Tasks this node's workers ran to the end, returning or raising (hivectl status: tasks done).",
        [({}, pool.items_done)],
    )  # fmt: skip
    out.family(
        "hived_tasks_failed_total", "counter",
        "Tasks of jobs this node owns whose caller got an error: the function raised, the task "
        "crashed its worker on every try, or its function or arguments would not unpickle.",
        [
            ({"reason": "raised"}, owner.items_raised),
            ({"reason": "crashed"}, owner.items_crashed),
            ({"reason": "serialization"}, owner.items_refused),
        ],
    )  # fmt: skip
    out.family(
        "hived_tasks_retried_total", "counter",
        "Tasks of jobs this node owns queued to run again after the worker or node running them was lost.",
        [({}, owner.items_retried)],
    )  # fmt: skip
    out.family(
        "hived_worker_crashes_total", "counter",
        "Worker processes of this node that died other than by the pool's own stop, cancel or "
        "recycling (a signal, an exit from the task, a kill over memory_limit).",
        [({}, pool.worker_crashes)],
    )  # fmt: skip
    states = dict.fromkeys(PEER_STATES, 0)
    for member in mesh.members()[1:]:  # the first is this node
        states[member.state] = states.get(member.state, 0) + 1
    coordinator = mesh.coordinator()
    out.family(
        "hived_peers", "gauge", "Other nodes this node knows, by state.",
        [({"state": state}, count) for state, count in states.items()],
    )  # fmt: skip
    out.family(
        "hived_coordinator_term", "gauge",
        "Term of the coordinator whose lease this node believes valid; 0 while it knows of none.",
        [({}, coordinator[1] if coordinator else 0)],
    )  # fmt: skip
    out.family(
        "hived_coordinator", "gauge", "1 while this node holds the coordinator's lease, else 0.",
        [({}, int(mesh.is_coordinator()))],
    )  # fmt: skip
    out.family(
        "hived_elections_won_total", "counter", "Times this node became coordinator.",
        [({}, mesh.elections_won)],
    )  # fmt: skip
    out.family(
        "hived_mesh_received_bytes_total", "counter",
        "Bytes of mesh messages received from peers, by message type.",
        [({"type": kind}, n) for kind, n in sorted(mesh.bytes_in.items())],
    )  # fmt: skip
    out.family(
        "hived_mesh_sent_bytes_total", "counter",
        "Bytes of mesh messages sent to peers, by message type.",
        [({"type": kind}, n) for kind, n in sorted(mesh.bytes_out.items())],
    )  # fmt: skip
    return out.text()


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Labels, float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {_escape(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            shown = ",".join(f'{k}="{_escape(v, quotes=True)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _escape(text: str, quotes: bool = False) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quotes else text


class MetricsServer:
    """GET /metrics on `bind` ("host:port"), answered with `render(node)`."""

    def __init__(self, bind: str, node: Measured) -> None:
        self.bind, self.node = bind, node
        self.server: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind and serve; raises OSError where the address cannot be bound."""
        host, port = split_metrics_bind(self.bind)
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_REQUEST)
        where = ", ".join(_url(s.getsockname()) for s in self.server.sockets)
        log.info("metrics: serving %s", where)
        if not is_loopback(host):
            log.warning(
                "metrics: %s is reachable from other machines; what it serves is read-only "
                "but unauthenticated", self.bind,
            )

    async def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            raise InternalError("a metrics scrape is answered by a task of the server")
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        self._clients.add(task)
        try:
            await asyncio.wait_for(self._exchange(reader, writer), CLIENT_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        except Exception:  # a bug here must cost one scrape, never the node
            log.exception("metrics: answering a scrape failed")
        finally:
            self._clients.discard(task)
            writer.transport.abort()  # closed already, unless the client ran out of time

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await _read_head(reader)
        except ValueError:  # a line, or the whole head, past MAX_REQUEST
            return await _answer(writer, 431, "request head too large\n")
        if head is None:
            return  # closed before a whole request: nobody to answer
        method, target, version = (head[0].split() + [b"", b"", b""])[:3]
        if not version.startswith(b"HTTP/1.") or not target.startswith(b"/"):
            return await _answer(writer, 400, "expected an HTTP/1.x request\n")
        if method not in (b"GET", b"HEAD"):
            return await _answer(writer, 405, "only GET and HEAD\n", {"Allow": "GET, HEAD"})
        if target.split(b"?", 1)[0] != b"/metrics":
            return await _answer(writer, 404, "the figures are at /metrics\n")
        await _answer(writer, 200, render(self.node), head_only=method == b"HEAD")


async def _read_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """The request line and header lines, up to the empty line; None at an
    early end. Lines may end in LF alone (RFC 9112 lets a server accept it)."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = await reader.readline()  # ValueError past the reader's limit
        size += len(line)
        if size > MAX_REQUEST:
            raise ValueError("request head too large")
        if not line.endswith(b"\n"):
            return None
        if line.rstrip(b"\r\n") == b"":
            return lines or None
        lines.append(line)


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}  # fmt: skip


async def _answer(
    writer: asyncio.StreamWriter,
    status: int,
    body: str,
    headers: dict[str, str] | None = None,
    head_only: bool = False,
) -> None:
    """Send one response and close once it is out (one request per connection)."""
    data = body.encode()
    fields = {"Content-Type": CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8",
              "Content-Length": str(len(data)), "Connection": "close", **(headers or {})}  # fmt: skip
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
    writer.write(head.encode() + (b"" if head_only else data))
    writer.close()
    await writer.wait_closed()


def _url(sockname: tuple) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
