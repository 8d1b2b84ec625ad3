"""joblib on the hive: `import hived.joblib` registers the backend "hived".

    import joblib, hived.joblib
    with joblib.parallel_config("hived"):
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

The backend finds its hive the way `hived.connect()` does (HIVED_ADDRESS,
the local daemon, else an embedded hive), or takes `address=` and
`key_file=` (`parallel_config("hived", address="tcp://...")`). `n_jobs=-1`
is every slot of the hive. One Hive per address serves every Parallel call
in the process (an embedded one would otherwise start its workers again
for each), and is finished at exit as every Hive is. Each joblib batch is one `submit`; joblib's
auto-batching sizes the batches from how long they take, so a thousand tiny
calls travel as a few batches rather than a thousand round trips. Calls
joblib makes inside a task run one after another in that task's worker: its
slot is its share of the hive.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase, SequentialBackend

import hived

NAME = "hived"

_hives: dict[tuple[str | None, str | None], hived.Hive] = {}
_hives_lock = threading.Lock()


def _run(batch: Callable[[], Any]) -> Any:
    """One joblib batch, in a worker. The batch is the argument, not the
    function: a function blob is kept on the node for the client's life, and
    every batch is a new one."""
    return batch()


class HiveBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ParallelBackendBase over a `hived.Hive`."""

    supports_retrieve_callback = True  # results come through the futures' callbacks
    default_n_jobs = -1  # parallel_config("hived") alone: the whole hive

    def __init__(
        self, address: str | None = None, *, key_file: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.address, self.key_file = address, key_file
        self._running: set[concurrent.futures.Future] = set()

    @property
    def hive(self) -> hived.Hive:
        where = (self.address, self.key_file)
        with _hives_lock:
            hive = _hives.get(where)
            if hive is None or hive._lost is not None:  # gone: a new connection
                hive = _hives[where] = hived.connect(self.address, key_file=self.key_file)
            return hive

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        slots = self.hive.slots
        if n_jobs is None or n_jobs < 0:  # joblib's convention: -1 all, -2 all but one
            return max(slots + 1 + (n_jobs or -1), 1)
        return n_jobs

    def submit(
        self, func: Callable[[], Any], callback: Callable[[Any], None] | None = None
    ) -> concurrent.futures.Future:
        future = self.hive.submit(_run, func)
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    apply_async = submit  # what joblib before 1.5 calls

    # joblib hands back what our submit returned (its stubs allow a
    # multiprocessing ApplyResult too, which this backend never makes).
    def retrieve_result_callback(  # type: ignore[override]
        self, out: concurrent.futures.Future[Any]
    ) -> Any:
        return out.result()

    def get_nested_backend(self) -> tuple[SequentialBackend[Any], int | None]:
        # A task's own joblib calls run in its worker, one after another.
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A task failed: its call's batches not sent yet are cancelled."""
        for future in list(self._running):
            future.cancel()


register_parallel_backend(NAME, HiveBackend)
