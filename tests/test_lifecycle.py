"""The pool's worker lifecycle without processes: the table, the O(1) check
at each move, and the pool's invariants over worker records (the process
each record would hold is a stand-in: only the records are under test)."""

from __future__ import annotations

import itertools

import pytest

from hived.errors import InternalError
from hived.node import lifecycle as lc
from hived.node.pool import WorkerProc
from hived.node.scheduling import Assignment, Needs

LEGAL = [
    (lc.STARTING, lc.WorkerEvent.READY, lc.IDLE),
    (lc.IDLE, lc.WorkerEvent.ASSIGNED, lc.BUSY),
    (lc.BUSY, lc.WorkerEvent.FINISHED, lc.IDLE),
    (lc.IDLE, lc.WorkerEvent.RETIRE, lc.RETIRING),
    (lc.STARTING, lc.WorkerEvent.RETIRE, lc.RETIRING),
    (lc.RETIRING, lc.WorkerEvent.READY, lc.RETIRING),
    *[(s, lc.WorkerEvent.EXITED, lc.EXITED) for s in (lc.STARTING, lc.IDLE, lc.BUSY, lc.RETIRING)],
]
ILLEGAL = sorted(
    set(itertools.product(lc.WorkerState, lc.WorkerEvent)) - {(s, e) for s, e, _ in LEGAL}
)


def worker(number: int = 1, device: str | None = None) -> WorkerProc:
    return WorkerProc(number, device, proc=None, box_path="", link=None)  # type: ignore[arg-type]  # no process here


def assignment(aid: int = 7, cpus: int = 1, gpus: int = 0) -> Assignment:
    return Assignment(aid, (b"c", 1), b"fn", 0, 0, 1, [], Needs(cpus, gpus))


def ready(w: WorkerProc) -> WorkerProc:
    w.said_ready = True
    w.move(lc.WorkerEvent.READY)
    return w


def test_the_table_is_exactly_the_legal_moves() -> None:
    assert lc.TRANSITIONS == {(s, e): new for s, e, new in LEGAL}


@pytest.mark.parametrize(("state", "event", "new"), LEGAL)
def test_a_legal_move_goes_where_the_table_says(state, event, new) -> None:
    w = worker()
    w.state = state
    lc.advance(w, event)
    assert w.state is new


@pytest.mark.parametrize(("state", "event"), ILLEGAL)
def test_every_illegal_move_is_refused_naming_state_and_event(state, event) -> None:
    w = worker(3)
    w.state = state
    with pytest.raises(InternalError, match=f"pool worker 3: event {event} in state {state}"):
        lc.advance(w, event)
    assert w.state is state


def test_a_worker_lives_its_life_through_the_table() -> None:
    w = worker()
    assert w.state is lc.STARTING and not w.idle
    ready(w)
    assert w.idle
    w.running = assignment()
    w.move(lc.WorkerEvent.ASSIGNED)
    assert w.state is lc.BUSY and not w.idle
    w.running = None
    w.move(lc.WorkerEvent.FINISHED)
    w.move(lc.WorkerEvent.RETIRE)
    assert w.retiring and not w.idle
    w.move(lc.WorkerEvent.EXITED)
    assert w.state is lc.EXITED


def test_a_move_that_disagrees_with_what_the_worker_holds_is_caught() -> None:
    w = ready(worker(2))
    with pytest.raises(InternalError, match="worker 2 is busy holding None"):
        w.move(lc.WorkerEvent.ASSIGNED)  # the pool forgot to give it the assignment
    w = worker(4)
    with pytest.raises(InternalError, match="worker 4 is idle but never said READY"):
        w.move(lc.WorkerEvent.READY)


def pool_of(*workers: WorkerProc) -> dict[int, WorkerProc]:
    return {w.number: w for w in workers}


def test_a_consistent_pool_has_no_problems() -> None:
    busy = ready(worker(1))
    busy.running = assignment(cpus=2)
    busy.move(lc.WorkerEvent.ASSIGNED)
    idle, starting, gpu = ready(worker(2)), worker(3), ready(worker(4, device="0"))
    retiring = ready(worker(5))
    retiring.move(lc.WorkerEvent.RETIRE)
    workers = pool_of(busy, idle, starting, gpu, retiring)
    assert lc.pool_problems(workers, cpus=3, gpus=1, closing=False) == []


def test_pool_problems_name_each_broken_invariant() -> None:
    busy = ready(worker(1))
    busy.running = assignment(cpus=3)
    busy.move(lc.WorkerEvent.ASSIGNED)
    misfiled = ready(worker(2))
    workers = {1: busy, 7: misfiled}
    problems = lc.pool_problems(workers, cpus=2, gpus=1, closing=False)
    assert problems == [
        "worker record 7 holds worker 2",
        "3 CPU slots busy of 2",
        "2 CPU and 0 GPU workers serving, for 2 CPU slots and 1 GPUs",
    ]
    # a closing pool is not short of workers
    assert "serving" not in " ".join(lc.pool_problems(workers, 2, 1, closing=True))


def test_an_exited_worker_left_in_the_pool_is_a_problem() -> None:
    w = ready(worker(1))
    w.move(lc.WorkerEvent.EXITED)
    assert "worker 1 exited but is still in the pool" in lc.pool_problems(
        pool_of(w), cpus=1, gpus=0, closing=False
    )
