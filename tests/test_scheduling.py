"""The owner's book, fed events by hand: no sockets, no processes, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hived.errors import HiveError, InternalError, LocalProtocolError
from hived.node.scheduling import MAX_CHUNK_ITEMS, Needs, Owner
from hived.protocol.fields import SOMEWHERE

CLIENT = b"c1"


def book(chunks: list[int], retries: int = 2, job: int = 1) -> Owner:
    owner = Owner()
    owner.open_job((CLIENT, job), b"fn", Needs(), retries, now=0.0)
    for number, count in enumerate(chunks):
        owner.add_chunk((CLIENT, job), number, count, [b"payload"])
    return owner


def test_ranges_are_handed_out_in_order_and_delivered_once():
    owner = book([3, 2])
    a = owner.assign()
    b = owner.assign()
    assert (a.chunk, a.start, a.stop) == (0, 0, 3)
    assert (b.chunk, b.start, b.stop) == (1, 0, 2)
    assert owner.assign() is None
    delivery = owner.completed(a.id, 0, 3, final=True)
    assert (delivery.chunk, delivery.start, delivery.stop) == (0, 0, 3)
    assert owner.completed(a.id, 0, 3, final=True) is None  # a duplicate
    owner.validate()


def test_a_job_retires_once_closed_and_all_delivered():
    owner = book([1])
    a = owner.assign()
    assert owner.close_job((CLIENT, 1)) is None  # still running
    owner.completed(a.id, 0, 1, final=True)
    assert (CLIENT, 1) not in owner.jobs


def test_a_crash_charges_only_the_item_that_was_running():
    owner = book([5], retries=1)
    a = owner.assign()
    assert owner.lost(a.id, crashed_at=2) == []
    ranges = []
    while (x := owner.assign()) is not None:
        ranges.append((x.start, x.stop))
        owner.validate()
    assert ranges == [(0, 2), (2, 3), (3, 5)]


def test_an_item_that_crashes_every_try_fails_alone_after_its_retries():
    owner = book([3], retries=2)
    failures = []
    for _ in range(10):
        a = owner.assign()
        if a is None:
            break
        if a.start <= 1 < a.stop:
            failures += owner.lost(a.id, crashed_at=1)
        else:
            assert owner.completed(a.id, a.start, a.stop, final=True) is not None
        owner.validate()
    assert [(f.index, f.tries) for f in failures] == [(1, 3)]
    job = owner.jobs.get((CLIENT, 1))
    assert job is None or (job.items_done, job.items_failed) == (2, 1)


def test_the_books_totals_count_each_outcome_once():
    owner = book([3, 1, 2], retries=1)
    a, b, c = owner.assign(), owner.assign(), owner.assign()
    owner.completed(a.id, 0, 3, final=True, raised=2)
    owner.completed(a.id, 0, 3, final=True, raised=2)  # a duplicate counts nothing
    assert owner.refused(b.id) is not None
    owner.lost(c.id, crashed_at=0)  # item 0 runs again, item 1 too (its range's rest)
    again = owner.assign()
    assert (again.start, again.stop) == (0, 1)
    assert [f.index for f in owner.lost(again.id, crashed_at=0)] == [0]  # its last try
    owner.validate()
    assert (owner.items_raised, owner.items_refused, owner.items_crashed) == (2, 1, 1)
    assert owner.items_retried == 2


def test_a_crash_somewhere_in_a_range_reruns_it_recording_each_item():
    owner = book([4], retries=1)
    a = owner.assign()
    assert not a.precise
    assert owner.lost(a.id, crashed_at=SOMEWHERE) == []
    b = owner.assign()
    assert (b.start, b.stop, b.precise) == (0, 4, True)
    assert owner.jobs[(CLIENT, 1)].chunks[0].tries == {}  # nobody charged yet
    failures = owner.lost(b.id, crashed_at=2)
    # Item 2 crashed both runs: with retries=1 that is its last.
    assert [(f.index, f.tries) for f in failures] == [(2, 2)]
    owner.validate()
    assert [(x.start, x.stop, x.precise) for x in (owner.assign(), owner.assign())] == [
        (0, 2, False), (3, 4, False)
    ]


def test_a_recorded_range_dying_between_items_charges_every_item():
    owner = book([2], retries=1)
    a = owner.assign()
    owner.lost(a.id, crashed_at=SOMEWHERE)
    b = owner.assign()
    failures = owner.lost(b.id, crashed_at=SOMEWHERE)
    assert [(f.index, f.tries) for f in failures] == [(0, 2), (1, 2)]
    assert (CLIENT, 1) not in owner.jobs or owner.assign() is None


def test_a_job_without_retries_records_from_its_first_run():
    owner = book([4], retries=0)
    a = owner.assign()
    assert a.precise  # no run to spare for finding the item a crash was at
    failures = owner.lost(a.id, crashed_at=1)
    assert [(f.index, f.tries) for f in failures] == [(1, 1)]
    assert [(x.start, x.stop, x.precise) for x in (owner.assign(), owner.assign())] == [
        (0, 1, True), (2, 4, True)
    ]


@pytest.mark.parametrize("retries", [0, 1, 2, 3])
@pytest.mark.parametrize(("size", "culprit"), [(1, 0), (4, 0), (4, 2), (4, 3), (6, 5)])
def test_an_item_that_always_crashes_runs_retries_plus_one_times(retries, size, culprit):
    """The worker as it behaves: the fast path reports SOMEWHERE, a recorded
    run the culprit's index (a one-item range is placed by the pool)."""
    owner = book([size], retries=retries)
    runs, failures = 0, []
    while (a := owner.assign()) is not None:
        owner.validate()
        if not a.start <= culprit < a.stop:
            owner.completed(a.id, a.start, a.stop, final=True)
            continue
        runs += 1
        placed = a.precise or a.stop - a.start == 1
        failures += owner.lost(a.id, crashed_at=culprit if placed else SOMEWHERE)
    assert runs == retries + 1
    assert [(f.index, f.tries) for f in failures] == [(culprit, retries + 1)]


