"""Work across the mesh: owners serve ranges, worker nodes pull them.

Theory of operation
-------------------
Every node plays three parts here, on the node's one event loop:

- **Owner.** Jobs submitted to this node live in its `Owner` book. While
  it has queued work, it OFFERs it to the coordinator every heartbeat; a
  PULL from another node gets ranges that fit that node's free slots
  (RANGE, with the function blob the first time) or NONE. Results come back
  as DONE/FAIL/LOST/OUT and go to the same `Sink` as the local pool's
  reports on our jobs, so dedup, retries and delivery are one code path.
  When a node is declared dead or leaves, its ranges are requeued (at-least-once
  execution; the book drops any late result, so delivery stays exactly-once).
  A RANGE the link refused (the node's connection is down, as it is for a
  while after either side was paused) is requeued at once: no report could
  ever come for it. A RANGE or a report the link took and then lost (a
  connection dropped or re-dialled with messages still queued) is found by
  asking: every `dead_after` the owner sends each node the list of ranges it
  has out there (HELD?), and the node answers with those it does not hold
  (HELD); these run again. Both messages travel behind the RANGEs and
  reports on the same connections, so a range the node does not hold when
  the question arrives was never delivered, or its report was.
- **Coordinator.** Matches WANTs to OFFERs (`Matchmaker`); it never sees
  task data, and a new coordinator rebuilds its view from the next OFFERs.
- **Worker node.** Its pool takes local work first, then ranges pulled from
  other owners. When workers sit idle it pulls again from owners that just
  gave it work, or asks the coordinator (`Puller`). A report the link to its
  owner refused is sent again every heartbeat while the owner is a member,
  dead or not: an owner that stalled past dead_after and runs again waits on
  exactly those reports, and may never have seen this node dead.

    local clients ──▶ Owner ──RANGE──▶ other nodes' pools
                        ▲ └───────────▶ this node's pool ◀──RANGE── other owners
                        └──DONE/LOST── (either)

The exchange is the local pool's source and sink. It hands out our own
jobs' work first, then the ranges it pulled, each under a local id of its
own; the pool's reports on those ids, and the output of those ranges' tasks
(under job tags of its own), go back to their owners; every other report is
on our own jobs and goes to the `Sink`.

Its collaborators are narrow: the owner's book (`Owner`), the pool's
`Slots`, the `BlobStore`, the `Sink`, and, once the node joined one, the
mesh (`MeshLink`). Its timers belong to the node's `Background`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from hived.errors import InternalError
from hived.mesh.matchmaking import (
    HeldAsk,
    HeldTell,
    JobsAsk,
    JobsTell,
    Matchmaker,
    Nothing,
    Offer,
    Point,
    Pull,
    Puller,
    RangeDone,
    RangeDrop,
    RangeFailed,
    RangeLost,
    RangeMsg,
    RangeOutput,
    Want,
)
from hived.net.background import Background
from hived.net.frames import frame_bytes
from hived.node.blobs import BlobStore
from hived.node.scheduling import Assignment, JobKey, Needs, Owner
from hived.node.taskoutput import Piece
from hived.protocol.fields import NOT_STARTED
from hived.protocol.serialization import function_digest
from hived.protocol.wire import Message

log = logging.getLogger(__name__)

OFFER_GAP = 0.05  # seconds between offers prompted by new work

JobRows = list[dict[str, Any]]  # `hivectl jobs` rows
Report = RangeDone | RangeFailed | RangeLost  # a pulled range's report to its owner


class Sink(Protocol):
    """Where reports on this node's own jobs go, from its pool or from the
    nodes that pulled their ranges: the node, which delivers to clients."""

    def on_done(
        self, aid: int, start: int, stop: int, elapsed: float, failures: int, frames: list[Any]
    ) -> None: ...
    def on_fail(self, aid: int, text: str) -> None: ...
    def on_lost(self, aid: int, crashed_at: int | None, why: str) -> None: ...
    def on_output(self, tag: int, piece: Piece, source: str) -> None:
        """What a task of the job tagged `tag` emitted, `source` the node and pid."""
    def tag(self, key: JobKey) -> int:
        """The small number that names one of our jobs to the pool and to other nodes."""
    def task_ended(self) -> None:
        """A task of a range pulled from another owner stopped running here
        (the reports of our own jobs' tasks say so themselves)."""


class Slots(Protocol):
    """What the exchange asks of the local pool."""

    def kick(self) -> None: ...
    def free_slots(self) -> tuple[int, int]: ...
    def abort(self, aids: set[int], reason: str) -> None: ...


class MeshLink(Protocol):
    """What the exchange asks of the mesh (hived.mesh.shell.Mesh)."""

    advertise: str

    def send(self, address: str, msg: Message, payload: list[Any] | tuple[Any, ...] = ()) -> bool: ...
    def redial(self, address: str) -> None: ...
    def coordinator_address(self) -> str | None: ...
    def is_coordinator(self) -> bool: ...
    def term(self) -> int: ...
    def accept_term(self, term: int) -> bool: ...
    def members_alive(self) -> list[str]: ...


class Pulled(NamedTuple):
    """A range pulled from another owner, as the local pool runs it."""

    owner: str  # the owner's mesh address
    assignment: int  # the owner's id for it
    job: JobKey  # (owner, the owner's tag of its job)


class Exchange:
    def __init__(
        self,
        book: Owner,
        blobs: BlobStore,
        sink: Sink,
        background: Background,
        *,
        name: str,
        heartbeat: float,
        dead_after: float,
        draining: Callable[[], bool],
        job_rows: Callable[[], JobRows],
    ) -> None:
        self.book, self.blobs, self.sink, self.background = book, blobs, sink, background
        self.name, self.heartbeat, self.dead_after = name, heartbeat, dead_after
        self.draining, self.job_rows = draining, job_rows
        self.mesh: MeshLink | None = None  # the node's, once it joined one
        self.matchmaker = Matchmaker(expire=3 * heartbeat)
        self.puller = Puller(retry=heartbeat)
        # owner side: our assignments out on other nodes
        self.out: dict[int, str] = {}  # assignment -> node address
        self.sent_blobs: dict[str, set[bytes]] = {}
        # worker-node side: ranges pulled from other owners
        self.queue: deque[Assignment] = deque()
        self.taken: dict[int, Pulled] = {}  # local id -> the range
        # tags of the pulled ranges' jobs, for their tasks' output (ours are the Sink's)
        self._pulled_tags: dict[JobKey, int] = {}
        self._tagged_pulled: dict[int, JobKey] = {}
        self._tags = itertools.count(-1, -1)
        # reports the link to their owner refused: (owner, message, frames), to resend
        self.unsent: list[tuple[str, Report, list[Any]]] = []
        self._resending: asyncio.TimerHandle | None = None
        self._ids = itertools.count(-1, -1)
        self._asks = itertools.count(1)
        # `hivectl jobs` answers being gathered: ask id -> (rows, nodes yet to answer, reply)
        self._gathering: dict[int, tuple[JobRows, set[str], Callable[[JobRows], None]]] = {}
        self._offered = float("-inf")
        self._asked_held = float("-inf")
        self._unanswered: set[str] = set()  # nodes asked HELD? that have not answered yet
        self._handlers: dict[type[Message], Callable[[str, Any, list[Any]], None]] = {
            Offer: self._on_offer,
            Want: self._on_want,
            Point: self._on_point,
            Pull: self._on_pull,
            RangeMsg: self._on_range,
            Nothing: self._on_nothing,
            RangeDone: self._on_done,
            RangeFailed: self._on_failed,
            RangeLost: self._on_lost,
            RangeOutput: self._on_output,
            JobsAsk: self._on_jobs_ask,
            JobsTell: self._on_jobs_tell,
            RangeDrop: self._on_drop,
            HeldAsk: self._on_held_ask,
            HeldTell: self._on_held_tell,
        }

    pool: Slots  # the local pool, given by `attach`

    def attach(self, pool: Slots, mesh: MeshLink | None) -> None:
        """Work with `pool` (whose source and sink this is) and `mesh` (None: a node alone)."""
        self.pool, self.mesh = pool, mesh

    def handle(self, sender: str, msg: Message, payload: list[Any]) -> None:
        self._handlers[type(msg)](sender, msg, payload)

    @property
    def link(self) -> MeshLink:
        """The mesh, for what happens only on a node of one (a mesh message, a pulled range)."""
        if self.mesh is None:
            raise InternalError("the exchange has no mesh: this node joined none")
        return self.mesh

    def _now(self) -> float:
        return self.background.loop.time()

    # -- the pool's source: local work first, then pulled ranges ------------------

    def assign(self, fits: Callable[[Needs], bool]) -> Assignment | None:
        local = self.book.assign(fits)
        if local is not None:
            return local
        for i, a in enumerate(self.queue):
            if fits(a.needs):
                del self.queue[i]
                return a
        return None

    def idle(self) -> None:
        """The pool has idle workers and nothing for them: find work elsewhere."""
        if self.mesh is None or self.draining():
            return
        now = self._now()
        direct, want = self.puller.idle(now)
        free_cpus, free_gpus = self.pool.free_slots()
        for owner in direct:
            self.link.send(owner, Pull(free_cpus, free_gpus, self._known()))
        if want:
            coordinator = self.link.coordinator_address()
            if coordinator == self.link.advertise:  # we are the coordinator
                self._on_want(coordinator, Want(free_cpus, free_gpus), [])
            elif coordinator is not None:
                self.link.send(coordinator, Want(free_cpus, free_gpus))

    # -- owner side ---------------------------------------------------------------

    def offer(self, soon: bool = False) -> None:
        """Tell the coordinator how much work waits here: each heartbeat, and
        `soon` after new work arrives (at most every OFFER_GAP seconds)."""
        if self.mesh is None:
            return
        now = self._now()
        if soon and now - self._offered < OFFER_GAP:
            return
        self._offered = now
        cpu, gpu = self.book.queued_items()
        coordinator = self.link.coordinator_address()
        if coordinator is not None and (cpu or gpu):
            msg = Offer(cpu, gpu)
            if coordinator == self.link.advertise:
                self._on_offer(coordinator, msg, [])
            else:
                self.link.send(coordinator, msg)

    def _on_pull(self, sender: str, msg: Pull, payload: list[Any]) -> None:
        owner, sent = self.book, self.sent_blobs.setdefault(sender, set())
        sent.update(msg.known)
        budget = {"cpus": msg.cpus, "gpus": msg.gpus}

        def fits(needs: Needs) -> bool:
            if needs.gpus:
                return budget["gpus"] >= needs.gpus
            return budget["cpus"] >= needs.cpus

        given = 0
        while True:  # a draining owner still serves its jobs to others
            a = owner.assign(fits)
            if a is None:
                break
            budget["gpus" if a.needs.gpus else "cpus"] -= a.needs.gpus or a.needs.cpus
            has_blob = a.fn not in sent
            blob = [self.blobs[a.fn]] if has_blob else []
            rng = RangeMsg(a.id, self.sink.tag(a.job), a.fn, has_blob, a.start, a.stop,
                           a.needs.cpus, a.needs.gpus, a.precise)
            if not self.link.send(sender, rng, [*blob, *a.frames]):
                # Never left: back to the front of the queue, uncharged (it
                # would be handed out again at once, so stop here).
                self.sink.on_lost(a.id, None, f"the link to {sender} is down")
                self.pool.kick()
                return
            sent.add(a.fn)
            self.out[a.id] = sender
            given += 1
        if not given:
            self.link.send(sender, Nothing())

    def _on_done(self, sender: str, msg: RangeDone, payload: list[Any]) -> None:
        if self.out.pop(msg.assignment, None) == sender:
            self.sink.on_done(msg.assignment, msg.start, msg.stop, msg.elapsed, msg.failures, payload)

    def _on_failed(self, sender: str, msg: RangeFailed, payload: list[Any]) -> None:
        if self.out.pop(msg.assignment, None) == sender:
            self.sink.on_fail(msg.assignment, msg.text)

    def _on_lost(self, sender: str, msg: RangeLost, payload: list[Any]) -> None:
        if self.out.pop(msg.assignment, None) == sender:
            crashed_at = None if msg.crashed_at == NOT_STARTED else msg.crashed_at
            self.sink.on_lost(msg.assignment, crashed_at, msg.text)
            self.pool.kick()

    def _on_output(self, sender: str, msg: RangeOutput, payload: list[Any]) -> None:
        self.sink.on_output(msg.job, Piece(msg.stream, msg.text, msg.logger, msg.level), msg.source)

    def drop(self, aids: set[int]) -> None:
        """These assignments' job ended here: the nodes running them stop."""
        by_node: dict[str, list[int]] = {}
        for aid in sorted(aids):
            node = self.out.pop(aid, None)
            if node is not None:
                by_node.setdefault(node, []).append(aid)
        for node, dropped in by_node.items():
            self.link.send(node, RangeDrop(dropped))

    def hand_back(self) -> None:
        """Draining: ranges pulled but not started go back to their owners."""
        while self.queue:
            pulled = self._untake(self.queue.popleft().id)
            if pulled is not None:
                self._report_lost(pulled, None, f"{self.name} is draining")

    def node_gone(self, address: str, left: bool) -> None:
        """A node is dead or `left` (left, restarted, forgotten): its ranges of
        our jobs run again elsewhere, we stop waiting on it as an owner, and
        we start nothing more we pulled from it: its clients take their jobs
        to another node. What runs finishes (a dead owner may only be paused,
        and stopping a worker costs a respawn) unless the owner `left`; a
        dead owner that runs again finds what we dropped with its next HELD?."""
        if left:  # a dead owner may run again and wait on these; a left one never
            self.unsent = [u for u in self.unsent if u[0] != address]
        self._requeue([aid for aid, node in self.out.items() if node == address],
                      address, f"node {address} is gone")
        queued = {a.id for a in self.queue}  # pulled, not started
        pulled = [p.assignment for local, p in self.taken.items()
                  if p.owner == address and (left or local in queued)]
        if pulled:
            log.info("dropping %d range(s) pulled from %s, which is gone", len(pulled), address)
            self._drop_pulled(address, pulled, "its owner is gone")
        self.sent_blobs.pop(address, None)
        self.matchmaker.forget(address)
        self.puller.gone(address)

    def ask_held(self) -> None:
        """Each `dead_after`: ask every node with our ranges out which it holds.

        A node that left the last question unanswered while it stays a
        member hears us no more on this link (a cut shorter than dead_after in
        one direction, a rate cap that drove TCP's retransmit back-off to
        seconds): that link is dialled afresh instead, and what it still held
        is found by the next question's answer."""
        now = self._now()
        if self.mesh is None or now < self._asked_held + self.dead_after:
            return
        self._asked_held = now
        by_node: dict[str, list[int]] = {}
        for aid, node in self.out.items():
            by_node.setdefault(node, []).append(aid)
        asked = set()
        for node, aids in by_node.items():
            if node in self._unanswered:  # asked again once the new link is up
                log.info("no answer from %s to the last HELD? in %.1fs; dialling it again",
                         node, self.dead_after)
                self.link.redial(node)
            elif self.link.send(node, HeldAsk(aids)):
                asked.add(node)
        self._unanswered = asked

    def _on_held_tell(self, sender: str, msg: HeldTell, payload: list[Any]) -> None:
        self._unanswered.discard(sender)
        self._requeue([aid for aid in msg.missing if self.out.get(aid) == sender],
                      sender, f"{sender} lost it or its report")

    def _requeue(self, aids: list[int], address: str, why: str) -> None:
        """These ranges out on `address` will never be reported: run them again."""
        for aid in aids:
            del self.out[aid]
            self.sink.on_lost(aid, None, why)
        if aids:
            log.info("requeued %d range(s) that were out on %s: %s", len(aids), address, why)
            self.pool.kick()
            self.offer(soon=True)  # nodes waiting for work hear of it now

    # -- coordinator side -----------------------------------------------------------

    def _on_offer(self, sender: str, msg: Offer, payload: list[Any]) -> None:
        if self.link.is_coordinator():
            for node, owners in self.matchmaker.offer(sender, msg, self._now()):
                self._point(node, owners)

    def _on_want(self, sender: str, msg: Want, payload: list[Any]) -> None:
        if self.link.is_coordinator():
            owners = self.matchmaker.want(sender, msg, self._now())
            if owners:
                self._point(sender, owners)

    def _point(self, node: str, owners: list[str]) -> None:
        point = Point(self.link.term(), owners)
        if node == self.link.advertise:
            self._on_point(node, point, [])
        else:
            self.link.send(node, point)

    # -- hivectl jobs, cluster-wide ------------------------------------------------------

    def gather_jobs(self, reply: Callable[[list[dict[str, Any]]], None]) -> None:
        """Every live node's jobs, to `reply` once all answered or after a heartbeat."""
        rows = list(self.job_rows())
        peers = set(self.link.members_alive()) if self.mesh is not None else set()
        if not peers:
            reply(rows)
            return
        ask = next(self._asks)
        self._gathering[ask] = (rows, peers, reply)
        for address in peers:
            self.link.send(address, JobsAsk(ask))
        self.background.call_later(self.heartbeat, self._gathered, ask)

    def _gathered(self, ask: int) -> None:
        entry = self._gathering.pop(ask, None)
        if entry is not None:
            entry[2](entry[0])

    def _on_jobs_ask(self, sender: str, msg: JobsAsk, payload: list[Any]) -> None:
        self.link.send(sender, JobsTell(msg.request, self.job_rows()))

    def _on_jobs_tell(self, sender: str, msg: JobsTell, payload: list[Any]) -> None:
        entry = self._gathering.get(msg.request)
        if entry is None or sender not in entry[1]:
            return
        entry[0].extend(msg.jobs)
        entry[1].discard(sender)
        if not entry[1]:
            self._gathered(msg.request)

    # -- worker-node side -------------------------------------------------------------

    def _on_point(self, sender: str, msg: Point, payload: list[Any]) -> None:
        if not self.link.accept_term(msg.term) or self.draining():
            return  # a deposed coordinator's advice
        free_cpus, free_gpus = self.pool.free_slots()
        free = bool(free_cpus or free_gpus)
        for owner in self.puller.pointed(msg.owners, self._now(), free):
            self.link.send(owner, Pull(free_cpus, free_gpus, self._known()))

    def _on_range(self, sender: str, msg: RangeMsg, payload: list[Any]) -> None:
        self.puller.answered(sender, got_work=True)
        if self.draining():  # pulled before the drain began: straight back
            self.link.send(sender, RangeLost(msg.assignment, NOT_STARTED, f"{self.name} is draining"))
            return
        if msg.has_blob:
            if not payload:
                return
            blob, payload = frame_bytes(payload[0]), payload[1:]
            if function_digest(blob) != msg.fn:  # never run what is not what it claims to be
                log.warning("a RANGE from %s carries a function blob that does not match its"
                            " hash %s; refused", sender, msg.fn.hex())
                self.link.send(sender, RangeFailed(msg.assignment, "the function blob sent"
                                                   " does not match its hash"))
                return
            self.blobs.keep_remote(msg.fn, blob)
        if msg.fn not in self.blobs:
            self.link.send(sender, RangeLost(msg.assignment, NOT_STARTED, "function blob missing"))
            return
        local = next(self._ids)
        key: JobKey = (sender.encode(), msg.job)
        self.taken[local] = Pulled(sender, msg.assignment, key)
        if key not in self._pulled_tags:
            tag = self._pulled_tags[key] = next(self._tags)
            self._tagged_pulled[tag] = key
        self.queue.append(
            Assignment(local, key, msg.fn, -1, msg.start, msg.stop, payload,
                       Needs(msg.cpus, msg.gpus), msg.precise)
        )
        self.pool.kick()

    def _on_drop(self, sender: str, msg: RangeDrop, payload: list[Any]) -> None:
        self._drop_pulled(sender, msg.assignments, "its owner dropped the job")

    def _drop_pulled(self, owner: str, aids: list[int], why: str) -> None:
        """Forget these ranges pulled from `owner` that have not started, and
        stop the running ones (their workers report them lost; the owner
        ignores that)."""
        wanted = set(aids)
        drop = {local for local, p in self.taken.items() if p.owner == owner and p.assignment in wanted}
        for a in [a for a in self.queue if a.id in drop]:
            self.queue.remove(a)
            self._untake(a.id)
            drop.discard(a.id)
        if drop:
            self.pool.abort(drop, why)

    def _untake(self, local: int) -> Pulled | None:
        """The pulled range `local` ended here (None: it is not one); its job's
        tag goes with the job's last range."""
        pulled = self.taken.pop(local, None)
        if pulled is not None and all(p.job != pulled.job for p in self.taken.values()):
            self._tagged_pulled.pop(self._pulled_tags.pop(pulled.job))
        return pulled

    def _on_held_ask(self, sender: str, msg: HeldAsk, payload: list[Any]) -> None:
        asked = set(msg.assignments)
        mine = {local: p.assignment for local, p in self.taken.items() if p.owner == sender}
        held = set(mine.values()) | {u[1].assignment for u in self.unsent if u[0] == sender}
        self.link.send(sender, HeldTell(sorted(asked - held)))
        # what we hold that the owner no longer has out here, it settled
        # otherwise (it thought us dead, say): stop spending slots on it
        settled = [aid for aid in mine.values() if aid not in asked]
        if settled:
            self._drop_pulled(sender, settled, "its owner dropped the job")

    def _on_nothing(self, sender: str, msg: Nothing, payload: list[Any]) -> None:
        self.puller.answered(sender, got_work=False)

    def _known(self) -> list[bytes]:
        return self.blobs.known()

    # -- the pool's sink: reports on pulled ranges to their owners, the rest to ours ---

    def job_tag(self, key: JobKey) -> int:
        """The tag the pool labels a task's output with: a pulled range's job
        has one of ours here (its owner's tag is in its key); our jobs the Sink's."""
        tag = self._pulled_tags.get(key)
        return self.sink.tag(key) if tag is None else tag

    def on_done(
        self, aid: int, start: int, stop: int, elapsed: float, failures: int, frames: list[Any]
    ) -> None:
        pulled = self._untake(aid)
        if pulled is None:
            self.sink.on_done(aid, start, stop, elapsed, failures, frames)
            return
        self._report(pulled.owner, RangeDone(pulled.assignment, start, stop, elapsed, failures), frames)
        self.sink.task_ended()

    def on_fail(self, aid: int, message: str) -> None:
        pulled = self._untake(aid)
        if pulled is None:
            self.sink.on_fail(aid, message)
            return
        self._report(pulled.owner, RangeFailed(pulled.assignment, message))
        self.sink.task_ended()

    def on_lost(self, aid: int, crashed_at: int | None, why: str) -> None:
        pulled = self._untake(aid)
        if pulled is None:
            self.sink.on_lost(aid, crashed_at, why)
            return
        self._report_lost(pulled, crashed_at, why)
        self.sink.task_ended()

    def on_output(self, job: int, piece: Piece, pid: int) -> None:
        source = f"{self.name} pid={pid}"
        key = self._tagged_pulled.get(job)
        if key is None:
            self.sink.on_output(job, piece, source)
            return
        self.link.send(key[0].decode(), RangeOutput(key[1], piece.stream, piece.text, source,
                                                    piece.logger, piece.level))

    def _report_lost(self, pulled: Pulled, crashed_at: int | None, why: str) -> None:
        at = NOT_STARTED if crashed_at is None else crashed_at
        self._report(pulled.owner, RangeLost(pulled.assignment, at, why))

    def _report(self, owner: str, msg: Report, frames: list[Any] | tuple[Any, ...] = ()) -> None:
        """The owner waits on this report for ever: if the link refuses it, keep it."""
        if not self.link.send(owner, msg, frames):
            self.unsent.append((owner, msg, list(frames)))
            self._resend_later()

    def _resend_later(self) -> None:
        if self._resending is None and self.unsent:
            self._resending = self.background.call_later(self.heartbeat, self._resend)

    def _resend(self) -> None:
        # (a closed node's Background cancelled this timer before its mesh closed)
        self._resending = None
        self.unsent = [u for u in self.unsent if not self.link.send(*u)]
        self._resend_later()
