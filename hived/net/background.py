"""Background work with an owner: the tasks and timers one component started.

A component (the node, the exchange, the daemon) starts
tasks and timers on the loop and must not leave any behind when it closes: a
task cancelled but never awaited logs "Task was destroyed but it is pending"
at exit, and a forgotten timer fires into a component that has closed.
`Background` is that owner. What it starts it tracks until done; `aclose()`
cancels every timer and task and waits for the tasks to end. Once closed, it
starts nothing new: a callback that arrives during shutdown and asks for a
task or a timer gets none (the coroutine is closed unstarted), since the
component it would serve is going away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from hived.errors import InternalError


class Background:
    """Tasks and timers started on `loop`, each tracked until it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self.closed = False

    def __len__(self) -> int:
        """How many tasks and timers are pending."""
        return len(self._tasks) + len(self._timers)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any] | None:
        """Run `coro` as a task of this owner; None (and `coro` closed) once closed."""
        if self.closed:
            coro.close()
            return None
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> asyncio.TimerHandle | None:
        """`loop.call_later`, tracked until it fires or is cancelled; None once closed."""
        if self.closed:
            return None
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            callback(*args)

        handle = self.loop.call_later(delay, fire)
        self._timers.add(handle)
        return handle

    def cancel(self, handle: asyncio.TimerHandle | None) -> None:
        """Cancel a timer this owner started (None, or one that fired, is a no-op)."""
        if handle is not None:
            handle.cancel()
            self._timers.discard(handle)

    async def aclose(self) -> None:
        """Cancel every timer and task, and wait until the tasks have ended."""
        if asyncio.get_running_loop() is not self.loop:
            raise InternalError("Background.aclose() must run on the loop it owns tasks on")
        self.closed = True
        for handle in self._timers:
            handle.cancel()
        self._timers.clear()
        # A task that is cancelled may still start another while it unwinds:
        # nothing new starts once closed, so this ends.
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
