"""The cluster key and CURVE on every TCP socket.

A hive shares one CURVE key pair, the *cluster key*, written by `hivectl
keygen` and copied to every node (mode 0640, root:hived). Every server socket uses it as
its own key; every client socket (a node dialling a peer, a remote client)
presents it too. A ZAP handler on each node admits a connection only when the
client's public key is the cluster's: holding the key file is membership.
CURVE encrypts and authenticates before any frame reaches our code, so a peer
without the key never gets a byte of ours decoded, let alone unpickled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils import z85

from hived.errors import ConfigError, HiveError
from hived.net.addresses import is_loopback

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


@dataclass(frozen=True)
class ClusterKey:
    public: bytes  # Z85, 40 bytes
    secret: bytes

    def server(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server that asks ZAP who may connect."""
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = b"hived"

    def client(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client presenting the cluster key."""
        sock.curve_serverkey = self.public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def write_key(path: str, *, replace: bool = False) -> ClusterKey:
    """Write a new cluster key to `path`, readable by its owner only.

    An existing file at `path` is replaced only with `replace`; otherwise
    FileExistsError (a node keeping the old key can no longer talk to the
    others)."""
    public, secret = zmq.curve_keypair()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".hived-key-")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("# hived cluster key: whoever holds this file can join the hive and run code.\n")
            f.write(f'public = "{public.decode()}"\nsecret = "{secret.decode()}"\n')
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and never onto an existing file
    finally:
        with contextlib.suppress(FileNotFoundError):  # gone once replaced
            os.unlink(tmp)
    return ClusterKey(public, secret)


def load_key(path: str) -> ClusterKey:
    """Read a cluster key file; ConfigError naming the file if it is unusable."""
    try:
        with open(path) as f:
            text = f.read()
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: cannot read the cluster key: no such file (`hivectl keygen {path}` makes "
            "one; every node needs the same file)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cluster key: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        log.warning("%s is readable by others; `chmod 600 %s`", path, path)
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[key.strip()] = value.strip().strip('"').encode()
    public, secret = values.get("public", b""), values.get("secret", b"")
    if len(public) != 40 or len(secret) != 40:
        raise ConfigError(
            f"{path}: expected a cluster key (public and secret, 40 Z85 characters each), "
            "as written by `hivectl keygen PATH`"
        )
    try:
        derived = zmq.curve_public(secret)
    except zmq.ZMQError:
        derived = b""
    if derived != public:
        raise ConfigError(f"{path}: the public key does not match the secret key")
    return ClusterKey(public, secret)


def client_curve(address: str, key_file: str | None) -> Callable[[zmq.Socket], None] | None:
    """How a client socket dialling `address` must be set up: CURVE with the
    cluster key (from `key_file`, else $HIVED_KEY_FILE), or nothing on ipc."""
    key_file = key_file or os.environ.get("HIVED_KEY_FILE") or None
    if not address.startswith("tcp://"):
        return None
    if key_file:
        return load_key(key_file).client
    if not is_loopback(address):
        raise HiveError(
            f"{address} is another machine: connecting needs the cluster key; pass "
            "key_file= (hivectl --key-file) or set HIVED_KEY_FILE"
        )
    return None


class ZapHandler:
    """Answers ZeroMQ's authentication requests: the cluster key or nothing."""

    def __init__(self, ctx: zmq.Context, key: ClusterKey):
        self.key_raw = z85.decode(key.public)
        self.sock = ctx.socket(zmq.REP)
        self.sock.linger = 0
        self.sock.bind(ZAP_ENDPOINT)

    def handle(self, frames: list[Any]) -> None:
        """One ZAP request (RFC 27) in, one reply out."""
        parts = [bytes(f.bytes if hasattr(f, "bytes") else f) for f in frames]
        if len(parts) < 6:
            return
        version, request_id, _domain, address, _identity, mechanism = parts[:6]
        credentials = parts[6:]
        ok = mechanism == b"CURVE" and credentials[:1] == [self.key_raw]
        if not ok:
            peer = address.decode(errors="replace")
            log.warning("refused a %s connection from %s: not a holder of the cluster key",
                        mechanism.decode(errors="replace"), peer)
        code, text = (b"200", b"OK") if ok else (b"400", b"not a holder of the cluster key")
        self.sock.send_multipart([version, request_id, code, text, b"", b""])

    def close(self) -> None:
        self.sock.close(linger=0)
