"""Whether a job may open on this node: its node draining, its needs against the hive's.

A job is refused at once, with an error its caller can act on, when no node
of the hive could ever run its tasks: better than a job that waits for ever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hived.errors import INVALID, STOPPED, UNAVAILABLE
from hived.protocol.control import OpenJob

if TYPE_CHECKING:
    from hived.mesh.membership import MemberView

Capacity = tuple[int, int]  # (CPU slots, GPU slots) of one node


def job_problem(msg: OpenJob, node_name: str, draining: bool,
                hive: list[Capacity]) -> tuple[str, str] | None:
    """(error kind, text) why `msg`'s job may not open here, or None; `hive`
    is every live node's slots, this one's first."""
    if draining:
        return STOPPED, f"hived on {node_name} is draining and takes no new jobs"
    if msg.cpus < 1 or msg.gpus < 0 or msg.retries < 0:
        return INVALID, "cpus must be >= 1, gpus >= 0 and retries >= 0"
    if msg.gpus > 1:
        return INVALID, f"a task may ask for at most 1 GPU (a worker owns one GPU); got gpus={msg.gpus}"
    if msg.gpus == 1 and not any(gpus for _, gpus in hive):
        return UNAVAILABLE, f"the tasks ask for a GPU but no node in this hive has one ({node_name} has 0)"
    largest = max(cpus for cpus, _ in hive)
    if msg.gpus == 0 and msg.cpus > largest:
        return UNAVAILABLE, f"the tasks ask for {msg.cpus} CPUs but the largest node has {largest}"
    return None


def hive_slots(me: Capacity, members: list[MemberView]) -> list[Capacity]:
    """(CPU slots, GPU slots) of every live node, this one (`me`) first;
    `members` the mesh's, this node first."""
    return [me, *((m.cpus, m.gpus) for m in members[1:] if m.state in ("alive", "suspect"))]
