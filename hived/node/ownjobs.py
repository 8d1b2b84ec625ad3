"""The jobs this node owns as they are named: in its log, by `hivectl jobs`, to the pool.

The owner's book (hived.node.scheduling) says what each job's items are; this
says what a person reads of it: its id (`job_id`), the line that starts it
and the one that ends it with its counts, its row in `hivectl jobs`, and the
small number (its tag) that names it to the pool and to other nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from hived.node.scheduling import Job, JobKey


def job_id(key: JobKey) -> str:
    """A job's id as `hivectl jobs` lists it and `hivectl cancel` takes it."""
    return f"{key[0].hex()[:8]}/{key[1]}"


@dataclass
class OpenedJob:
    """A job this node owns, as its log lines name it."""

    job: Job  # the owner's book entry: its counts outlive the book's forgetting it
    label: str  # the function's name
    client: str  # the client's label: host and pid
    # INFO for a map; DEBUG for a submit, a job of one task, which a program
    # may open thousands of a second
    level: int


class OwnJobs:
    def __init__(self, node_name: str, log: logging.Logger) -> None:
        self.node_name = node_name
        self.log = log  # the node's: its jobs' lines are its own
        self._opened: dict[JobKey, OpenedJob] = {}
        self._tags: dict[JobKey, int] = {}
        self._tagged: dict[int, JobKey] = {}
        self._next_tag = 0
        # Jobs this node owned, for the line its stop logs.
        self.owned = self.finished = self.cancelled = 0

    def opened(self, job: Job, label: str, client: str, call: bool, detail: str) -> None:
        """`job` entered the book; `call`: a submit's job of one task."""
        opened = self._opened[job.key] = OpenedJob(
            job, label, client, logging.DEBUG if call else logging.INFO
        )
        self.owned += 1
        self.log.log(opened.level, "job %s started: %s, client %s, %s", job_id(job.key), label,
                client, "1 task (a submit)" if call else detail)

    def forget(self, key: JobKey, now: float, cancelled: str | None = None) -> None:
        """The job is out of the book: finished, or `cancelled` and why."""
        tag = self._tags.pop(key, None)
        if tag is not None:
            del self._tagged[tag]
        opened = self._opened.pop(key, None)
        if opened is None:  # ended before (a CANCEL after its last result, say)
            return
        job = opened.job
        if cancelled is None:
            self.finished += 1
        else:
            self.cancelled += 1
        self.log.log(
            opened.level, "job %s (%s, client %s) %s after %.2f s: %d done, %d failed, %d cancelled",
            job_id(key), opened.label, opened.client,
            "finished" if cancelled is None else f"cancelled ({cancelled})",
            now - job.opened_at, job.items_done - job.items_raised,
            job.items_raised + job.items_failed, job.items_total - job.items_done - job.items_failed,
        )

    def tag(self, key: JobKey) -> int:
        """The job's tag, made on first asking and forgotten with the job."""
        tag = self._tags.get(key)
        if tag is None:
            self._next_tag += 1
            tag = self._tags[key] = self._next_tag
            self._tagged[tag] = key
        return tag

    def tagged(self, tag: int) -> JobKey | None:
        """The job tagged `tag` (None: no job of ours has it now)."""
        return self._tagged.get(tag)

    def rows(self, jobs: Iterable[Job], now: float,
             client_label: Callable[[bytes], str]) -> list[dict[str, Any]]:
        """The book's `jobs` as `hivectl jobs` lists them."""
        rows = []
        for job in jobs:
            opened = self._opened.get(job.key)
            age = max(now - job.opened_at, 1e-9)
            rows.append(
                {
                    "id": job_id(job.key),
                    "owner": self.node_name,
                    "client": client_label(job.key[0]),
                    "function": opened.label if opened else "",
                    "queued": job.items_queued,
                    "running": len(job.running),
                    "done": job.items_done,
                    "failed": job.items_failed,
                    "total": job.items_total,
                    "rate": round(job.items_done / age, 1),
                    "age": round(age, 1),
                }
            )
        return rows
