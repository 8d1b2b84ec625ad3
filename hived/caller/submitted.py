"""The one-item job behind a `Hive.submit`: its future, and its call until done.

A call waits in the Hive's queue (QUEUED), goes to the node (SENT) when
fewer than slots + 1 are there, and is DROPPED if cancelled first. What the
node answers completes the real `concurrent.futures.Future`; once it is done
the call lets go of the pickled arguments and the future, and the Hive (whose
lock guards `state` and its counts) sends the next queued one.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hived.caller.mapping import check_range, lacks_function_again, load_values, raise_for
from hived.errors import UNKNOWN_BLOB, RemoteProtocolError, error_type
from hived.protocol.control import ItemsFailed, JobRefused, Result
from hived.protocol.wire import Message

if TYPE_CHECKING:
    from hived.caller.client import Hive


class SubmittedCall:
    """The one-item job behind a `submit`."""

    QUEUED, SENT, DROPPED = "queued", "sent", "dropped"

    def __init__(
        self,
        hive: Hive,
        job: int,
        future: concurrent.futures.Future | None,
        call: Callable[[bool], list[Any]] | None,
    ):
        self.hive, self.job, self.future, self.call = hive, job, future, call
        self.state = self.QUEUED  # changed under the hive's lock
        self.epoch = 0  # the link it last went out on (the hive's epoch then)
        self.resent = False  # the function went again after the node said it lacked it

    def send(self, force_blob: bool, again: bool = False) -> None:
        call = self.call
        if call is not None:  # None once the future is done
            self.hive._send_call(self, call(force_blob), again)

    def deliver(self, msg: Message, payload: list[Any]) -> None:
        future = self.future
        if future is None or future.done():  # None: done, and let go
            return
        try:
            if isinstance(msg, (Result, ItemsFailed)):
                if msg.chunk != 0:
                    raise RemoteProtocolError(f"the node sent a result for chunk {msg.chunk} of a submit")
                check_range(msg, 1)
            # The arguments go before the future completes: a caller woken by
            # result() must not find them still held (done() runs after it).
            if isinstance(msg, Result):
                (value,) = load_values(payload, 1, "the result")
                self.call = None
                future.set_result(raise_for(value))
            elif isinstance(msg, ItemsFailed):
                self.call = None
                future.set_exception(error_type(msg.kind)(msg.text))
            elif isinstance(msg, JobRefused):
                if msg.kind != UNKNOWN_BLOB:
                    self.call = None
                    future.set_exception(error_type(msg.kind)(msg.text))
                elif self.resent:
                    future.set_exception(lacks_function_again())
                else:
                    self.resent = True
                    self.send(force_blob=True, again=True)
        except BaseException as exc:  # the task's own exception, re-raised by raise_for
            if not future.done():
                # Without this frame in its traceback, which would keep the
                # result's frames and this job alive as long as the exception
                # (the remote traceback is its cause).
                future.set_exception(exc.with_traceback(None))

    def done(self, future: concurrent.futures.Future) -> None:
        hive = self.hive
        self.call = None  # the pickled arguments (views of the caller's buffers) go
        hive._forget(self.job)
        with hive._lock:
            hive._futures.discard(future)
            if self.state == self.SENT:
                hive._sent -= 1
            elif self.state == self.QUEUED:  # cancelled before it was sent
                self.state = self.DROPPED
                # What an executor owes a cancelled future: without it,
                # concurrent.futures.wait/as_completed never count it as done.
                future.set_running_or_notify_cancel()
            # The future holds this (its callback) but not the other way
            # round any more: a future the caller drops goes at once.
            self.future = None
        hive._dispatch()
        hive._close_if_idle()
