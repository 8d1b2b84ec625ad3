"""The function blobs a node holds, and how long it keeps each.

A job's function travels once, pickled, as a blob named by its hash
(`function_digest`); the pool sends it to each worker once. A node holds a
blob for two kinds of user:

- its own clients: a client that opened a job of that function uses it until
  the client is dropped, and the blob goes with the last such client;
- other owners: a blob that came with a pulled range is kept, most recent
  first, among the last `REMOTE_BLOBS` such blobs, so that the next range of
  that function comes without it (`known` tells owners which we have). One
  pushed out of that list is dropped unless a client of ours uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

REMOTE_BLOBS = 256  # function blobs of other owners kept here, most recent first
KNOWN_TOLD = 64  # of those, how many a PULL names as known


class BlobStore(Mapping[bytes, bytes]):
    """Function blobs by hash (a read-only mapping to the pool), and their users."""

    def __init__(self, remote_kept: int = REMOTE_BLOBS) -> None:
        self._blobs: dict[bytes, bytes] = {}
        self._users: dict[bytes, int] = {}  # hash -> local clients that use it
        self._remote: OrderedDict[bytes, None] = OrderedDict()  # most recent first
        self._remote_kept = remote_kept

    def __getitem__(self, fn: bytes) -> bytes:
        return self._blobs[fn]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blobs)

    def __len__(self) -> int:
        return len(self._blobs)

    def add(self, fn: bytes, blob: bytes) -> None:
        """Hold `blob` (its hash checked by the caller); one held already stays."""
        self._blobs.setdefault(fn, blob)

    def use(self, fn: bytes) -> None:
        """A client of ours opened a job of `fn` (once per client)."""
        self._users[fn] = self._users.get(fn, 0) + 1

    def release(self, fn: bytes) -> None:
        """A client that used `fn` is gone: the last one takes the blob with it."""
        self._users[fn] -= 1
        if not self._users[fn]:
            del self._users[fn]
            self._blobs.pop(fn, None)

    def keep_remote(self, fn: bytes, blob: bytes) -> None:
        """A blob that came with another owner's range: hold it among the most recent."""
        self.add(fn, blob)
        self._remote[fn] = None
        self._remote.move_to_end(fn, last=False)
        while len(self._remote) > self._remote_kept:
            old, _ = self._remote.popitem()
            if old not in self._users:
                self._blobs.pop(old, None)

    def known(self) -> list[bytes]:
        """The other owners' blobs we hold, most recent first, as a PULL names them."""
        return list(self._remote)[:KNOWN_TOLD]
