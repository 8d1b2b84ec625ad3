"""The node's parts without processes: steering, strangers, admission, its jobs' records."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import hived.node.steering
from hived.errors import INVALID, STOPPED, UNAVAILABLE
from hived.mesh.membership import MemberView
from hived.mesh.steering import Steer, Steered
from hived.net.background import Background
from hived.node.admission import hive_slots, job_problem
from hived.node.clients import Strangers
from hived.node.ownjobs import OwnJobs, job_id
from hived.node.scheduling import Needs, Owner
from hived.node.steering import Steering
from hived.protocol.control import Answer, OpenJob, Ping, StatusQuery, Stranger
from hived.protocol.wire import Message


def member(name: str, address: str, state: str = "alive", cpus: int = 4, gpus: int = 0,
           last_heard: float | None = 0.0) -> MemberView:
    return MemberView(name, address, state, cpus, gpus, cpus, 0.0, "1", 1, last_heard, 1, 0)


class FakeMembers:
    def __init__(self, rows: list[MemberView]) -> None:
        self.rows = rows
        self.sent: list[tuple[str, Message]] = []
        self.refusing: set[str] = set()

    def members(self) -> list[MemberView]:
        return self.rows

    def members_alive(self) -> list[str]:
        return [m.address for m in self.rows[1:] if m.state != "dead"]

    def name_of(self, address: str) -> str | None:
        return next((m.name for m in self.rows if m.address == address), None)

    def send(self, address: str, msg: Message, payload: Any = ()) -> bool:
        if address in self.refusing:
            return False
        self.sent.append((address, msg))
        return True


class Here:
    """The node's own side of steering: what it did, and what its clients were told."""

    def __init__(self) -> None:
        self.done: list[tuple[str, str, str]] = []
        self.answers: list[tuple[bytes, int, dict[str, Any]]] = []

    def steer(self, action: str, target: str, by: str) -> tuple[bool, str, list[str]]:
        self.done.append((action, target, by))
        if action == "cancel":
            return False, "not ours", ["aaaa/1"]
        return True, f"here is {action}ed", []

    def answer(self, client: bytes, request: int, body: dict[str, Any]) -> None:
        self.answers.append((client, request, body))


ME, PEER = member("me", "tcp://me:1", last_heard=None), member("peer", "tcp://peer:1")


def steering(loop, rows: list[MemberView]) -> tuple[Steering, FakeMembers, Here]:
    mesh, here = FakeMembers(rows), Here()
    return Steering("me", mesh, Background(loop), here.steer, here.answer), mesh, here


def test_a_drain_of_this_node_is_done_here(loop):
    s, mesh, here = steering(loop, [ME, PEER])
    s.steer_node(b"c", 7, "drain", "me")
    assert here.done == [("drain", "me", "me")]
    assert here.answers == [(b"c", 7, {"draining": "me"})] and mesh.sent == []


def test_a_drain_of_another_node_is_forwarded_and_answered_when_it_answers(loop):
    s, mesh, here = steering(loop, [ME, PEER])
    s.steer_node(b"c", 7, "undrain", "peer")
    ((to, steer),) = mesh.sent
    assert to == PEER.address and isinstance(steer, Steer) and steer.target == "peer"
    assert here.answers == []
    s.on_message(PEER.address, Steered(steer.request, True, "peer takes work again", []))
    assert here.answers == [(b"c", 7, {"undrained": "peer"})]


def test_a_node_unknown_or_dead_is_refused_at_once(loop):
    s, mesh, here = steering(loop, [ME, member("gone", "tcp://gone:1", state="dead")])
    s.steer_node(b"c", 1, "drain", "nobody")
    s.steer_node(b"c", 2, "drain", "gone")
    assert mesh.sent == []
    (_, _, unknown), (_, _, dead) = here.answers
    assert "no node named 'nobody'" in unknown["error"] and "gone, me" in unknown["error"]
    assert "it is dead" in dead["error"]


def test_a_silent_peer_is_named_when_the_forward_times_out(loop, monkeypatch):
    monkeypatch.setattr(hived.node.steering, "FORWARD_TIMEOUT", 0.02)
    s, mesh, here = steering(loop, [ME, PEER])
    s.steer_node(b"c", 3, "drain", "peer")
    loop.run_until_complete(asyncio.sleep(0.1))
    ((_, _, body),) = here.answers
    assert "did not answer" in body["error"] and PEER.address in body["error"]


