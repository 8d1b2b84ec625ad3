"""Which protocol minor each peer speaks, and what of a newer one this node ignores — sans-IO.

Minors of one major interoperate (see `hived.protocol.wire`): each pair speaks the
lower minor. Every message's envelope carries its sender's own version, so
the mesh shell tells this table the version word of each message a peer
sent that decoded (`heard`; parsed only when it changes), and asks it before
each send which minor to speak to that peer (`minor_for`):

    inbox ──▶ decode ──▶ heard(sender, b"HV1.1") ──▶ {address: (1, 1)}
    send(address, msg) ──▶ minor_for(address) = min(ours, theirs), 0 unheard
                      ──▶ known_at(msg, minor)? ──▶ encode(msg, minor=minor)

A peer not heard from yet is spoken to in minor 0, which every peer of our
major reads; its first message says more. A message type of a newer minor
that this node does not know is `ignored`: counted by type, and logged at
debug once per peer and type. The tables are bounded (the oldest entry is
forgotten first), so peers cannot grow them without end.
"""

from __future__ import annotations

import logging

from hived.protocol import wire

log = logging.getLogger(__name__)

MAX_PEERS = 4096  # peers whose version is remembered
MAX_IGNORED_TYPES = 64  # distinct ignored types counted by name; the rest as "other"


class PeerVersions:
    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self.max_peers = max_peers
        self._words: dict[str, bytes] = {}  # address: the version word last seen
        self._versions: dict[str, tuple[int, int]] = {}  # address: (major, minor)
        self._logged: dict[tuple[str, bytes], None] = {}  # (peer, type) ignored and logged
        self.ignored_by_type: dict[str, int] = {}  # for `hivectl status --json`

    def heard(self, address: str, word: bytes) -> None:
        """A message from `address` of envelope version `word` decoded."""
        if self._words.get(address) == word:
            return
        version = wire.parse_version(word)
        if version is None or version[0] != wire.PROTOCOL_MAJOR:
            return  # decode refused it: nothing the peer speaks to us
        old = self._versions.pop(address, None)
        if old is not None and old != version:
            log.info("mesh: %s now speaks protocol %d.%d (was %d.%d)", address, *version, *old)
        self._words.pop(address, None)
        self._words[address], self._versions[address] = word, version
        if len(self._words) > self.max_peers:
            oldest = next(iter(self._words))
            del self._words[oldest], self._versions[oldest]

    def minor_for(self, address: str) -> int:
        """The minor to speak to `address`: the lower of ours and its; 0 if not heard."""
        version = self._versions.get(address)
        return 0 if version is None else min(version[1], wire.PROTOCOL_MINOR)

    def version_of(self, address: str) -> str | None:
        """The protocol `address` speaks ("1.1"), or None if not heard from."""
        version = self._versions.get(address)
        return None if version is None else f"{version[0]}.{version[1]}"

    def ignored(self, address: str, type_name: bytes) -> None:
        """`address`, of a newer minor, sent a message type this node does not know."""
        kind = type_name[:32].decode("ascii", "replace")
        if kind not in self.ignored_by_type and len(self.ignored_by_type) >= MAX_IGNORED_TYPES:
            kind = "other"
        self.ignored_by_type[kind] = self.ignored_by_type.get(kind, 0) + 1
        key = (address[:64], type_name[:32])
        if key in self._logged:
            return
        self._logged[key] = None
        if len(self._logged) > self.max_peers:
            del self._logged[next(iter(self._logged))]
        log.debug("mesh: ignored %s from %s (protocol %s): a newer minor's type, not ours",
                  kind, address[:64], self.version_of(address) or "?")
