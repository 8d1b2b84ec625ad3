"""hivectl's drain, undrain and cancel, asked of any node: done here or forwarded.

A hivectl talks to one node. What it asks of another node (drain `name`,
undrain it, cancel a job some other node owns) this node forwards as STEER
to the member that can do it, and answers hivectl when that member answers,
refuses, or stays silent past FORWARD_TIMEOUT (the bookkeeping is the
sans-IO `hived.mesh.steering.Forwards`). A STEER from a member is done here
by the node's own `steer` and answered with STEERED.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from hived.mesh.steering import MAX_JOB_IDS, Forwards, Outcome, Steer, Steered
from hived.net.background import Background
from hived.protocol.wire import Message

if TYPE_CHECKING:
    from hived.mesh.membership import MemberView

# How long a node waits on the peers it forwarded a hivectl drain, undrain or
# cancel to: below hivectl's own wait, so that it hears why not.
FORWARD_TIMEOUT = 2.0

# Do `action` on `target` as asked by node `by`: (done, what was done or why
# not, for a cancel of a job not ours the ids of our jobs).
SteerHere = Callable[[str, str, str], tuple[bool, str, list[str]]]
# Answer a client's request: (client id, its request number, the answer's body).
AnswerClient = Callable[[bytes, int, dict[str, Any]], None]


class Members(Protocol):
    """What steering asks of the mesh (hived.mesh.shell.Mesh)."""

    def members(self) -> list[MemberView]: ...
    def members_alive(self) -> list[str]: ...
    def name_of(self, address: str) -> str | None: ...
    def send(self, address: str, msg: Message, payload: list[Any] | tuple[Any, ...] = ()) -> bool: ...


class Steering:
    def __init__(self, name: str, mesh: Members | None, background: Background,
                 steer: SteerHere, answer: AnswerClient) -> None:
        self.name, self.mesh, self.background = name, mesh, background
        self.steer, self.answer = steer, answer
        self.forwards = Forwards(FORWARD_TIMEOUT)
        # forwarded requests: Forwards' id -> (client, its request, action,
        # target, for a cancel the ids of this node's own jobs)
        self._forwarded: dict[int, tuple[bytes, int, str, str, list[str]]] = {}

    def steer_node(self, client: bytes, request: int, action: str, name: str) -> None:
        """Drain or undrain the node named `name`: this one, or forwarded to it."""
        if name == self.name:
            done, text, _ = self.steer(action, name, self.name)
            self._answer(client, request, action, name, done, text)
            return
        members = self.mesh.members() if self.mesh is not None else []
        member = next((m for m in members if m.name == name), None)
        if member is None:
            known = ", ".join(sorted(m.name for m in members)) or self.name
            self._answer(client, request, action, name, False,
                         f"no node named {name!r} in this hive (this node is {self.name!r}); "
                         f"the nodes it knows: {known}")
        elif member.state == "dead" and member.last_heard is not None:  # (None: this node)
            silent = self.background.loop.time() - member.last_heard
            self._answer(client, request, action, name, False,
                         f"{name} at {member.address} cannot be reached: {self.name} has not "
                         f"heard from it for {silent:.1f} s (it is dead)")
        else:
            self._forward(client, request, action, name, [member.address])

    def cancel(self, client: bytes, request: int, job_id: str) -> None:
        """Cancel a job by its id: here if this node owns it, else on whichever peer does."""
        done, text, mine = self.steer("cancel", job_id, self.name)
        peers = self.mesh.members_alive() if self.mesh is not None else []
        if done or not peers:
            self._answer(client, request, "cancel", job_id, done,
                         text if done else no_such_job(job_id, mine, []))
            return
        self._forward(client, request, "cancel", job_id, peers, mine)

    def on_message(self, sender: str, msg: Steer | Steered) -> None:
        """A member's STEER (done here) or STEERED (the answer to one we forwarded)."""
        mesh = self._mesh()
        if isinstance(msg, Steer):
            by = mesh.name_of(sender) or sender
            done, text, jobs = self.steer(msg.action, msg.target, by)
            mesh.send(sender, Steered(msg.request, done, text[:2000], jobs[:MAX_JOB_IDS]))
        else:
            self._settle(self.forwards.answered(sender, msg))

    def _mesh(self) -> Members:
        assert self.mesh is not None, "only a node on a mesh forwards or is steered"
        return self.mesh

    def _forward(self, client: bytes, request: int, action: str, target: str,
                 peers: list[str], mine: list[str] | None = None) -> None:
        mesh = self._mesh()
        ask, sends = self.forwards.ask(peers, action, target, self.background.loop.time())
        self._forwarded[ask] = (client, request, action, target, mine or [])
        for send in sends:
            if not mesh.send(send.to, send.msg):
                self._settle(self.forwards.unsent(ask, send.to))
        if ask in self._forwarded:
            self.background.call_later(FORWARD_TIMEOUT, self._forward_due, ask)

    def _forward_due(self, ask: int) -> None:
        self._settle(self.forwards.expire(ask, self.background.loop.time()))

    def _settle(self, outcome: Outcome | None) -> None:
        """A forwarded request ended: answer the hivectl that asked."""
        if outcome is None:
            return
        client, request, action, target, mine = self._forwarded.pop(outcome.request)
        if outcome.done:
            text = outcome.texts[0]
        elif action == "cancel":
            silent = outcome.silent + outcome.unreachable
            text = no_such_job(target, mine + outcome.jobs,
                               sorted(self._mesh().name_of(a) or a for a in silent))
        elif outcome.unreachable:
            text = (f"{target} at {outcome.unreachable[0]} cannot be reached: {self.name} has "
                    "no connection to it")
        elif outcome.silent:
            text = (f"{target} at {outcome.silent[0]} did not answer within "
                    f"{FORWARD_TIMEOUT:.1f} s: {self.name} cannot reach it, or it runs a "
                    "hived that cannot be steered from another node")
        else:
            text = outcome.texts[0]
        self._answer(client, request, action, target, outcome.done, text)

    def _answer(self, client: bytes, request: int, action: str, target: str,
                done: bool, text: str) -> None:
        if not done:
            body: dict[str, Any] = {"error": text}
        elif action == "drain":
            body = {"draining": target}
        elif action == "undrain":
            body = {"undrained": target}
        else:
            body = {"cancelled": target, "text": text}
        self.answer(client, request, body)


def no_such_job(target: str, ids: list[str], silent: list[str]) -> str:
    listed = ", ".join(sorted(ids)[:20]) + (" ..." if len(ids) > 20 else "")
    text = f"no job {target!r} in this hive; the jobs it has: {listed or 'none'} (`hivectl jobs`)"
    if silent:
        text += f"; {', '.join(silent)} did not answer"
    return text
