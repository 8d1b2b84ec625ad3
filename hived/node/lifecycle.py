"""A pool worker's lifecycle: its states, the events that move it, and the
pool's invariants — sans-IO.

    STARTING ──READY──▶ IDLE ──ASSIGNED──▶ BUSY
        │                ▲ └──RETIRE──┐     │
        │                └─FINISHED───┼─────┘
        └──RETIRE──▶ RETIRING ◀───────┘
    any state but EXITED ──EXITED──▶ EXITED

A worker is STARTING until it says READY, IDLE or BUSY with exactly one
assignment, RETIRING once the pool told it to exit (after
`max_tasks_per_worker` items, or past `memory_limit`; its successor is
already starting), and EXITED once its process is gone. The pool
(`hived.node.pool`) moves a worker only through `TRANSITIONS`; a kill is not
a move (the exit that follows is).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from hived.mesh.sansio import StrEnum, transition
from hived.node.scheduling import Assignment


class WorkerState(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"
    EXITED = "exited"


class WorkerEvent(StrEnum):
    READY = "ready"  # it connected and said READY
    ASSIGNED = "assigned"  # the pool sent it an assignment
    FINISHED = "finished"  # it sent DONE or FAIL for that assignment
    RETIRE = "retire"  # the pool told it to exit (worn out or too heavy)
    EXITED = "exited"  # its process is gone (pidfd readable)


STARTING, IDLE, BUSY, RETIRING, EXITED = WorkerState

# (state, event) -> the state it moves to. Nothing else sets a worker's state.
TRANSITIONS: dict[tuple[WorkerState, WorkerEvent], WorkerState] = {
    (STARTING, WorkerEvent.READY): IDLE,
    (STARTING, WorkerEvent.RETIRE): RETIRING,  # too heavy before it said READY
    (STARTING, WorkerEvent.EXITED): EXITED,
    (IDLE, WorkerEvent.ASSIGNED): BUSY,
    (IDLE, WorkerEvent.RETIRE): RETIRING,
    (IDLE, WorkerEvent.EXITED): EXITED,
    (BUSY, WorkerEvent.FINISHED): IDLE,
    (BUSY, WorkerEvent.EXITED): EXITED,  # a crash, or killed by the pool
    (RETIRING, WorkerEvent.READY): RETIRING,  # retired while starting: it exits anyway
    (RETIRING, WorkerEvent.EXITED): EXITED,
}


class Worker(Protocol):
    """What the lifecycle reads of a pool's worker record."""

    number: int
    device: str | None
    state: WorkerState
    said_ready: bool
    running: Assignment | None


def advance(worker: Worker, event: WorkerEvent) -> None:
    """Move `worker` by `event` (see TRANSITIONS); InternalError if it may not."""
    worker.state = transition(TRANSITIONS, f"pool worker {worker.number}", worker.state, event)


def worker_problems(w: Worker) -> list[str]:
    """How `w`'s state disagrees with what it holds, one line each."""
    problems = []
    if (w.state is BUSY) != (w.running is not None):
        problems.append(f"worker {w.number} is {w.state} holding {w.running!r}")
    if w.state in (IDLE, BUSY) and not w.said_ready:
        problems.append(f"worker {w.number} is {w.state} but never said READY")
    if w.state is STARTING and w.said_ready:
        problems.append(f"worker {w.number} said READY but is still starting")
    return problems


def pool_problems(
    workers: Mapping[int, Worker],
    cpus: int,
    gpus: int,
    closing: bool,
) -> list[str]:
    """The pool's invariants that do not hold, one line each: every worker
    consistent; the busy CPU slots fit in `cpus`; and, unless the pool is
    closing, one worker that is not retiring per CPU slot and per GPU."""
    problems = []
    for number, w in workers.items():
        if w.number != number:
            problems.append(f"worker record {number} holds worker {w.number}")
        if w.state is EXITED:
            problems.append(f"worker {number} exited but is still in the pool")
        problems += worker_problems(w)
    busy = sum(w.running.needs.cpus for w in workers.values()
               if w.running is not None and w.device is None)  # fmt: skip
    if busy > cpus:
        problems.append(f"{busy} CPU slots busy of {cpus}")
    if not closing:
        serving = [w for w in workers.values() if w.state is not RETIRING]
        cpu_workers = sum(1 for w in serving if w.device is None)
        gpu_workers = len(serving) - cpu_workers
        if (cpu_workers, gpu_workers) != (cpus, gpus):
            problems.append(
                f"{cpu_workers} CPU and {gpu_workers} GPU workers serving, "
                f"for {cpus} CPU slots and {gpus} GPUs"
            )
    return problems
