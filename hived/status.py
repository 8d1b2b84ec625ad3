"""What `hivectl status` shows: the coordinator and one row per node.

The shape is a contract (DESIGN.md): `{"coordinator": {"name", "term"} or
null, "nodes": [{"name", "address", "state", "role", "cpus", "gpus",
"slots_busy", "slots_free", "tasks_done", "version", ...}]}`. This node's
row comes from its own pool; the other rows from what their heartbeats said.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from hived import __version__

if TYPE_CHECKING:
    from hived.node import Node


def node_status(node: Node) -> dict[str, Any]:
    pool, s = node.pool, node.settings
    me = {
        "name": node.name,
        "address": s.control or "embedded",
        "state": "draining" if node.draining else "alive",
        "role": "coordinator",
        "cpus": s.cpus,
        "gpus": len(s.gpus),
        "slots_busy": pool.slots_busy,
        "slots_free": pool.slots_total - pool.slots_busy,
        "tasks_done": pool.items_done,
        "version": __version__,
        "load": round(os.getloadavg()[0], 2),
        "uptime": round(time.monotonic() - node.started_at, 1),
    }
    if node.mesh is None:
        return {"coordinator": {"name": node.name, "term": 1}, "nodes": [me]}
    coordinator = node.mesh.coordinator()
    now = node.loop.time()
    rows = []
    for member in node.mesh.members():
        if member.last_heard is None:  # this node
            row = dict(me, address=member.address, mesh_bytes_in=dict(node.mesh.bytes_in))
        else:
            row = {
                "name": member.name,
                "address": member.address,
                "state": member.state,
                "cpus": member.cpus,
                "gpus": member.gpus,
                "slots_busy": max(member.cpus + member.gpus - member.slots_free, 0),
                "slots_free": member.slots_free,
                "tasks_done": member.tasks_done,
                "version": member.version,
                "load": round(member.load, 2),
                "last_heard": round(now - member.last_heard, 2),
            }
        row["role"] = "coordinator" if coordinator and coordinator[0] == member.name else "member"
        rows.append(row)
    return {
        "coordinator": {"name": coordinator[0], "term": coordinator[1]} if coordinator else None,
        "nodes": rows,
    }
