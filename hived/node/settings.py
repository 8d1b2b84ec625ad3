"""What a node is told at its start: its name, slots, sockets and timings."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from hived.config import DEFAULT_DEAD_AFTER, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEARTBEAT, DEFAULT_LEASE
from hived.net.security import ClusterKey
from hived.node.pool import Launcher
from hived.protocol.control import LINK_TIMEOUT


@dataclass
class NodeSettings:
    name: str = field(default_factory=socket.gethostname)
    cpus: int = 1
    gpus: list[str] = field(default_factory=list)
    control: str | None = None  # None: in-process clients only (embedded)
    max_tasks_per_worker: int = 0
    memory_limit: int | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    client_timeout: float = LINK_TIMEOUT  # a client silent this long is gone
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    # The mesh (None: a node of its own, as the embedded one is)
    bind: str | None = None
    advertise: str | None = None
    seeds: list[str] = field(default_factory=list)
    dead_after: float = DEFAULT_DEAD_AFTER
    lease: float = DEFAULT_LEASE
    data_dir: str | None = None
    key: ClusterKey | None = None  # CURVE on every TCP socket when set
    # The embedded node's: its caller's multiprocessing authkey, so that the
    # caller's multiprocessing.Manager() proxies work in the workers.
    authkey: bytes | None = None
    # The embedded node's workers, started before the node (see Launcher).
    launcher: Launcher | None = None
