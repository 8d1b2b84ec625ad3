"""`hived`: the daemon's entry point and lifecycle.

    startup:   config → node (pool, control socket) → READY=1
    main loop: serve; WATCHDOG=1 from the loop itself; STATUS= when it changes
    reload:    SIGHUP, or `hived --reload` on the control socket (C.RELOAD),
               reads the config again (RELOADING=1 ... READY=1): the keys in
               RELOADABLE apply at once, the others are named as needing a
               restart; a config that does not load changes nothing.
               `hived --reload` exits once the daemon has answered, so the
               unit's reload job lasts as long as the reload does.
    shutdown:  first SIGTERM/SIGINT hands the coordinator's lease over (if
               held: the hive elects another at once), drains (no new work,
               running tasks finish up to drain_timeout), then stops workers
               and exits 0, asking systemd for more time
               (EXTEND_TIMEOUT_USEC) while it runs; a second signal stops
               at once.
    diagnose:  SIGUSR1 writes every thread's stack to the log, even when the
               event loop is wedged.

Runs in the foreground and logs to stderr, as systemd expects (journald's
priority prefixes instead of timestamps where stderr is the journal:
hived.service.journal). This is the only place (with the CLI) that turns errors
into exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import faulthandler
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import zmq

from hived import __version__
from hived.caller.links import _new_event_loop
from hived.config import Config, PoolConfig, check_security, load_config
from hived.errors import ConfigError, HiveError, InternalError
from hived.net.background import Background
from hived.net.security import ClusterKey, load_key
from hived.node.node import Node, NodeSettings
from hived.node.pool import STOP_MARGIN, Pool
from hived.node.resources import memory_limit_bytes, resolve_cpus, resolve_gpus, total_memory
from hived.node.status import seed_problems
from hived.protocol.control import ReloadRequest, StatusQuery, ask
from hived.service.journal import configure, say
from hived.service.metrics import MetricsServer
from hived.service.sdnotify import EXTEND_EVERY, Notifier, stop_extension

log = logging.getLogger("hived")

# How often the STATUS= line is looked at; it is sent when it changed, so a
# peer joining or leaving shows in `systemctl status` within this.
STATUS_EVERY = 0.5
# What a running daemon changes on SIGHUP. Every other key takes a restart:
# sockets, the node's identity, its slots and the mesh's timing are fixed
# for the life of the process.
RELOADABLE = frozenset(
    {"log_level", "pool.max_tasks_per_worker", "pool.memory_limit", "timing.drain_timeout"}
)
# How long `hived --reload` waits for the daemon's answer (a reload takes
# milliseconds; this bounds a daemon that is stuck).
RELOAD_TIMEOUT = 10.0
# Logged after the stacks a SIGUSR1 wrote: what the block above it is.
STACKS_WRITTEN = "SIGUSR1: every thread's stack is above (most recent call first)"


def dump_stacks_on_sigusr1(stream: TextIO) -> None:
    """Make SIGUSR1 write every thread's stack to `stream`, then log STACKS_WRITTEN.

    The stacks come from faulthandler's C-level handler, which needs neither
    the event loop nor the GIL's owner to cooperate: a daemon whose loop is
    stuck in one callback still answers. The log line comes from a Python
    handler that faulthandler chains to; it runs when the main thread next
    executes bytecode (at once, unless it is stuck inside C code). Workers
    are fresh interpreters (exec), so they inherit neither handler.
    """
    signal.signal(signal.SIGUSR1, lambda signum, frame: log.warning(STACKS_WRITTEN))
    # Registered after signal.signal, which would replace it. chain=True runs
    # the Python handler after the dump; chained to SIG_DFL it would kill us.
    faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hived", description="Run a hived node in the foreground.")
    p.add_argument("--config", metavar="PATH", help="TOML file (default /etc/hived/hived.toml if present)")
    p.add_argument("--name", help="node name (default: hostname)")
    p.add_argument("--bind", metavar="ADDR", help="mesh address to bind, tcp://HOST:PORT")
    p.add_argument("--advertise", metavar="ADDR", help="address peers dial")
    p.add_argument("--seed", dest="seeds", action="append", metavar="ADDR", help="a seed (repeat)")
    p.add_argument("--control", metavar="ADDR", help="control socket, ipc://PATH")
    p.add_argument("--cpus", help='CPU slots: "auto" or a number')
    p.add_argument("--gpus", help='GPU slots: "auto" or a number')
    p.add_argument("--key-file", metavar="PATH", help="cluster key from `hivectl keygen`")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning, error")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--check-config", action="store_true", help="print the effective config and exit")
    what.add_argument(
        "--reload", action="store_true",
        help="check the config, then have the running hived (at its control socket) apply it; "
        "exit 0 once it has, 1 if it refused or did not answer",
    )
    p.add_argument("--version", action="version", version=f"hived {__version__}")
    return p


def settings_from(config: Config) -> NodeSettings:
    pool, timing = config.pool, config.timing
    return NodeSettings(
        name=config.node.name,
        cpus=resolve_cpus(pool.cpus),
        gpus=resolve_gpus(pool.gpus),
        control=config.node.control,
        max_tasks_per_worker=pool.max_tasks_per_worker,
        memory_limit=memory_limit_bytes(pool.memory_limit, total_memory()),
        heartbeat=timing.heartbeat,
        drain_timeout=timing.drain_timeout,
        bind=config.node.bind,
        advertise=config.node.advertise,
        seeds=list(config.node.seeds),
        dead_after=timing.dead_after,
        lease=timing.lease,
        data_dir=config.node.data_dir,
        key=_key(config),
    )


def _key(config: Config) -> ClusterKey | None:
    path = config.security.key_file
    if not path:
        return None
    try:
        return load_key(path)
    except ConfigError as exc:  # say where the path was set, as for any other key
        origin = config.origins.get("security.key_file", "default")
        raise ConfigError(f"{origin}: security.key_file: {exc}") from None


def _resolved(pool: PoolConfig, settings: NodeSettings) -> dict[str, str]:
    """What "auto" comes to on this machine, for --check-config."""
    notes = {}
    if pool.cpus == "auto":
        notes["pool.cpus"] = f"auto: {settings.cpus} on this machine"
    if pool.gpus == "auto":
        ids = f" ({', '.join(settings.gpus)})" if settings.gpus else ""
        notes["pool.gpus"] = f"auto: {len(settings.gpus)} on this machine{ids}"
    return notes


class Daemon:
    def __init__(self, config: Config, notifier: Notifier, reload: Callable[[], Config]) -> None:
        """`reload` reads the configuration again, as at startup (raises ConfigError)."""
        self.config, self.notifier, self.reload = config, notifier, reload
        self.node = Node(settings_from(config), zmq.Context())
        bind = config.metrics.bind
        self.metrics = MetricsServer(bind, self.node) if bind is not None else None
        self.stop_requested = asyncio.Event()
        self.stop_now = asyncio.Event()
        self.signals = 0
        self.ready = False  # READY=1 sent: a reload before it would send a READY=1 too soon

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        control = self.config.node.control  # the node's, which is optional only when embedded
        if ask(control, StatusQuery(0), timeout=0.3) is not None:
            raise HiveError(f"another hived already serves {control}; stop it first")
        if self.metrics is not None:
            # Bound before the node starts, so a port in use stops us before
            # any worker is spawned; nothing is scraped until node.start()
            # below has run, since no await comes between.
            try:
                await self.metrics.start()
            except OSError as exc:
                origin = self.config.origins.get("metrics.bind", "default")
                raise ConfigError(
                    f"{origin}: metrics.bind: cannot serve at {self.metrics.bind}: "
                    f"{exc.strerror or exc}"
                ) from None
        try:
            self.node.start()
        except zmq.ZMQError as exc:
            raise self._unbindable(exc) from None
        # A drain that hivectl starts or ends shows in `systemctl status` at once.
        self.node.on_state_change = self._announce_status
        self.node.on_reload = self.reload_now
        await self._pool().ready.wait()
        s = self.node.settings
        log.info(
            "hived %s: node %s serving %s with %d CPU and %d GPU slots",
            __version__, s.name, s.control, s.cpus, len(s.gpus),
        )
        self.notifier.notify("READY=1", f"STATUS={self._status_line()}")
        self.ready = True
        # The daemon's own pulses (STATUS=, WATCHDOG=1, EXTEND_TIMEOUT_USEC=)
        # run until the node has closed: the stop's extension covers the close.
        pulses = Background(loop)
        pulses.spawn(self._report(), name="status report")
        interval = self.notifier.watchdog_interval()
        if interval:
            pulses.spawn(self._watchdog(interval), name="watchdog")
        await self.stop_requested.wait()
        self.notifier.notify("STOPPING=1", "STATUS=draining")
        # The most this stop takes: the drain, then the workers' exit.
        until = loop.time() + self.node.settings.drain_timeout + STOP_MARGIN
        pulses.spawn(self._extend_stop(until), name="stop extension")
        await self._drain_unless_stopped_now()
        if self.metrics is not None:
            await self.metrics.close()
        await self.node.close()
        await pulses.aclose()
        self.node.ctx.term()
        node, pool = self.node, self._pool()
        log.info(
            "hived stopped after %.1f s: %d task(s) run here, %d job(s) owned (%d finished, "
            "%d cancelled), %d worker crash(es)",
            time.monotonic() - node.started_at, pool.items_done, node.jobs_owned,
            node.jobs_finished, node.jobs_cancelled, pool.worker_crashes,
        )
        return 0

    async def _drain_unless_stopped_now(self) -> None:
        """Drain the node; a second signal cuts the drain short."""
        drain = asyncio.ensure_future(self.node.drain())
        second = asyncio.ensure_future(self.stop_now.wait())
        try:
            await asyncio.wait([drain, second], return_when=asyncio.FIRST_COMPLETED)
        finally:
            drain.cancel()
            second.cancel()
            await asyncio.gather(drain, second, return_exceptions=True)

    def _on_signal(self, sig: int) -> None:
        self.signals += 1
        log.info("%s: %s", signal.Signals(sig).name, "draining" if self.signals == 1 else "stopping now")
        self.stop_requested.set()
        if self.signals > 1:
            self.stop_now.set()

    def _on_reload(self) -> None:
        self.reload_now("SIGHUP")

    def reload_now(self, why: str) -> dict[str, Any]:
        """Read the configuration again and apply it; `why` starts its log lines.
        Returns the answer `hived --reload` gets: {"applied": ["key = value"],
        "restart": [key]} or {"error": why not}."""
        if not self.ready:
            log.warning("%s: hived is still starting; nothing is read again", why)
            return {"error": "hived is still starting; ask again once it is ready"}
        # MONOTONIC_USEC ties this reload to the SIGHUP of Type=notify-reload
        # (systemd >= 253): it waits for a RELOADING=1 stamped after its signal.
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return self._apply(self.reload(), why)
        except ConfigError as exc:
            log.error("%s: %s; the running configuration stays", why, exc)
            return {"error": f"{exc}; the running configuration stays"}
        finally:  # whatever happened, systemd must not be left "reloading"
            self.notifier.notify("READY=1", f"STATUS={self._status_line()}")

    def _apply(self, new: Config, why: str) -> dict[str, Any]:
        """Take the reloadable keys of `new`; name the changed keys that are not."""
        check_security(new)
        memory_limit = memory_limit_bytes(new.pool.memory_limit, total_memory())
        running, wanted = self.config.dotted(), new.dotted()
        changed = [key for key, value in wanted.items() if value != running[key]]
        fixed = [key for key in changed if key not in RELOADABLE]
        settings, pool = self.node.settings, self._pool()
        logging.getLogger().setLevel(new.log_level.upper())
        settings.max_tasks_per_worker = pool.max_tasks_per_worker = new.pool.max_tasks_per_worker
        settings.memory_limit = pool.memory_limit = memory_limit
        settings.drain_timeout = new.timing.drain_timeout
        self.config = dataclasses.replace(
            self.config,
            log_level=new.log_level,
            pool=dataclasses.replace(
                self.config.pool,
                max_tasks_per_worker=new.pool.max_tasks_per_worker,
                memory_limit=new.pool.memory_limit,
            ),
            timing=dataclasses.replace(self.config.timing, drain_timeout=new.timing.drain_timeout),
        )
        applied = [f"{key} = {wanted[key]!r}" for key in changed if key in RELOADABLE]
        log.info("%s: configuration reloaded; %s", why,
                 f"applied {', '.join(applied)}" if applied else "nothing to apply")
        if fixed:
            log.warning(
                "%s: %s changed but only take effect on a restart (`systemctl restart hived`)",
                why, ", ".join(fixed),
            )
        return {"applied": applied, "restart": fixed}

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a blocked loop stops the pings
        # and systemd restarts us, which is the point.
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _extend_stop(self, until: float) -> None:
        """While the stop runs, keep systemd's stop timeout ahead of us, up to
        `until` (loop time): TimeoutStopSec may be shorter than drain_timeout."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EXTEND_EVERY)
            usec = stop_extension(loop.time(), until)
            if usec is None:
                return
            self.notifier.notify(f"EXTEND_TIMEOUT_USEC={usec}")

    async def _report(self) -> None:
        sent = ""
        while True:
            await asyncio.sleep(STATUS_EVERY)
            line = self._status_line()
            if line != sent:
                self.notifier.notify(f"STATUS={line}")
                sent = line

    def _unbindable(self, exc: zmq.ZMQError) -> ConfigError | zmq.ZMQError:
        """A socket of the node that cannot be bound, as the key that named it."""
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            return exc
        node = self.config.node
        mesh = node.bind is not None and node.bind in str(exc)  # pyzmq names the address
        key, address = ("node.bind", node.bind) if mesh else ("node.control", node.control)
        origin = self.config.origins.get(key, "default")
        return ConfigError(f"{origin}: {key}: cannot bind {address}: {os.strerror(exc.errno)}")

    def _pool(self) -> Pool:
        """The node's pool, which exists from `node.start()` on: everything
        here but startup runs after it."""
        if self.node.pool is None:
            raise InternalError("the node's pool is used before node.start()")
        return self.node.pool

    def _announce_status(self) -> None:
        self.notifier.notify(f"STATUS={self._status_line()}")

    def _status_line(self) -> str:
        pool, mesh = self._pool(), self.node.mesh
        role = "coordinator" if mesh is None or mesh.is_coordinator() else "member"
        others = mesh.members()[1:] if mesh is not None else []
        heard = sum(peer.state in ("alive", "draining") for peer in others)
        lost = len(others) - heard  # suspect or dead: remembered, not heard from
        peers = f"{heard} peers" + (f" ({lost} lost)" if lost else "")
        line = f"{role}; {peers}; {pool.slots_busy}/{pool.slots_total} slots busy"
        if self.node.draining:
            line = f"draining; {line}"
        for seed in seed_problems({"seeds": mesh.seeds_status()}) if mesh is not None else []:
            line += f"; seed {seed['address']} {seed['state']}: {seed['why']}"
        return line


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    flags: dict[str, Any] = {
        "name": args.name,
        "bind": args.bind,
        "advertise": args.advertise,
        "seeds": args.seeds,
        "control": args.control,
        "cpus": args.cpus,
        "gpus": args.gpus,
        "key_file": args.key_file,
        "data_dir": args.data_dir,
        "log_level": args.log_level,
    }

    def load() -> Config:
        return load_config(args.config, flags)

    try:
        config = load()
        check_security(config)
        if args.check_config or args.reload:
            # What starting would check too: the key file loads, GPUs asked for exist.
            settings = settings_from(config)
            if args.reload:
                return reload_running(config.node.control, settings.key)
            sys.stdout.write(config.to_toml(_resolved(config.pool, settings)))
            return 0
    except ConfigError as exc:
        say(f"hived: {exc}", sys.stderr)
        return 2
    configure(config.log_level, sys.stderr)
    dump_stacks_on_sigusr1(sys.stderr)  # from here on: a hang during startup is diagnosable too
    notifier = Notifier.from_env(unset_environment=True)
    loop = _new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        daemon = Daemon(config, notifier, load)
        return loop.run_until_complete(daemon.run())
    except ConfigError as exc:  # found late: the key file, GPUs asked for
        say(f"hived: {exc}", sys.stderr)
        return 2
    except (HiveError, OSError, zmq.ZMQError) as exc:
        say(f"hived: {exc}", sys.stderr)
        return 1
    finally:
        loop.close()


