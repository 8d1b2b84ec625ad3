"""The election's role state machine: roles, the events that move them, and
the table of legal moves (`hived.mesh.election` moves only through it).

The invariants below are the election's, checked by `Election.validate`;
the moves are what keeps them.
"""

from __future__ import annotations

from hived.mesh.sansio import StrEnum

# Invariants:
#   1. At most one holder per term: a voter grants t only if t > promised, or
#      t == promised to the same holder (a renewal); `promised` never goes
#      down and is persisted before the grant leaves, so two majorities for t
#      would share a voter that granted t to two nodes — impossible.
#   2. A holder stops before any voter's grant ends: see the clock argument
#      at the top of hived.mesh.election. A voter grants nothing while its own unexpired grant
#      stands for another node, and nothing for one lease after it starts.
#   3. Hence no two nodes are coordinator at the same real instant.
#   4. `term` (the fencing floor) and `promised` never go down, and a
#      coordinator's term is the floor (a higher one seen makes it step down).
#   5. A node that is stopping never stands, and once it resigned it is never
#      coordinator again; a voter frees a grant on RESIGN only for the node
#      and term it was given to, which stopped acting before it sent it.


class Role(StrEnum):
    """What this node is in the election; the same string in status and logs."""

    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    COORDINATOR = "coordinator"


class RoleEvent(StrEnum):
    STAND = "stand"  # no coordinator believed in, and the back-off ran out
    WON = "won"  # a majority of voters granted a round's term
    LOST = "lost"  # the candidacy was refused, timed out, or a coordinator announced
    STEP_DOWN = "step-down"  # the lease ran out unrenewed, a higher term was seen, or it stops


FOLLOWER, CANDIDATE, COORDINATOR = Role.FOLLOWER, Role.CANDIDATE, Role.COORDINATOR

# (role, event) -> the role it moves to. Nothing else moves `Election._role`.
TRANSITIONS: dict[tuple[Role, RoleEvent], Role] = {
    (FOLLOWER, RoleEvent.STAND): CANDIDATE,
    (CANDIDATE, RoleEvent.WON): COORDINATOR,
    (CANDIDATE, RoleEvent.LOST): FOLLOWER,
    (COORDINATOR, RoleEvent.WON): COORDINATOR,  # a renewal round won (same or next term)
    (COORDINATOR, RoleEvent.STEP_DOWN): FOLLOWER,
}
