"""What `hivectl status` shows: the coordinator and one row per node.

The shape is a contract (DESIGN.md): `{"coordinator": {"name", "term"} or
null, "nodes": [{"name", "address", "state", "role", "cpus", "gpus",
"slots_busy", "slots_free", "tasks_done", "version", ...}], ...}`, each row
with its "uptime" in seconds and the "protocol" it speaks ("1.0"; absent
for a peer not heard from directly); a mesh node adds `"seeds":
[{"address", "state", "why"}]`, each configured seed a member, joining,
unreachable or refusing (hived.mesh.seeds), and `"refusing"`, rows of the same
shape for other peers of another protocol major. This node's row comes
from its own pool; the other rows from what their heartbeats said.
`check_status` and `check_jobs` hold an answer to that shape before hivectl
or doctor reads it: a broken or hostile daemon gets one clear error, never a
KeyError.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from hived import __version__
from hived.errors import RemoteProtocolError
from hived.mesh.seeds import REFUSING, UNREACHABLE
from hived.protocol.wire import PROTOCOL_MAJOR, PROTOCOL_MINOR

if TYPE_CHECKING:
    import asyncio

    from hived.mesh.shell import Mesh
    from hived.node.pool import Pool
    from hived.node.settings import NodeSettings


class Observed(Protocol):
    """What `node_status` reads of a node (hived.node.node.Node)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> NodeSettings: ...
    @property
    def draining(self) -> bool: ...
    @property
    def started_at(self) -> float: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def pool(self) -> Pool: ...
    @property
    def mesh(self) -> Mesh | None: ...


def node_status(node: Observed) -> dict[str, Any]:
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
        "protocol": f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
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
            row = dict(me, address=member.address, mesh_bytes_in=dict(node.mesh.bytes_in),
                       mesh_ignored=dict(node.mesh.versions.ignored_by_type))
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
                # its incarnation is its start on its own wall clock: as good as the clocks agree
                "uptime": round(max(time.time() - member.incarnation / 1000, 0.0), 1),
                "last_heard": round(now - member.last_heard, 2),
            }
            protocol = node.mesh.versions.version_of(member.address)
            if protocol is not None:
                row["protocol"] = protocol
        row["role"] = "coordinator" if coordinator and coordinator[0] == member.name else "member"
        rows.append(row)
    return {
        "coordinator": {"name": coordinator[0], "term": coordinator[1]} if coordinator else None,
        "nodes": rows,
        "seeds": node.mesh.seeds_status(),
        "refusing": node.mesh.refusing_peers(),
    }


def seed_problems(body: dict[str, Any], key: str = "seeds") -> list[dict[str, Any]]:
    """The seeds of a status answer that are unreachable or refuse us (with
    `key="refusing"`: the other peers of another protocol major)."""
    seeds = body.get(key)
    rows = seeds if type(seeds) is list else []  # an older node's answer has none
    return [
        row for row in rows
        if type(row) is dict and row.get("state") in (UNREACHABLE, REFUSING)
        and type(row.get("address")) is str and type(row.get("why")) is str
    ]


def link_problems(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("seed" or "peer", row) for every seed and other peer of a status answer
    that is unreachable or refuses us, seeds first."""
    return [("seed", row) for row in seed_problems(body)] + [
        ("peer", row) for row in seed_problems(body, "refusing")
    ]


# The fields of a row that DESIGN.md fixes, and their types.
NODE_FIELDS: dict[str, type] = {
    "name": str, "address": str, "state": str, "role": str, "cpus": int, "gpus": int,
    "slots_busy": int, "slots_free": int, "tasks_done": int, "version": str,
}
JOB_FIELDS: dict[str, type] = {
    "id": str, "owner": str, "function": str, "queued": int, "running": int, "done": int, "failed": int,
}


def check_status(body: dict[str, Any]) -> dict[str, Any]:
    """`body` if it is a status answer of the documented shape, else RemoteProtocolError."""
    coordinator = body.get("coordinator")
    if coordinator is not None and not (
        type(coordinator) is dict
        and type(coordinator.get("name")) is str
        and type(coordinator.get("term")) is int
    ):
        raise RemoteProtocolError(
            f'the status answer\'s "coordinator" is {_show(coordinator)}; '
            'expected null or {"name": text, "term": integer}'
        )
    return _check_rows(body, "nodes", NODE_FIELDS)


def check_jobs(body: dict[str, Any]) -> dict[str, Any]:
    """`body` if it is a jobs answer of the documented shape, else RemoteProtocolError."""
    return _check_rows(body, "jobs", JOB_FIELDS)


def _check_rows(body: dict[str, Any], key: str, fields: dict[str, type]) -> dict[str, Any]:
    rows = body.get(key)
    if type(rows) is not list:
        raise RemoteProtocolError(f'the answer\'s "{key}" is {_show(rows)}; expected a list of rows')
    for i, row in enumerate(rows):
        if type(row) is not dict:
            raise RemoteProtocolError(f"{key}[{i}] is {_show(row)}; expected a row (a map)")
        for name, kind in fields.items():
            if type(row.get(name)) is not kind:
                raise RemoteProtocolError(
                    f"{key}[{i}].{name} is {_show(row.get(name))}; expected {kind.__name__}"
                )
    try:  # what `--json` prints must be JSON
        json.dumps(body, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"the answer holds what JSON cannot carry: {exc}") from None
    return body


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
