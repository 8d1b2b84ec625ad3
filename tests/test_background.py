"""hived.net.background: tasks and timers owned, cancelled and awaited on close."""

from __future__ import annotations

import asyncio

import pytest

from hived.errors import InternalError
from hived.net.background import Background


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_task_is_tracked_until_it_ends_and_a_timer_until_it_fires():
    async def main():
        bg = Background(asyncio.get_running_loop())
        done, fired = asyncio.Event(), asyncio.Event()

        async def work():
            await done.wait()

        task = bg.spawn(work())
        bg.call_later(0.01, fired.set)
        assert len(bg) == 2
        await fired.wait()
        assert len(bg) == 1
        done.set()
        await task
        assert len(bg) == 0

    run(main())


def test_close_cancels_every_timer_and_awaits_every_task():
    async def main():
        bg = Background(asyncio.get_running_loop())
        unwound, fired = [], []

        async def forever(n):
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0)  # unwinding takes a step of its own
                unwound.append(n)

        tasks = [bg.spawn(forever(n)) for n in range(3)]
        bg.call_later(0.05, fired.append, "timer")
        await asyncio.sleep(0)  # each task is in its wait
        await bg.aclose()
        assert sorted(unwound) == [0, 1, 2]
        assert all(t.cancelled() for t in tasks)
        await asyncio.sleep(0.1)
        assert fired == [] and len(bg) == 0

    run(main())


def test_a_task_started_while_closing_is_awaited_too():
    async def main():
        bg = Background(asyncio.get_running_loop())
        late = []

        async def child():
            late.append("ran")

        async def parent():
            try:
                await asyncio.Event().wait()
            finally:
                # Closed already: nothing new starts, and the coroutine is closed unstarted.
                assert bg.spawn(child()) is None

        bg.spawn(parent())
        await asyncio.sleep(0)
        await bg.aclose()
        assert late == [] and len(bg) == 0

    run(main())


def test_once_closed_nothing_new_starts():
    async def main():
        bg = Background(asyncio.get_running_loop())
        await bg.aclose()
        ran = []

        async def work():
            ran.append(1)

        coro = work()
        assert bg.spawn(coro) is None
        assert coro.cr_frame is None  # closed, so no "never awaited" warning
        assert bg.call_later(0, ran.append, 2) is None
        await asyncio.sleep(0.01)
        assert ran == []

    run(main())


def test_a_cancelled_timer_is_forgotten():
    async def main():
        bg = Background(asyncio.get_running_loop())
        fired = []
        handle = bg.call_later(0.01, fired.append, 1)
        bg.cancel(handle)
        bg.cancel(None)
        assert len(bg) == 0
        await asyncio.sleep(0.02)
        assert fired == []

    run(main())


def test_close_from_another_loop_is_an_internal_error():
    bg = Background(asyncio.new_event_loop())
    try:
        with pytest.raises(InternalError, match="on the loop it owns"):
            run(bg.aclose())
    finally:
        bg.loop.close()
