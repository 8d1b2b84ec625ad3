"""Real hived daemons on real test hosts (network namespaces), for mesh tests.

`Cluster` starts one daemon per host of a `TestNet`, each binding its host's
address with the cluster key (CURVE), the first `voters` hosts as seeds, and
short timings. The test reaches every daemon through its control socket,
an ipc path in a shared temp dir (Unix sockets cross network namespaces).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from hived.net.security import write_key
from hived.protocol.control import StatusQuery, ask
from hived.testing.childenv import child_env
from hived.testing.netns import Host, TestNet
from hived.testing.waiting import wait_for

PORT = 7700
# Short enough for fast tests, long enough that a loaded 2-core CI machine does
# not miss heartbeats and see false deaths.
TIMING = {"heartbeat": 0.2, "dead_after": 1.2, "lease": 1.0}


class MeshNode:
    def __init__(self, cluster: Cluster, host: Host) -> None:
        self.cluster, self.host = cluster, host
        self.name = host.name
        self.address = f"tcp://{host.addr}:{PORT}"
        self.control = f"ipc://{cluster.dir}/{host.name}.sock"
        self.log_path = os.path.join(cluster.dir, f"{host.name}.log")
        self.data_dir = os.path.join(cluster.dir, host.name)
        self.tmpfs = False  # data_dir is a tmpfs of our own (mount_data)
        self.proc: subprocess.Popen | None = None
        # GPU slots: with no nvidia-smi on a test host, `--gpus N` gives
        # workers CUDA_VISIBLE_DEVICES 0..N-1, which routing needs, not a GPU.
        self.gpus = 0
        self.env: dict[str, str] = {}  # extra environment for the daemon and its workers
        # what runs the daemon, after the interpreter (tests/speak.py: another protocol version)
        self.launch = ["-m", "hived.daemon"]

    def start(self) -> MeshNode:
        c = self.cluster
        config = os.path.join(c.dir, f"{self.name}.toml")
        with open(config, "w") as f:
            f.write("[timing]\n" + "".join(f"{k} = {v}\n" for k, v in c.timing.items()))
        args = [
            sys.executable, *self.launch, "--config", config, "--name", self.name,
            "--bind", self.address, "--control", self.control, "--key-file", c.key_path,
            "--cpus", "1", "--gpus", str(self.gpus), "--data-dir", self.data_dir,
            "--log-level", "info",
        ]
        for seed in c.seeds:
            args += ["--seed", seed]
        log = open(self.log_path, "ab")
        self.proc = self.host.popen(args, env=child_env(**self.env), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def mount_data(self, size: str = "256k") -> None:
        """Put data_dir on a tmpfs of ``size``, so that a test can fill it (a
        full disk); before start.  ``unmount_data`` undoes it."""
        os.makedirs(self.data_dir, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        self.data_dir], check=True, capture_output=True, timeout=30)
        self.tmpfs = True

    def unmount_data(self) -> None:
        if self.tmpfs:
            # Lazy: a daemon that still holds a file there must not block teardown.
            subprocess.run(["umount", "-l", self.data_dir], check=False, capture_output=True,
                           timeout=30)
            self.tmpfs = False

    def status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        answer = ask(self.control, StatusQuery(1), timeout=timeout)
        return answer.body if answer is not None else None

    @property
    def process(self) -> subprocess.Popen:
        """The daemon's process, once started."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        self.host.kill9(self.process)

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(20)

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


class Cluster:
    def __init__(self, net: TestNet, tmp: str, voters: int | None = None,
                 timing: dict[str, float] | None = None, gpus: dict[int, int] | None = None,
                 env: dict[int, dict[str, str]] | None = None,
                 launch: dict[int, list[str]] | None = None) -> None:
        self.net, self.dir = net, tmp
        self.timing = timing or TIMING
        self.key_path = os.path.join(tmp, "cluster.key")
        write_key(self.key_path)
        self.nodes = [MeshNode(self, host) for host in net]
        for i, count in (gpus or {}).items():
            self.nodes[i].gpus = count
        for i, extra in (env or {}).items():
            self.nodes[i].env = extra
        for i, command in (launch or {}).items():
            self.nodes[i].launch = command
        self.seeds = [n.address for n in self.nodes[: voters or len(self.nodes)]]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        return self

    def __getitem__(self, i: int) -> MeshNode:
        return self.nodes[i]

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log[-3000:]}" for n in self.nodes
                         if n.proc is not None)  # fmt: skip

    def views(self, nodes: list[MeshNode] | None = None) -> dict[str, dict[str, Any] | None]:
        return {n.name: n.status() for n in (nodes or self.nodes) if n.alive()}

    def agreed_coordinator(self, nodes: list[MeshNode] | None = None) -> tuple[str, int] | None:
        """The (name, term) every given node names, when they all name the same one."""
        seen = set()
        for view in self.views(nodes).values():
            if view is None or view["coordinator"] is None:
                return None
            seen.add((view["coordinator"]["name"], view["coordinator"]["term"]))
        return seen.pop() if len(seen) == 1 else None

    def wait_agreed(self, nodes: list[MeshNode] | None = None, timeout: float = 15,
                    exclude: str | None = None) -> tuple[str, int]:
        def agreed():
            got = self.agreed_coordinator(nodes)
            return got if got and got[0] != exclude else None

        return wait_for(agreed, timeout, what=f"one agreed coordinator\n{self.logs()}")

    def states(self, node: MeshNode) -> dict[str, str]:
        view = node.status() or {"nodes": []}
        return {row["name"]: row["state"] for row in view["nodes"]}

    def node(self, name: str) -> MeshNode:
        return next(n for n in self.nodes if n.name == name)
