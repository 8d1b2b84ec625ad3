"""systemd's notify protocol, without libsystemd.

Theory of operation
-------------------
Under ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``: an AF_UNIX datagram
socket, either a file path or, when it starts with "@", a name in the
abstract namespace (the "@" stands for a leading NUL byte). A message is one
datagram of newline-separated ``VAR=value`` assignments::

    READY=1            the service is up (mesh socket bound, pool running)
    STATUS=...         free text for `systemctl status`
    WATCHDOG=1         "still alive"; needed every WatchdogSec or we are killed
    RELOADING=1        configuration reload begins; with MONOTONIC_USEC=<now>, which
                       Type=notify-reload (systemd >= 253) needs to match it to its SIGHUP
    STOPPING=1         shutdown (drain) begins
    EXTEND_TIMEOUT_USEC=N   "give me N µs more" (from now), while a stop runs long

systemd learns the sender from the socket's SCM_CREDENTIALS, which the
kernel attaches, so nothing else is needed. With ``NotifyAccess=main`` only
the daemon's own pid is listened to, so worker processes need not (and
should not) see ``$NOTIFY_SOCKET``: ``from_env(unset_environment=True)``
removes it from ``os.environ`` before workers are spawned.

``$WATCHDOG_USEC`` is the watchdog period. Pinging at half of it leaves a
full half-period of slack. ``$WATCHDOG_PID``, when set, says which process
the watchdog is meant for; any other process must not ping.

systemd kills a stop that outlasts TimeoutStopSec, unless the service keeps
asking for more time: each EXTEND_TIMEOUT_USEC moves the deadline to N µs
after it arrives (never below TimeoutStopSec), and the next must come
before that. `stop_extension` says how much to ask for: a few periods
ahead, so a datagram or two may be late, but never past the end the
daemon itself sets for its stop, so a drain that overruns its own bound is
still killed.

Sending never blocks and never raises on socket errors: the daemon's event
loop must not stall on systemd, and a lost STATUS line must not take the
node down (a lost WATCHDOG=1 is what the watchdog is for).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

log = logging.getLogger(__name__)

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# While a stop runs: ask for more time every EXTEND_EVERY seconds, each time
# for EXTEND_AHEAD seconds (cut to what is left of the stop's own bound).
EXTEND_EVERY = 2.0
EXTEND_AHEAD = 5 * EXTEND_EVERY


class Notifier:
    """Sends notify messages to systemd; every call is a no-op outside systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # `address` as systemd gives it ("/run/..." or "@name"); None = not under systemd.
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | MutableMapping[str, str] = os.environ,
        *,
        unset_environment: bool = False,
    ) -> Notifier:
        """A notifier for what systemd put in `environ`.

        `unset_environment` removes NOTIFY_SOCKET, WATCHDOG_USEC and
        WATCHDOG_PID from `environ` (which must then be mutable), so spawned
        workers and the user code they run cannot speak for the daemon.
        """
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            # e.g. "vsock:..." from newer systemd, meant for VMs; we do not speak it.
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying", address)
            address = None
        usec = _watchdog_usec(environ)
        if unset_environment:
            for var in _ENV_VARS:
                environ.pop(var, None)  # type: ignore[union-attr]
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram of `lines` ("READY=1", "STATUS=..."); True if sent."""
        if self.address is None or not lines:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                # A newline would smuggle in a second assignment (a STATUS
                # text saying "\nREADY=1"); reject it as our caller's bug.
                raise ValueError(f"a notify line is one VAR=value without newlines, got {line!r}")
        payload = "\n".join(lines).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(payload, target)
        except OSError as exc:
            # Warn once: a watchdog pinging every few seconds must not flood the log.
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec); None = no watchdog."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None  # meant for another process (our parent, say)
        except ValueError:
            return None
    return usec


def stop_extension(now: float, until: float, ahead: float = EXTEND_AHEAD) -> int | None:
    """EXTEND_TIMEOUT_USEC's value at `now` for a stop bound to end by `until`
    (both in seconds on one monotonic clock); None once `until` has passed."""
    left = until - now
    if left <= 0:
        return None
    return max(1, int(min(ahead, left) * 1_000_000))
