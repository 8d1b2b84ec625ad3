"""hived, or hivectl, as a release of another protocol version would be, for the upgrade tests.

    python3 tests/speak.py MAJOR.MINOR daemon ARGS...   # hived ARGS...
    python3 tests/speak.py MAJOR.MINOR cli ARGS...      # hivectl ARGS...

Sets `hived.protocol.wire`'s version before any message type is registered, so every
envelope this process sends says MAJOR.MINOR, and has the daemon's workers
speak it too. From minor 1 on, the daemon also has what minor 1 brought, as
an upgraded release would:

* M.NEWS, a message type of minor 1, which it sends to each peer with each
  BEAT (the mesh's send path keeps it from peers of minor 0);
* `news`, a field minor 1 added to BEAT, set on every BEAT it sends;

and it logs each of them the first time it gets one from a node
(`speak: got M.NEWS from h1`), so a test sees where they went. Then it runs
the normal entry point.
"""

# No `from __future__ import annotations`: the message classes below are made
# inside a function, after the version is set, and their annotations must be
# evaluated there, where their names are.
import logging
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
log = logging.getLogger("speak")


def speak(major: int, minor: int) -> None:
    """Make this process speak protocol major.minor; call it before any other hived import."""
    from hived.protocol import wire

    if wire._REGISTRY:
        raise RuntimeError("message types were registered before the version was set")
    wire.PROTOCOL_MAJOR, wire.PROTOCOL_MINOR = major, minor
    wire.VERSION = b"HV%d.%d" % (major, minor)


def upgrade_daemon(major: int, minor: int) -> None:
    """The daemon's part: its workers speak our version, and minor 1's additions."""
    from hived.node import pool

    pool.WORKER_MAIN = (
        f"import sys; sys.path.insert(0, {TESTS!r}); import speak; speak.speak({major}, {minor}); "
        "from hived.node.worker import main; main()"
    )
    if minor >= 1:
        _minor_one()


def _minor_one() -> None:
    from typing import Annotated

    from hived.mesh import gossip
    from hived.mesh import shell as mesh
    from hived.protocol import wire
    from hived.protocol.fields import Name
    from hived.protocol.wire import Message, Since, message

    @message(b"M.NEWS", since=1)
    class News(Message):
        name: Name

    del wire._REGISTRY[b"M.BEAT"]  # BEAT as minor 1 has it: one field more

    @message(b"M.BEAT")
    class Beat(gossip.Beat):
        news: Annotated[bool, Since(1)] = False

    # Membership dispatches by class (match), so the subclass is a BEAT to it.
    new_beats = gossip.new_beats
    fields = gossip.Beat._names
    gossip.new_beats = lambda *a, **kw: [
        Beat(*(getattr(b, f) for f in fields), news=True) for b in new_beats(*a, **kw)
    ]

    send = mesh.Mesh.send

    def send_news_too(self, address, msg, payload=()):  # noqa: ANN001, ANN202
        sent = send(self, address, msg, payload)
        if isinstance(msg, Beat):
            send(self, address, News(self.name))
        return sent

    mesh.Mesh.send = send_news_too
    decode = mesh.decode
    seen: set[tuple[str, str]] = set()

    def decode_and_note(frames):  # noqa: ANN001, ANN202
        msg, payload = decode(frames)
        what = "M.NEWS" if isinstance(msg, News) else "M.BEAT.news" if getattr(msg, "news", 0) else ""
        if what and (what, msg.name) not in seen:
            seen.add((what, msg.name))
            log.info("speak: got %s from %s", what, msg.name)
        return msg, payload

    mesh.decode = decode_and_note


def main(argv: list[str]) -> int:
    version, role, *args = argv
    major, minor = (int(n) for n in version.split("."))
    speak(major, minor)
    if role == "daemon":
        upgrade_daemon(major, minor)
        from hived.daemon import main as entry
    else:
        from hived.cli import main as entry
    return entry(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