def test_a_lost_node_requeues_its_range_without_charging_it():
    owner = book([4], retries=0)
    a = owner.assign()
    assert owner.lost(a.id, crashed_at=None) == []
    b = owner.assign()
    assert (b.start, b.stop) == (0, 4)
    assert owner.jobs[(CLIENT, 1)].chunks[0].tries == {}


def test_late_results_of_a_lost_assignment_are_dropped():
    owner = book([2])
    a = owner.assign()
    owner.lost(a.id, crashed_at=None)
    b = owner.assign()
    assert owner.completed(a.id, 0, 2, final=True) is None
    assert owner.completed(b.id, 0, 2, final=True) is not None


def test_refused_ranges_fail_without_retry():
    owner = book([2])
    a = owner.assign()
    failed = owner.refused(a.id)
    assert (failed.start, failed.stop) == (0, 2)
    assert owner.assign() is None


def test_jobs_share_assignments_round_robin():
    owner = Owner()
    for job in (1, 2):
        owner.open_job((CLIENT, job), b"fn", Needs(), 2, now=0.0)
        for n in range(10):
            owner.add_chunk((CLIENT, job), n, 1, [])
    picks = [owner.assign().job[1] for _ in range(10)]
    assert picks.count(1) == picks.count(2) == 5


def test_fits_keeps_gpu_jobs_off_cpu_workers():
    owner = Owner()
    owner.open_job((CLIENT, 1), b"fn", Needs(gpus=1), 2, now=0.0)
    owner.add_chunk((CLIENT, 1), 0, 1, [])
    assert owner.assign(lambda needs: needs.gpus == 0) is None
    assert owner.assign(lambda needs: needs.gpus == 1) is not None


def test_cancel_returns_running_assignments_and_forgets_the_job():
    owner = book([1, 1])
    a = owner.assign()
    assert owner.cancel_job((CLIENT, 1)) == [a.id]
    assert owner.completed(a.id, 0, 1, final=True) is None
    assert owner.assign() is None


def test_misuse_is_a_local_protocol_error():
    owner = book([1])
    with pytest.raises(LocalProtocolError, match="already open"):
        owner.open_job((CLIENT, 1), b"fn", Needs(), 2, now=0.0)
    with pytest.raises(LocalProtocolError, match="repeat"):
        owner.add_chunk((CLIENT, 1), 0, 1, [])
    for count in (0, MAX_CHUNK_ITEMS + 1, 2**62):  # a byte each: bounded before believed
        with pytest.raises(LocalProtocolError, match=f"has {count} items; expected 1 to"):
            owner.add_chunk((CLIENT, 1), 9, count, [])
    with pytest.raises(LocalProtocolError, match="not open"):
        owner.add_chunk((CLIENT, 7), 0, 1, [])


def test_a_range_the_book_never_handed_out_is_an_internal_error():
    """The pool reports what the book assigned: any other range is hived's own
    bug, which a user's `except HiveError` must not swallow."""
    owner = book([1])
    a = owner.assign()
    with pytest.raises(InternalError, match="covers") as raised:
        owner.completed(a.id, 0, 5, final=True)
    assert not isinstance(raised.value, HiveError)


events = st.lists(
    st.tuples(st.sampled_from(["assign", "done", "crash", "lost", "dup"]), st.integers(0, 50)),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5), script=events,
       retries=st.integers(0, 3))
def test_every_item_ends_delivered_exactly_once(sizes, script, retries):
    """Random interleavings of assignments, results, crashes and lost nodes."""
    owner = book(sizes, retries=retries)
    owner.close_job((CLIENT, 1))
    running: list = []
    finished: list = []
    delivered: dict[tuple[int, int], int] = {}

    def deliver(chunk, start, stop):
        for i in range(start, stop):
            delivered[chunk, i] = delivered.get((chunk, i), 0) + 1

    def step(kind, pick):
        if kind == "assign" or not running:
            a = owner.assign()
            if a is not None:
                running.append(a)
            return
        a = running.pop(pick % len(running))
        if kind == "done":
            d = owner.completed(a.id, a.start, a.stop, final=True)
            if d:
                deliver(d.chunk, d.start, d.stop)
            finished.append(a)
        elif kind == "crash":
            at = SOMEWHERE if pick % 3 == 0 else a.start + pick % (a.stop - a.start)
            for f in owner.lost(a.id, crashed_at=at):
                deliver(f.chunk, f.index, f.index + 1)
        elif kind == "lost":
            owner.lost(a.id, crashed_at=None)
        elif kind == "dup":
            running.append(a)  # still out; meanwhile an old result comes again
            if finished:
                old = finished[pick % len(finished)]
                assert owner.completed(old.id, old.start, old.stop, final=True) is None

    for kind, pick in script:
        step(kind, pick)
        owner.validate()
    # Then let everything finish cleanly.
    while True:
        a = owner.assign()
        if a is None and not running:
            break
        if a is not None:
            running.append(a)
        a = running.pop()
        d = owner.completed(a.id, a.start, a.stop, final=True)
        if d:
            deliver(d.chunk, d.start, d.stop)
        owner.validate()
    expected = {(c, i) for c, n in enumerate(sizes) for i in range(n)}
    assert set(delivered) == expected
    assert all(n == 1 for n in delivered.values())
    assert (CLIENT, 1) not in owner.jobs
