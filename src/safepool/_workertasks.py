"""The tasks of a :class:`safepool.WorkerPool`, as its manager thread handles them.

A :class:`Job` is one call (``apply_async``, ``map``, ``submit``...): the function, how to call
it, its time limits and the *sink* that receives its results. The job's items travel in
:class:`Chunk` objects, each with a run of sequence numbers (unique in the pool, so a task can
be named in a worker's slot); a chunk cut short by a dead or retiring worker goes back to the
queue as :meth:`Chunk.rest`. Results reach the sink through :func:`deliver`, in the manager
thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["Chunk", "Job", "Sink", "deliver", "fail_chunks"]

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Receives a job's outcomes, from the manager thread."""

    def _deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        """Results of the job's tasks ``start ...``; ``errors`` by offset in ``values``."""

    def _claim(self, start: int, count: int) -> bool:
        """Called before the tasks are sent: False if they must not run (a cancelled future)."""


class Job:
    """What the tasks of one call share: the function, its kwargs, limits, name, sink."""

    __slots__ = ("fn", "hard", "kwargs", "name", "sink", "soft", "star")

    def __init__(
        self,
        sink: Sink,
        fn: Callable[..., Any],
        *,
        kwargs: dict[str, Any] | None,
        star: bool,
        limits: tuple[float | None, float | None],
        name: str,
    ) -> None:
        self.sink, self.fn, self.kwargs, self.star = sink, fn, kwargs, star
        self.soft, self.hard = limits
        self.name = name


class Chunk:
    """Items ``start ...`` of a job, with consecutive sequence numbers from ``seq0``."""

    __slots__ = ("claimed", "items", "job", "seq0", "start")

    def __init__(self, job: Job, start: int, items: list[Any], seq0: int) -> None:
        self.job, self.start, self.items, self.seq0 = job, start, items, seq0
        self.claimed = False  # the sink agreed to run it (once: a requeued chunk keeps it)

    def rest(self, done: int) -> Chunk:
        """The items after the first ``done``."""
        rest = Chunk(self.job, self.start + done, self.items[done:], self.seq0 + done)
        rest.claimed = self.claimed
        return rest

    def describe(self, offset: int) -> str:
        return f"{self.job.name} (task #{self.start + offset} of its job)"


def deliver(chunk: Chunk, offset: int, values: list[Any], errors: dict[int, BaseException]) -> None:
    try:
        chunk.job.sink._deliver(chunk.start + offset, values, errors)
    except Exception:  # a result callback raised: it must not stop the manager thread
        logger.exception("safepool: a result callback raised")


def fail_chunks(chunks: list[Chunk], error: BaseException) -> None:
    for chunk in chunks:
        count = len(chunk.items)
        deliver(chunk, 0, [None] * count, dict.fromkeys(range(count), error))