def test_a_cancel_of_a_job_no_node_owns_lists_the_hives_jobs(loop):
    s, mesh, here = steering(loop, [ME, PEER, member("off", "tcp://off:1")])
    mesh.refusing.add("tcp://off:1")
    s.cancel(b"c", 4, "ffff/9")
    ((_, steer),) = mesh.sent
    assert here.answers == []  # the peer that took the STEER may own it
    s.on_message(PEER.address, Steered(steer.request, False, "not mine", ["bbbb/2"]))
    ((_, _, body),) = here.answers
    assert "no job 'ffff/9'" in body["error"]
    assert "aaaa/1, bbbb/2" in body["error"] and "off did not answer" in body["error"]


def test_a_steer_from_a_member_is_done_here_and_answered(loop):
    s, mesh, here = steering(loop, [ME, PEER])
    s.on_message(PEER.address, Steer(5, "drain", "me"))
    assert here.done == [("drain", "me", "peer")]
    ((to, steered),) = mesh.sent
    assert to == PEER.address and isinstance(steered, Steered) and steered.done


def test_a_stranger_is_told_once_and_every_query_answered(caplog):
    strangers = Strangers("me", logging.getLogger("test"), kept=2)
    with caplog.at_level(logging.INFO):
        first = strangers.answer(b"s", Ping())
        again = strangers.answer(b"s", Ping())
        query = strangers.answer(b"s", StatusQuery(9))
    assert isinstance(first, Stranger) and again is None
    assert isinstance(query, Answer) and query.request == 9 and "HELLO first" in query.body["error"]
    assert sum("unknown client" in r.message for r in caplog.records) == 1
    strangers.known(b"s")  # it said HELLO; should it be dropped later, it is told again
    assert isinstance(strangers.answer(b"s", Ping()), Stranger)


def test_the_strangers_remembered_are_bounded():
    strangers = Strangers("me", logging.getLogger("test"), kept=2)
    for cid in (b"a", b"b", b"c"):
        strangers.answer(cid, Ping())
    assert strangers.answer(b"c", Ping()) is None
    assert isinstance(strangers.answer(b"a", Ping()), Stranger)  # forgotten: told again


def opening(cpus: int = 1, gpus: int = 0, retries: int = 0) -> OpenJob:
    return OpenJob(1, b"\0" * 32, False, cpus, gpus, retries, "f")


def test_a_job_no_node_of_the_hive_can_run_is_refused():
    hive = hive_slots((2, 0), [ME, PEER, member("dead", "tcp://d:1", state="dead", cpus=64)])
    assert hive == [(2, 0), (4, 0)]
    assert job_problem(opening(cpus=4), "me", False, hive) is None
    assert job_problem(opening(cpus=5), "me", False, hive)[0] == UNAVAILABLE
    assert job_problem(opening(gpus=1), "me", False, hive)[0] == UNAVAILABLE
    assert job_problem(opening(gpus=2), "me", False, hive)[0] == INVALID
    assert job_problem(opening(retries=-1), "me", False, hive)[0] == INVALID
    assert job_problem(opening(), "me", True, hive)[0] == STOPPED


def test_a_jobs_tag_and_record_go_with_it():
    book, own = Owner(), OwnJobs("me", logging.getLogger("test"))
    job = book.open_job((b"\x01\x02\x03\x04\x05", 3), b"fn", Needs(), 0, 0.0)
    own.opened(job, "square", "host pid 1", call=False, detail="cpus=1")
    tag = own.tag(job.key)
    assert own.tag(job.key) == tag and own.tagged(tag) == job.key
    (row,) = own.rows(book.jobs.values(), 2.0, lambda cid: "host pid 1")
    assert row["id"] == job_id(job.key) == "01020304/3" and row["function"] == "square"
    own.forget(job.key, 3.0)
    assert own.tagged(tag) is None and (own.owned, own.finished, own.cancelled) == (1, 1, 0)
    own.forget(job.key, 4.0, cancelled="twice")  # ended before: counted once
    assert own.cancelled == 0
