"""Steering from any node: `hivectl drain`, `undrain` and `cancel` asked of one
node and carried out by the node they concern — sans-IO.

Theory of operation
-------------------
hivectl talks to one node's control socket, but the node it names (or the
owner of the job it names) may be another one. The asked node forwards the
request over the mesh, whose peers are CURVE-authenticated holders of the
cluster key: a STEER from a member is as authorised as a hivectl on that
node's own socket.

    hivectl ──C.DRAIN / C.UNDRAIN / C.CANCELJOB──▶ asked node
                                                   │ the named node is this one: do it here
                                                   │ else STEER to the named node (drain,
                                                   │ undrain) or to every live peer (cancel:
                                                   ▼ only the job's owner holds it)
                                       peers ──STEERED (done, or why not)──▶ asked node
    hivectl ◀──ANSWER (what was done, or one error)── asked node

`Forwards` keeps the requests out: the first STEERED that says done settles
one; once every peer asked has said no, or the deadline passed, it settles
as not done, with what the peers said (a cancel: the job ids each owns) and
who never answered or could not be asked. The node shell sends, arms one timer per request, and
turns an `Outcome` into hivectl's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from hived.mesh.sansio import Send
from hived.protocol.fields import Count, at_most
from hived.protocol.wire import Message, Rule, message

ACTIONS = ("drain", "undrain", "cancel")
# A peer lists at most this many of its job ids in a refused cancel.
MAX_JOB_IDS = 256

Action = Annotated[str, Rule(f"one of {', '.join(ACTIONS)}", lambda v: v in ACTIONS)]
Target = Annotated[str, Rule("a node name or job id of at most 300 characters",
                             lambda v: 0 < len(v) <= 300)]  # fmt: skip
Text = Annotated[str, Rule("a text of at most 2000 characters", lambda v: len(v) <= 2000)]
JobIds = Annotated[list[Target], at_most(MAX_JOB_IDS, "job ids")]


@message(b"S.STEER")
class Steer(Message):
    """Do `action` to `target` (a node: this one; a job: one this node owns).
    Who asks is the sender's own member name, never a field it could make up."""

    request: Count
    action: Action
    target: Target


@message(b"S.STEERED")
class Steered(Message):
    request: Count
    done: bool
    text: Text  # what was done, or why not
    jobs: JobIds  # a cancel of a job this node does not own: the ids it owns


MESSAGES = (Steer, Steered)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a forwarded request ended."""

    request: int
    done: bool
    texts: list[str]  # the deciding peer's text if done; else every refusal's
    jobs: list[str]  # the job ids the refusing peers own
    silent: list[str]  # peers that never answered
    unreachable: list[str]  # peers the STEER could not be sent to
    peer: str | None  # the peer that did it


@dataclass
class _Out:
    asked: set[str]
    deadline: float
    texts: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)


class Forwards:
    """The steering requests this node forwarded and waits on."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._out: dict[int, _Out] = {}
        self._next = 0

    def ask(self, peers: list[str], action: str, target: str, now: float) -> tuple[int, list[Send]]:
        """Forward `action` on `target` to `peers`; the request id and the sends."""
        self._next += 1
        request = self._next
        self._out[request] = _Out(set(peers), now + self.timeout)
        return request, [Send(peer, Steer(request, action, target)) for peer in peers]

    def unsent(self, request: int, peer: str) -> Outcome | None:
        """The link to `peer` refused the STEER: it will never answer."""
        out = self._out.get(request)
        if out is None or peer not in out.asked:
            return None
        out.asked.discard(peer)
        out.unreachable.append(peer)
        return self._settle(request) if not out.asked else None

    def answered(self, sender: str, msg: Steered) -> Outcome | None:
        out = self._out.get(msg.request)
        if out is None or sender not in out.asked:
            return None  # late, or from a peer never asked
        out.asked.discard(sender)
        if msg.done:
            self._out.pop(msg.request)
            return Outcome(msg.request, True, [msg.text], [], [], [], sender)
        out.texts.append(msg.text)
        out.jobs.extend(msg.jobs)
        return self._settle(msg.request) if not out.asked else None

    def expire(self, request: int, now: float) -> Outcome | None:
        """The request's deadline: settle it with whoever did not answer as silent."""
        out = self._out.get(request)
        if out is None or now < out.deadline:
            return None
        return self._settle(request)

    def _settle(self, request: int) -> Outcome:
        out = self._out.pop(request)
        return Outcome(request, False, out.texts, out.jobs, sorted(out.asked), out.unreachable,
                       None)

    def __len__(self) -> int:
        return len(self._out)
