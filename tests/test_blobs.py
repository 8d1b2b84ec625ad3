"""hived.node.blobs: who uses which function blob, and when it is dropped."""

from __future__ import annotations

from hived.node.blobs import KNOWN_TOLD, BlobStore


def fn(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_a_blob_goes_with_the_last_client_that_used_it():
    store = BlobStore()
    store.add(fn(1), b"one")
    store.use(fn(1))
    store.use(fn(1))
    store.release(fn(1))
    assert store[fn(1)] == b"one"
    store.release(fn(1))
    assert fn(1) not in store and len(store) == 0


def test_a_blob_held_already_is_not_replaced():
    store = BlobStore()
    store.add(fn(1), b"first")
    store.add(fn(1), b"second")
    assert store[fn(1)] == b"first"


def test_other_owners_blobs_are_kept_most_recent_first_up_to_the_bound():
    store = BlobStore(remote_kept=3)
    for i in range(5):
        store.keep_remote(fn(i), b"blob %d" % i)
    assert store.known() == [fn(4), fn(3), fn(2)]
    assert sorted(store) == [fn(2), fn(3), fn(4)]  # the two oldest dropped
    store.keep_remote(fn(2), b"blob 2")  # used again: the most recent now
    store.keep_remote(fn(5), b"blob 5")
    assert store.known() == [fn(5), fn(2), fn(4)]
    assert fn(3) not in store


def test_a_remote_blob_pushed_out_stays_while_a_client_of_ours_uses_it():
    store = BlobStore(remote_kept=1)
    store.keep_remote(fn(1), b"shared")
    store.use(fn(1))  # a client of ours opened a job of the same function
    store.keep_remote(fn(2), b"other")
    assert store[fn(1)] == b"shared" and store.known() == [fn(2)]
    store.release(fn(1))
    assert fn(1) not in store


def test_a_pull_names_at_most_the_most_recent_known_blobs():
    store = BlobStore()
    for i in range(KNOWN_TOLD + 10):
        store.keep_remote(fn(i), b"x")
    known = store.known()
    assert len(known) == KNOWN_TOLD and known[0] == fn(KNOWN_TOLD + 9)
