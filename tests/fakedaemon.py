"""A fake daemon: a real ZeroMQ ROUTER on an ipc socket that answers as told.

It decodes what the client sends and hands each message to `answer(fake,
client, msg, payload)`, which replies with `fake.send`; `flood` makes it
send a message over and over to the last client heard. The client under
test is the real one (`hived.connect`, hivectl), over a real socket.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import zmq

from hived.config import DEFAULT_HEARTBEAT
from hived.errors import RemoteProtocolError
from hived.protocol.control import LINK_TIMEOUT, Hello, Welcome
from hived.protocol.wire import Message, decode, encode

Answer = Callable[["FakeDaemon", bytes, Message, list[Any]], None]


def welcome(fake: FakeDaemon, client: bytes, msg: Message, payload: list[Any]) -> None:
    """What every fake says to a HELLO unless told otherwise."""
    if isinstance(msg, Hello):
        fake.send(client, Welcome("fake", "0.1.0", 2, DEFAULT_HEARTBEAT, LINK_TIMEOUT, False, []))


class FakeDaemon:
    def __init__(self, directory: str, answer: Answer) -> None:
        self.address = f"ipc://{os.path.join(directory, 'hived.sock')}"
        self.answer = answer
        self.received: list[Message] = []
        self.flood: list[Any] | None = None  # frames sent again and again once set
        self.sent = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(self.address)
        self._stop = threading.Event()
        self._last: bytes | None = None
        self._thread = threading.Thread(target=self._run, name="fake-daemon", daemon=True)
        self._thread.start()

    def send(self, client: bytes, msg: Message, payload: list[Any] | tuple = ()) -> None:
        self._sock.send_multipart([client, *encode(msg, list(payload))])
        self.sent += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.flood is not None and self._last is not None:
                for _ in range(50):
                    self._sock.send_multipart([self._last, *self.flood])
                    self.sent += 1
            if not self._sock.poll(1 if self.flood is not None else 20):
                continue
            client, *frames = self._sock.recv_multipart()
            self._last = client
            try:
                msg, payload = decode(frames)
            except RemoteProtocolError:
                continue
            self.received.append(msg)
            self.answer(self, client, msg, payload)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        self._ctx.term()