def reload_running(control: str, key: ClusterKey | None, timeout: float = RELOAD_TIMEOUT) -> int:
    """`hived --reload`: ask the daemon at `control` to read its configuration
    again, and wait for what it did: 0 applied, 1 refused or no answer."""
    if control.startswith("ipc://") and not _listening(control[len("ipc://"):]):
        say(f"hived: no hived listens at {control}: it is not running (`systemctl status hived`)",
            sys.stderr)
        return 1
    try:
        curve = key.client if key is not None and control.startswith("tcp://") else None
        answer = ask(control, ReloadRequest(1), timeout, curve)
    except HiveError as exc:  # a control socket not to be trusted
        say(f"hived: {exc}", sys.stderr)
        return 1
    if answer is None:
        say(f"hived: no answer from a hived at {control} (waited up to {timeout:g} s): it is not running "
            "(`systemctl status hived`), it is stuck, or it is older than this release and "
            "cannot be asked (`systemctl restart hived` starts this one)", sys.stderr)
        return 1
    body = answer.body
    if isinstance(body.get("error"), str):
        say(f"hived: the running hived did not reload: {body['error']}", sys.stderr)
        return 1
    applied, restart = body.get("applied"), body.get("restart")
    if not (isinstance(applied, list) and isinstance(restart, list)
            and all(isinstance(x, str) for x in applied + restart)):
        say(f"hived: the answer to a reload should list what was applied and what needs a "
            f"restart; got {str(body)[:200]}", sys.stderr)
        return 1
    line = f"hived: reloaded; {'applied ' + ', '.join(applied) if applied else 'nothing to apply'}"
    if restart:
        line += f"; {', '.join(restart)} only take effect on a restart (`systemctl restart hived`)"
    say(line, sys.stdout, logging.INFO)
    return 0



def _listening(path: str) -> bool:
    """Whether anything accepts connections on the Unix socket at `path`: a
    stopped daemon leaves its socket file behind, and ZeroMQ would wait on it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:  # not for this check to judge (permissions): `ask` says why
            return True
    return True


if __name__ == "__main__":
    sys.exit(main())
