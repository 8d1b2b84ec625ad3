"""A node: one hived, with the roles of owner and worker node (and, alone, coordinator).

Data flow inside one node
-------------------------

      clients / hivectl                                   worker processes
    (ipc/tcp ROUTER, or an                              (spawned, ipc DEALERs)
     in-process link)                                          ▲   │
            │ JOB, CHUNK, CLOSE, CANCEL, PING                  │   │ DONE, FAIL, OUT
            ▼                                                  │   ▼
     ControlServer ──▶ Node._handlers ──▶ Owner (sans-IO) ◀── Exchange ◀── Pool
            ▲                               jobs, ranges,     (source, sink)  │
            │ RESULT, ERROR, OUT            dedup, retries         ▲          │ pidfd: worker died
            └──────────────────────────── Node (the Sink) ◀────────┴──────────┘

- The ControlServer decodes headers only; payload frames pass through the
  node untouched (they are never unpickled here).
- The Owner decides what runs next and what may be delivered; the Pool runs
  what it is given and reports back; the Exchange (hived.node.exchange) is
  the pool's source and sink, and passes the reports on the node's own jobs
  to the Node, which only wires them to clients.
- Every callback runs on the node's one event loop thread, so none of these
  parts need locks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from hived import __version__
from hived.errors import (
    CANCELLED,
    CRASHED,
    INVALID,
    SERIALIZATION,
    STOPPED,
    UNKNOWN_BLOB,
    LocalProtocolError,
)
from hived.mesh.steering import Steer, Steered
from hived.net.background import Background
from hived.net.frames import frame_bytes
from hived.node.admission import Capacity, hive_slots, job_problem
from hived.node.blobs import BlobStore
from hived.node.clients import ClientState, Strangers
from hived.node.exchange import Exchange
from hived.node.ownjobs import OwnJobs, job_id
from hived.node.pool import Pool
from hived.node.scheduling import JobKey, Needs, Owner
from hived.node.settings import NodeSettings
from hived.node.status import node_status
from hived.node.steering import Steering
from hived.node.taskoutput import Piece
from hived.protocol.control import (
    MAX_NODES,
    AddChunk,
    Answer,
    Bye,
    Call,
    CancelJob,
    CancelRequest,
    CloseJob,
    ControlServer,
    DrainRequest,
    Hello,
    ItemsFailed,
    JobRefused,
    JobsQuery,
    Nodes,
    OpenJob,
    Output,
    Ping,
    Pong,
    ReloadRequest,
    Result,
    StatusQuery,
    UndrainRequest,
    Unwelcome,
    Welcome,
    version_problem,
)
from hived.protocol.serialization import function_digest
from hived.protocol.wire import Message

if TYPE_CHECKING:
    from hived.mesh.shell import Mesh

log = logging.getLogger(__name__)

# How long a cancelled job's running tasks may finish before their workers are stopped.
CANCEL_GRACE = 1.0


class Node:
    # Set by `start`, on the loop thread.
    loop: asyncio.AbstractEventLoop
    background: Background  # the node's and its exchange's tasks and timers
    exchange: Exchange
    pool: Pool
    control: ControlServer
    steering: Steering

    def __init__(self, settings: NodeSettings, ctx: zmq.Context | None = None) -> None:
        self.settings = settings
        self.name = settings.name
        self.ctx = ctx or zmq.Context.instance()
        self.owner = Owner(first_assignment=random.getrandbits(48) << 8)
        self.clients: dict[bytes, ClientState] = {}
        self._strangers = Strangers(self.name, log)
        self.blobs = BlobStore()
        self.own = OwnJobs(self.name, log)
        self.started_at = time.monotonic()
        # Answers a `hived --reload` (C.RELOAD) with what was applied, or
        # {"error": why}; None for a node that has no configuration file (embedded).
        self.on_reload: Callable[[str], dict[str, Any]] | None = None
        self.draining = False
        self.stopping = False  # drains to exit (SIGTERM): no undrain ends that
        # Called when this node starts or ends a drain that hivectl asked for
        # (the daemon's STATUS= line says so at once).
        self.on_state_change: Callable[[], None] | None = None
        self.stopped = asyncio.Event()
        self._drained = asyncio.Event()
        self.mesh: Mesh | None = None  # once joined
        self._told_nodes: list[str] = []  # the hive's nodes as clients last heard of them
        self._handlers: dict[type[Message], Callable[[ClientState, Any, list[Any]], None]] = {
            OpenJob: self._open_job,
            Call: self._call,
            AddChunk: self._add_chunk,
            CloseJob: self._close_job,
            CancelJob: self._cancel_job,
            Ping: lambda client, msg, payload: self.control.send(client.id, Pong()),
            Bye: lambda client, msg, payload: self._drop_client(client, "said goodbye"),
            StatusQuery: self._status_query,
            JobsQuery: self._jobs_query,
            DrainRequest: self._drain_request,
            UndrainRequest: self._undrain_request,
            CancelRequest: self._cancel_request,
            ReloadRequest: self._reload_request,
        }

    @property
    def jobs_owned(self) -> int:
        return self.own.owned

    @property
    def jobs_finished(self) -> int:
        return self.own.finished

    @property
    def jobs_cancelled(self) -> int:
        return self.own.cancelled

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the pool, bind the control socket, join the mesh; call on the loop thread."""
        self.loop = asyncio.get_running_loop()
        self.background = Background(self.loop)
        s = self.settings
        self.exchange = Exchange(
            self.owner, self.blobs, self, self.background, name=self.name,
            heartbeat=s.heartbeat, dead_after=s.dead_after,
            draining=lambda: self.draining, job_rows=self.job_rows,
        )
        self.pool = Pool(
            self.loop,
            node_name=self.name,
            cpus=s.cpus,
            gpus=s.gpus,
            source=self.exchange,
            sink=self.exchange,
            blobs=self.blobs,
            job_tag=self.exchange.job_tag,
            max_tasks_per_worker=s.max_tasks_per_worker,
            memory_limit=s.memory_limit,
            authkey=s.authkey,
            launcher=s.launcher,
        )
        self.pool.start()
        self.control = ControlServer(self.loop, self._on_client_message)
        # The mesh binds first: a node whose mesh address cannot be bound
        # never answers a client on its control socket.
        if s.bind is not None:
            # The embedded node never needs the mesh: start faster.
            from hived.mesh.shell import Mesh

            self.mesh = Mesh(
                self.loop, self.ctx, name=self.name, bind=s.bind,
                advertise=s.advertise or s.bind, seeds=s.seeds, heartbeat=s.heartbeat,
                dead_after=s.dead_after, lease=s.lease, key=s.key, data_dir=s.data_dir,
                cpus=s.cpus, gpus=len(s.gpus), on_client_frames=self.control.accept,
                on_work=self._on_mesh_message, on_peer_gone=self.exchange.node_gone,
            )
            self.mesh.start()
            self.pool.on_idle = self.exchange.idle
        if s.control is not None:
            tcp = s.control.startswith("tcp://")
            self.control.bind(self.ctx, s.control, s.key.server if tcp and s.key else None)
        self.exchange.attach(self.pool, self.mesh)
        self.steering = Steering(self.name, self.mesh, self.background, self._steer, self._answer)
        self.background.spawn(self._housekeeping(), name=f"housekeeping of {self.name}")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            try:
                self._keep_house()
            except Exception:  # a bug in one chore must not end them all, silently
                log.exception("housekeeping failed; it goes on")

    def _keep_house(self) -> None:
        """Each heartbeat: drop silent clients, check memory, offer work, ask
        about ranges out (each dead_after), look for work."""
        now = self.loop.time()
        for client in list(self.clients.values()):
            if client.id in self.control.local:
                continue
            if now - client.last_seen > self.settings.client_timeout:
                self._drop_client(client, "went silent")
        self.pool.check_memory()
        self.exchange.offer()
        self.exchange.ask_held()
        self.pool.kick()  # idle workers look for work elsewhere again
        self._tell_nodes()
        if self.mesh is not None:  # what our next heartbeats say
            self.mesh.update(
                load=os.getloadavg()[0],
                slots_free=self.pool.slots_total - self.pool.slots_busy,
                state="draining" if self.draining else "alive",
                tasks_done=self.pool.items_done,
            )

    async def drain(self) -> None:
        """Take no new jobs and start no queued task; let running tasks finish
        up to the drain timeout (what never started fails in `close`). The
        lease, if we hold it, goes to another node first: the hive's work
        must not wait a lease for a coordinator while we drain and after."""
        self.stopping = True
        if self.mesh is not None:
            self.mesh.step_down()
        self._start_draining()
        self._drained.clear()  # a `hivectl drain` may have set it while tasks still ran
        running, began = self.pool.slots_busy, self.loop.time()
        if running:
            log.info("draining to stop: %d task(s) running may finish within drain_timeout %g s; "
                     "nothing new starts", running, self.settings.drain_timeout)
            try:
                await asyncio.wait_for(self._drained.wait(), self.settings.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: %d task(s) still running after %g s are stopped",
                            self.pool.slots_busy, self.settings.drain_timeout)
            else:
                log.info("drained in %.2f s: every running task finished", self.loop.time() - began)

    async def close(self) -> None:
        """Fail what is left to its clients, stop the workers, release sockets."""
        self.draining = True
        for key in list(self.owner.jobs):
            client = self.clients.get(key[0])
            if client is not None:
                self._refuse(client, key[1], STOPPED, f"hived on {self.name} stopped")
            self.owner.cancel_job(key)
            self._forget_job(key, cancelled="the node stopped")
        await self.background.aclose()
        if self.mesh is not None:
            self.mesh.leave()
        await self.pool.stop()
        self.control.close()
        if self.mesh is not None:
            self.mesh.close()
        self.stopped.set()

    # -- clients ---------------------------------------------------------------

    def attach(self, client: bytes, deliver: Callable[[list[Any]], None]) -> Callable[[list[Any]], None]:
        """Link an in-process client (the embedded hive)."""
        return self.control.attach(client, deliver)

    def _on_client_message(self, cid: bytes, msg: Message, payload: list[Any]) -> None:
        client = self.clients.get(cid)
        if client is None:
            self._on_stranger(cid, msg)
            return
        client.last_seen = self.loop.time()
        handler = self._handlers.get(type(msg))
        if handler is None:
            log.warning("control: unexpected %s from client %s", type(msg).__name__, client.label)
            return
        job = getattr(msg, "job", None)
        if client.unwelcome is not None and job is not None:
            self._refuse(client, job, INVALID, client.unwelcome)
            return
        try:
            handler(client, msg, payload)
        except LocalProtocolError as exc:
            log.warning("control: client %s: %s", client.label, exc)
            if job is not None:
                self._refuse(client, job, INVALID, str(exc))

    def _on_stranger(self, cid: bytes, msg: Message) -> None:
        """A client we do not know: it may say HELLO; anything else gets an error."""
        if isinstance(msg, Hello):
            self._strangers.known(cid)
            client = self.clients[cid] = ClientState(cid, msg.client, self.loop.time())
            client.unwelcome = version_problem(msg.version)
            if client.unwelcome is not None:
                # Queries are still answered (a newer hivectl may look at and
                # drain an older node during an upgrade); jobs are refused.
                log.warning("control: client %s: %s", msg.client[:80], client.unwelcome)
                self.control.send(cid, Unwelcome(self.name, client.unwelcome))
                return
            slots = sum(cpus + gpus for cpus, gpus in self._hive())
            s = self.settings
            welcome = Welcome(self.name, __version__, slots, s.heartbeat, s.dead_after,
                              self.draining, self.client_addresses())
            self.control.send(cid, welcome)
            return
        reply = self._strangers.answer(cid, msg)
        if reply is not None:
            self.control.send(cid, reply)

    def _open_job(
        self, client: ClientState, msg: OpenJob, payload: list[Any], call: bool = False
    ) -> None:
        """`call`: a submit's job of one task (`_call`)."""
        key = (client.id, msg.job)
        problem = job_problem(msg, self.name, self.draining, self._hive())
        if problem:
            self._refuse(client, msg.job, *problem)
            return
        if msg.has_blob:
            if not payload:
                self._refuse(client, msg.job, INVALID, "the job says it carries its function but has no frame")
                return
            blob = frame_bytes(payload[0])
            if function_digest(blob) != msg.fn:
                self._refuse(client, msg.job, INVALID, "the function blob does not match the hash the job names")
                return
            self.blobs.add(msg.fn, blob)
        if msg.fn not in self.blobs:
            self._refuse(client, msg.job, UNKNOWN_BLOB, "this node does not have the job's function")
            return
        if msg.fn not in client.fns:
            client.fns.add(msg.fn)
            self.blobs.use(msg.fn)
        job = self.owner.open_job(key, msg.fn, Needs(msg.cpus, msg.gpus), msg.retries, self.loop.time())
        client.jobs.add(msg.job)
        self.own.opened(job, msg.label, client.label, call,
                        f"cpus={msg.cpus} gpus={msg.gpus} retries={msg.retries}, tasks as they come")

    def _call(self, client: ClientState, msg: Call, payload: list[Any]) -> None:
        """A submit in one message: open the job, add its one item, close it."""
        blob = payload[:1] if msg.has_blob else []
        opened = OpenJob(msg.job, msg.fn, msg.has_blob, 1, 0, msg.retries, msg.label)
        self._open_job(client, opened, blob, call=True)
        if (client.id, msg.job) in self.owner.jobs:
            self._add_chunk(client, AddChunk(msg.job, 0, 1), payload[len(blob) :])
            self._close_job(client, CloseJob(msg.job), [])

    def client_addresses(self) -> list[str]:
        """Where clients reach the hive's nodes that take jobs (alive, not
        draining), this one first: the mesh addresses, whose inboxes serve
        clients too. Empty without a mesh."""
        if self.mesh is None:
            return []
        members = self.mesh.members()
        found = [m.address for m in members if m.state == "alive"]
        return found[:MAX_NODES]

    def _tell_nodes(self) -> None:
        """Each heartbeat: socket clients hear of a change in the hive's nodes,
        so that they know where to go should this node be lost."""
        nodes = self.client_addresses()
        if nodes == self._told_nodes:
            return
        self._told_nodes = nodes
        for cid in self.clients:
            if cid not in self.control.local:
                self.control.send(cid, Nodes(nodes))

    def _hive(self) -> list[Capacity]:
        members = self.mesh.members() if self.mesh is not None else []
        return hive_slots((self.settings.cpus, len(self.settings.gpus)), members)

    def _add_chunk(self, client: ClientState, msg: AddChunk, payload: list[Any]) -> None:
        key = (client.id, msg.job)
        if key not in self.owner.jobs:
            return  # cancelled meanwhile
        self.owner.add_chunk(key, msg.chunk, msg.count, payload)
        self.pool.kick()
        if any(self.owner.queued_items()):  # more than our own workers take now
            self.exchange.offer(soon=True)

    def _close_job(self, client: ClientState, msg: CloseJob, payload: list[Any]) -> None:
        key = (client.id, msg.job)
        if key in self.owner.jobs and self.owner.close_job(key) is not None:
            self._forget_job(key)

    def _cancel_job(self, client: ClientState, msg: CancelJob, payload: list[Any]) -> None:
        self._cancel((client.id, msg.job), grace=CANCEL_GRACE, why="its client cancelled it")

    def _cancel(self, key: JobKey, grace: float, why: str) -> None:
        aids = set(self.owner.cancel_job(key))
        self._forget_job(key, cancelled=why)
        if aids:
            reason = "its job was cancelled"
            if grace:
                self.background.call_later(grace, self._abort, aids, reason)
            else:
                self._abort(aids, reason)

    def _abort(self, aids: set[int], reason: str) -> None:
        """Stop the assignments of a job that ended: here, and on the nodes that pulled them."""
        self.pool.abort(aids, reason)
        self.exchange.drop(aids)

    def _forget_job(self, key: JobKey, cancelled: str | None = None) -> None:
        """The job is out of the owner's book: finished, or `cancelled` and why."""
        client = self.clients.get(key[0])
        if client is not None:
            client.jobs.discard(key[1])
        self.own.forget(key, self.loop.time(), cancelled)

    def _drop_client(self, client: ClientState, why: str) -> None:
        if client.jobs:
            log.info("client %s %s; dropping its %d job(s)", client.label, why, len(client.jobs))
        for job in list(client.jobs):
            self._cancel((client.id, job), grace=0, why=f"its client {why}")
        for fn in client.fns:
            self.blobs.release(fn)
        self.clients.pop(client.id, None)
        self.control.detach(client.id)

    def _refuse(self, client: ClientState, job: int, kind: str, text: str) -> None:
        self.control.send(client.id, JobRefused(job, kind, text))

    # -- reports on our own jobs' ranges, from our pool or other nodes (the exchange's Sink) --

    def tag(self, key: JobKey) -> int:
        return self.own.tag(key)

    def on_done(
        self, aid: int, start: int, stop: int, elapsed: float, failures: int, frames: list[Any]
    ) -> None:
        key = self.owner.assignment(aid)
        if key is None:
            return
        delivery = self.owner.completed(aid, start, stop, final=True, raised=failures)
        if delivery is not None:
            self.control.send(key[0], Result(key[1], delivery.chunk, start, stop, elapsed, failures), frames)
        self._retire_if_finished(key)

    def on_fail(self, aid: int, text: str) -> None:
        key = self.owner.assignment(aid)
        if key is None:
            return
        failed = self.owner.refused(aid)
        if failed is not None:
            msg = ItemsFailed(key[1], failed.chunk, failed.start, failed.stop, SERIALIZATION, text)
            self.control.send(key[0], msg)
        self._retire_if_finished(key)

    def on_lost(self, aid: int, crashed_at: int | None, why: str) -> None:
        key = self.owner.assignment(aid)
        if key is None:
            return
        for f in self.owner.lost(aid, crashed_at):
            text = f"{why} (tried {f.tries} time{'s' if f.tries > 1 else ''})"
            self.control.send(key[0], ItemsFailed(key[1], f.chunk, f.index, f.index + 1, CRASHED, text))
        self._retire_if_finished(key)

    def on_output(self, tag: int, piece: Piece, source: str) -> None:
        """What a task emitted, to the client of its job (dropped once that is gone)."""
        key = self.own.tagged(tag)
        if key is None or key[0] not in self.clients:
            # Its client is gone: the text is the user's, not for our log.
            log.debug("dropped %d characters of output from %s: its client is gone",
                      len(piece.text), source)
            return
        self.control.send(key[0], Output(key[1], piece.stream, piece.text, source,
                                         piece.logger, piece.level))

    def _retire_if_finished(self, key: JobKey) -> None:
        if key not in self.owner.jobs:  # the Owner retires a job once all is delivered
            self._forget_job(key)
        self.task_ended()

    def task_ended(self) -> None:
        """A task ended: if we drain and none runs any more, the drain is over."""
        if self.draining and not self.pool.slots_busy and not self._drained.is_set():
            self._drained.set()
            if not self.stopping:  # a stop's drain says so itself (`drain`)
                log.info("drained: no task runs here any more")

    # -- hivectl ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return node_status(self)

    def job_rows(self) -> list[dict[str, Any]]:
        """This node's jobs as `hivectl jobs` lists them."""
        def client_label(cid: bytes) -> str:
            client = self.clients.get(cid)
            return client.label if client else ""

        return self.own.rows(self.owner.jobs.values(), self.loop.time(), client_label)

    def _status_query(self, client: ClientState, msg: StatusQuery, payload: list[Any]) -> None:
        self.control.send(client.id, Answer(msg.request, self.status()))

    def _jobs_query(self, client: ClientState, msg: JobsQuery, payload: list[Any]) -> None:
        def reply(rows: list[dict[str, Any]]) -> None:
            self.control.send(client.id, Answer(msg.request, {"jobs": rows}))

        self.exchange.gather_jobs(reply)

    def _answer(self, cid: bytes, request: int, body: dict[str, Any]) -> None:
        """Answer a client's query, unless it is gone meanwhile."""
        if cid in self.clients:
            self.control.send(cid, Answer(request, body))

    def _reload_request(self, client: ClientState, msg: ReloadRequest, payload: list[Any]) -> None:
        if self.on_reload is None:
            body = {"error": f"hived on {self.name} is embedded in a program; it has no "
                             "configuration file to read again"}
        else:
            body = self.on_reload(f"reload (asked on the control socket by {client.label})")
        self.control.send(client.id, Answer(msg.request, body))

    # -- steering from any node: drain, undrain, cancel ---------------------------

    def _drain_request(self, client: ClientState, msg: DrainRequest, payload: list[Any]) -> None:
        self.steering.steer_node(client.id, msg.request, "drain", msg.node)

    def _undrain_request(self, client: ClientState, msg: UndrainRequest, payload: list[Any]) -> None:
        self.steering.steer_node(client.id, msg.request, "undrain", msg.node)

    def _cancel_request(self, client: ClientState, msg: CancelRequest, payload: list[Any]) -> None:
        self.steering.cancel(client.id, msg.request, msg.job_id)

    def _on_mesh_message(self, sender: str, msg: Message, payload: list[Any]) -> None:
        """A member's work or steering message (the mesh checked it is a member)."""
        if isinstance(msg, (Steer, Steered)):
            self.steering.on_message(sender, msg)
        else:
            self.exchange.handle(sender, msg, payload)

    def _steer(self, action: str, target: str, by: str) -> tuple[bool, str, list[str]]:
        """Do what hivectl on node `by` asked of this node: (done, what was done
        or why not, for a cancel of a job not ours the ids of our jobs)."""
        if action == "cancel":
            return self._cancel_by_id(target, by)
        if action == "drain":
            if self.draining:
                return True, f"{self.name} is draining already", []
            log.info("draining (asked by %s via hivectl): finishing what runs, taking nothing new", by)
            self._start_draining()
        elif self.stopping:
            return False, f"hived on {self.name} is stopping; it cannot take work again", []
        elif not self.draining:
            return True, f"{self.name} was not draining", []
        else:
            log.info("drain ended (asked by %s via hivectl): taking work again", by)
            self._stop_draining()
        if self.on_state_change is not None:
            self.on_state_change()
        return True, f"{self.name} is {'draining' if self.draining else 'taking work again'}", []

    def _cancel_by_id(self, target: str, by: str) -> tuple[bool, str, list[str]]:
        keys = [key for key in self.owner.jobs if job_id(key) == target]
        if not keys:
            return False, f"{self.name} owns no job {target!r}", [job_id(k) for k in self.owner.jobs]
        for key in keys:  # its line says how much was done (`_forget_job`)
            client = self.clients.get(key[0])
            if client is not None:
                self._refuse(client, key[1], CANCELLED,
                             f"job {target} was cancelled (`hivectl cancel` on {by})")
            self._cancel(key, grace=CANCEL_GRACE, why=f"asked by {by} via hivectl")
        return True, f"job {target} cancelled on its owner {self.name}", []

    def _stop_draining(self) -> None:
        """Take work again: new jobs, queued tasks, ranges from other owners."""
        self.draining = False
        self.pool.holding = False
        self._drained.clear()
        self.pool.kick()

    def _start_draining(self) -> None:
        """Take no new jobs and start no task; give back pulled ranges not started.
        Our own jobs' queued work is still served to other nodes that pull it."""
        self.draining = True
        self.pool.holding = True
        self.exchange.hand_back()
