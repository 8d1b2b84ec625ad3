"""Saying HELLO to several nodes at once, and believing what they answer.

A client that looks for a node (`connect` with several addresses, or after
its node was lost) opens a link to every candidate, says HELLO on each and
keeps the first node, in the order given, that welcomes it and takes jobs
(not draining); the other links are closed. Each answer is checked before
it is believed: a compatible release, a believable slot count. With no
daemon to greet, `greet_embedded` starts a node in this process and greets
that.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from hived.caller.failover import EMBEDDED
from hived.caller.links import EmbeddedLink, SocketLink
from hived.config import check_setting
from hived.errors import HiveError, RemoteProtocolError
from hived.net.security import client_curve
from hived.node.pool import Launcher
from hived.node.resources import detect_gpus, resolve_cpus
from hived.protocol.control import Unwelcome, Welcome, version_problem

CONNECT_TIMEOUT = 2.0  # for a WELCOME, per round of greetings
MAX_SLOTS = 1 << 20  # more than any hive has: a WELCOME claiming more is not believed
Tried = dict[str, "str | HiveError"]  # address: why it would not do


class Greeting:
    """One HELLO on a link of its own, and what the node answered."""

    def __init__(self, address: str, answered: threading.Event) -> None:
        self.address = address
        self.answered = answered  # shared by the greetings of one round
        self.answered_at = 0.0  # monotonic time of the answer; 0 until one came
        self.link: Any = None
        self.welcome: Welcome | None = None
        self.problem: HiveError | None = None  # why this node will not serve us
        self.served = False  # it answered one of our jobs

    def believe(self, msg: Welcome | Unwelcome) -> None:
        """The node's answer (on its link's thread), checked before it is believed."""
        if isinstance(msg, Unwelcome):
            problem = msg.text
        elif not 0 <= msg.slots <= MAX_SLOTS:
            self.problem = RemoteProtocolError(
                f"hived at {self.address} says it has {msg.slots} slots; expected 0 to {MAX_SLOTS}"
            )
            problem = None
        else:
            problem = version_problem(msg.version)
            if problem is None and self.problem is None:
                self.welcome = msg
        if problem is not None:
            self.problem = HiveError(
                f"hived on {msg.node} at {self.address} will not serve this client: {problem}"
            )
        self.answered_at = time.monotonic()
        self.answered.set()

    def takes_jobs(self) -> bool:
        return self.welcome is not None and not self.welcome.draining


def greet_any(
    addresses: list[str],
    timeout: float,
    *,
    key_file: str | None,
    hello: list[Any],
    on_frames: Callable[[Greeting, list[Any]], None],
    on_lost: Callable[[Greeting, str], None],
) -> tuple[Greeting | None, Tried]:
    """Say HELLO at every address at once; the first node (in the order
    given, among those that answered) that welcomes us and takes jobs,
    and why each other one would not do."""
    answered = threading.Event()
    greetings: list[Greeting] = []
    tried: Tried = {}
    for address in addresses:
        greeting = Greeting(address, answered)
        try:
            greeting.link = SocketLink(
                address, functools.partial(on_frames, greeting),
                on_lost=functools.partial(on_lost, greeting),
                curve=client_curve(address, key_file),
            )
        except HiveError as exc:  # an ipc socket not to be trusted, a key missing
            tried[address] = exc
            continue
        greeting.link.send(hello)
        greetings.append(greeting)
    deadline = time.monotonic() + timeout
    chosen = None
    while greetings:
        answered.clear()  # before looking: an answer from now on wakes the wait
        chosen = next((g for g in greetings if g.takes_jobs()), None)
        left = deadline - time.monotonic()
        if chosen is not None or left <= 0 or all(g.answered_at for g in greetings):
            break
        answered.wait(left)
    for greeting in greetings:
        if greeting is chosen:
            continue
        greeting.link.close()
        if greeting.problem is not None:
            tried[greeting.address] = greeting.problem
        elif greeting.welcome is not None:
            tried[greeting.address] = f"hived on {greeting.welcome.node} is draining"
        else:
            tried[greeting.address] = f"no answer within {timeout:.1f}s"
    return chosen, tried


def no_daemon_answered(tried: Tried) -> str:
    """Why no node at the addresses in `tried` serves us, for HiveUnavailable."""
    notes = [f"{a} ({why})" for a, why in tried.items() if "draining" in str(why)]
    others = [a for a in tried if "draining" not in str(tried[a])]
    where = ", ".join([*others, *notes])
    return (
        f"no daemon answered at {where}; is hived running? "
        "`systemctl status hived`, or start one with `hived`"
    )


def greet_embedded(
    cpus: int | None,
    *,
    hello: list[Any],
    on_frames: Callable[[Greeting, list[Any]], None],
) -> Greeting:
    """Start a node in this process with `cpus` slots (None: HIVED_CPUS, else
    this machine's usable CPUs) and say HELLO to it; its greeting, answered.
    Raises why it will not serve us, if it will not."""
    cpus, gpus = cpus or _embedded_cpus(), detect_gpus()
    authkey = bytes(multiprocessing.current_process().authkey)
    launcher = Launcher(socket.gethostname(), gpus, authkey)
    from hived.node.settings import NodeSettings

    settings = NodeSettings(cpus=cpus, gpus=gpus, authkey=authkey, launcher=launcher)
    greeting = Greeting(EMBEDDED, threading.Event())
    greeting.link = EmbeddedLink(settings, functools.partial(on_frames, greeting))
    greeting.link.send(hello)
    greeting.answered.wait()  # the node is in this process: it answers
    if greeting.problem is not None:
        greeting.link.close()
        raise greeting.problem
    return greeting


def _embedded_cpus() -> int:
    """An embedded hive's CPU slots: HIVED_CPUS (as the daemon reads it), else usable CPUs."""
    value = os.environ.get("HIVED_CPUS", "")
    spec = check_setting("pool.cpus", value, "environment HIVED_CPUS") if value.strip() else "auto"
    return resolve_cpus(spec)
