"""Worker pools that never hang: :class:`WorkerPool` (the ``multiprocessing.Pool`` interface) and
:class:`WorkerExecutor` (the ``concurrent.futures.Executor`` interface).

Made by :meth:`safepool.WorkerSetup.Pool` and :meth:`safepool.WorkerSetup.executor`, whose
initializer gives every worker its resources and makes it signal-safe. Both run on the same
core (:mod:`safepool._workercore`):

* **Per-task blame.** A worker that dies while running a task (any signal, ``os._exit``, a
  crash) fails that task, and only that task, with :class:`~safepool.WorkerLost` (naming the
  pid, the exit code or signal, and the task); tasks of its chunk that had not started run on
  another worker; the worker is replaced. ``map()`` raises the error instead of waiting forever.
* **terminate() always terminates**: SIGTERM (the task's ``finally`` blocks run), then SIGKILL
  for any worker still there after ``terminate_grace`` seconds (in a finalizer, in a C call,
  with SIGTERM ignored).
* **Time limits**, per call and as a default: ``soft_time_limit`` raises
  :class:`~safepool.SoftTimeLimitExceeded` inside the task; ``time_limit`` kills the worker
  (SIGKILL), replaces it, and fails the task with :class:`~safepool.HardTimeLimitExceeded`.
* **Recycling**: ``max_tasks_per_child`` and ``max_memory_per_child`` (resident set, in bytes,
  checked between tasks) replace a worker without losing a queued task.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import itertools
import multiprocessing
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.context import BaseContext
from typing import Any, TypeVar

from . import _fork
from ._config import check_callable, check_count, check_duration
from ._workercore import WorkerCore
from ._workerresults import ApplyResult, FutureSink, IMapIterator, MapResult
from ._workertasks import Job

__all__ = ["DEFAULT_TERMINATE_GRACE", "WorkerExecutor", "WorkerPool"]

R = TypeVar("R")
DEFAULT_TERMINATE_GRACE = 1.0  # seconds between SIGTERM and SIGKILL in terminate()


class _Default(enum.Enum):
    DEFAULT = "the pool's default"


DEFAULT = _Default.DEFAULT
Limit = float | None | _Default
_names = itertools.count(1)


def _check_limit(name: str, value: object) -> None:
    if value is not None and value is not DEFAULT:
        check_duration(name, value, allow_zero=False, allow_inf=False)


def _limits(
    soft: Limit, hard: Limit, defaults: tuple[float | None, float | None]
) -> tuple[float | None, float | None]:
    _check_limit("soft_time_limit", soft)
    _check_limit("time_limit", hard)
    pair = (defaults[0] if soft is DEFAULT else soft, defaults[1] if hard is DEFAULT else hard)
    if pair[0] is not None and pair[1] is not None and pair[0] >= pair[1]:
        raise ValueError(
            f"soft_time_limit ({pair[0]}s) must be less than time_limit ({pair[1]}s): the soft "
            "limit lets the task clean up before the hard limit kills its worker"
        )
    return pair


def _name_of(fn: object) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else str(name)


class _Base:
    """Configuration and life cycle shared by the pool and the executor."""

    _core: WorkerCore

    def __init__(
        self,
        processes: int | None,
        *,
        context: BaseContext,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None,
        max_memory_per_child: int | None,
        soft_time_limit: float | None,
        time_limit: float | None,
        terminate_grace: float,
        name: str | None,
    ) -> None:
        if processes is not None:
            check_count("processes", processes, minimum=1)
        if initializer is not None:
            check_callable("initializer", initializer)
        if max_tasks_per_child is not None:
            check_count("max_tasks_per_child", max_tasks_per_child, minimum=1)
        if max_memory_per_child is not None:
            check_count("max_memory_per_child", max_memory_per_child, minimum=1)
        check_duration("terminate_grace", terminate_grace, allow_zero=True, allow_inf=False)
        if name is not None and (not isinstance(name, str) or not name):
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        self._defaults = _limits(soft_time_limit, time_limit, (None, None))
        core = WorkerCore(
            context,
            processes or context.cpu_count(),
            initializer=initializer,
            initargs=tuple(initargs),
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
            terminate_grace=terminate_grace,
            name=name or f"workers-{next(_names)}",
        )
        try:
            _fork.register(core)
            # Dropped without close()/terminate(): end the workers (also at interpreter exit).
            self._finalizer = weakref.finalize(self, core.terminate)
        except BaseException:  # cut short (a signal handler raising): no pool, no workers
            core.terminate()
            raise
        self._core = core

    @property
    def name(self) -> str:
        return self._core.name

    @property
    def pids(self) -> list[int]:
        """The pids of the current workers (they change as workers are replaced)."""
        return self._core.pids()

    @property
    def exits(self) -> list[tuple[int, int | None]]:
        """``(pid, exit code)`` of the last 100 workers that ended (a negative code is the
        signal that ended it, as ``multiprocessing`` reports it)."""
        return list(self._core.exits)

    @property
    def replaced(self) -> int:
        """How many workers died and were replaced (retirements are not counted)."""
        return self._core.replaced

    def terminate(self) -> None:
        """End every worker now: SIGTERM, then SIGKILL after ``terminate_grace`` seconds. Tasks
        not finished fail with :class:`~safepool.PoolClosed`. Returns when the workers are gone."""
        self._core.terminate()

    def _submit(
        self,
        sink: Any,
        fn: Callable[..., Any],
        items: list[Any],
        how: tuple[bool, dict[str, Any] | None, int],
        limits: tuple[Limit, Limit],
    ) -> None:
        """Queue ``fn(item)`` (or ``fn(*item, **kwargs)``: ``how = (star, kwargs, chunksize)``)
        for each item."""
        check_callable("func", fn)
        star, kwargs, chunksize = how
        job = Job(sink, fn, kwargs=kwargs, star=star, limits=_limits(*limits, self._defaults),
                  name=_name_of(fn))  # fmt: skip
        self._core.submit(job, items, max(1, chunksize))

    def _chunksize(self, length: int, chunksize: int | None) -> int:
        if chunksize is not None:
            check_count("chunksize", chunksize, minimum=1)
            return chunksize
        size, extra = divmod(length, self._core.size * 4)
        return size + (1 if extra else 0)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self._core.state} pids={self.pids}>"


class WorkerPool(_Base):
    """A process pool with the ``multiprocessing.Pool`` interface that never hangs on a dead
    worker (see the module docstring). Make it with :meth:`safepool.WorkerSetup.Pool`.

    Arguments are collected at the call (``imap`` does not read its iterable lazily). Leaving a
    ``with`` block calls :meth:`terminate`, as for ``multiprocessing.Pool``.
    """

    def apply(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> R:
        """Run ``func(*args, **kwds)`` in a worker and return its result."""
        return self.apply_async(
            func, args, kwds, soft_time_limit=soft_time_limit, time_limit=time_limit
        ).get()

    def apply_async(
        self,
        func: Callable[..., R],
        args: Iterable[Any] = (),
        kwds: dict[str, Any] | None = None,
        callback: Callable[[R], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> ApplyResult[R]:
        result: ApplyResult[R] = ApplyResult(callback, error_callback)
        how = (True, dict(kwds) if kwds else None, 1)
        self._submit(result, func, [tuple(args)], how, (soft_time_limit, time_limit))
        return result

    def map(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> list[R]:
        """``[func(x) for x in iterable]``, in workers; raises the first task error once every
        task has ended (a :class:`~safepool.WorkerLost` for a task whose worker died)."""
        return self.map_async(
            func, iterable, chunksize, soft_time_limit=soft_time_limit, time_limit=time_limit
        ).get()

    def map_async(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> MapResult[R]:
        callbacks = (callback, error_callback)
        items = (False, list(iterable))
        return self._map(func, items, chunksize, callbacks, (soft_time_limit, time_limit))

    def starmap(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> list[R]:
        """``[func(*args) for args in iterable]``, in workers."""
        return self.starmap_async(
            func, iterable, chunksize, soft_time_limit=soft_time_limit, time_limit=time_limit
        ).get()

    def starmap_async(
        self,
        func: Callable[..., R],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list[R]], object] | None = None,
        error_callback: Callable[[BaseException], object] | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> MapResult[R]:
        callbacks = (callback, error_callback)
        items = (True, [tuple(args) for args in iterable])
        return self._map(func, items, chunksize, callbacks, (soft_time_limit, time_limit))

    def _map(
        self,
        func: Callable[..., Any],
        items: tuple[bool, list[Any]],
        chunksize: int | None,
        callbacks: tuple[Any, Any],
        limits: tuple[Limit, Limit],
    ) -> MapResult[Any]:
        star, values = items
        size = self._chunksize(len(values), chunksize)
        result: MapResult[Any] = MapResult(len(values), *callbacks)
        if values:
            self._submit(result, func, values, (star, None, size), limits)
        return result

    def imap(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> IMapIterator[R]:
        """Results in order, each as soon as it and those before it are there; a failed task
        raises its error at its turn, and the iteration can go on."""
        return self._imap(func, iterable, chunksize, True, (soft_time_limit, time_limit))

    def imap_unordered(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int = 1,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> IMapIterator[R]:
        """Results in the order they arrive."""
        return self._imap(func, iterable, chunksize, False, (soft_time_limit, time_limit))

    def _imap(
        self,
        func: Callable[[Any], R],
        iterable: Iterable[Any],
        chunksize: int,
        ordered: bool,
        limits: tuple[Limit, Limit],
    ) -> IMapIterator[R]:
        check_count("chunksize", chunksize, minimum=1)
        items = list(iterable)
        result: IMapIterator[R] = IMapIterator(len(items), ordered=ordered)
        if items:
            self._submit(result, func, items, (False, None, chunksize), limits)
        return result

    def close(self) -> None:
        """Take no more tasks; the queued ones still run, then the workers exit."""
        self._core.close()

    def join(self, timeout: float | None = None) -> None:
        """Wait until every worker has exited (after :meth:`close` or :meth:`terminate`)."""
        self._core.join(timeout)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


class WorkerExecutor(_Base, concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` on the same core as :class:`WorkerPool`: a dead worker
    fails only its task's future (with :class:`~safepool.WorkerLost`), never the whole
    executor. Make it with :meth:`safepool.WorkerSetup.executor`."""

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        return self.submit_limited(fn, args, kwargs)

    def submit_limited(
        self,
        fn: Callable[..., R],
        args: Iterable[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> concurrent.futures.Future[R]:
        """``submit()`` with time limits for this call (``None``: no limit)."""
        sink = FutureSink()
        how = (True, dict(kwargs) if kwargs else None, 1)
        self._submit(sink, fn, [tuple(args)], how, (soft_time_limit, time_limit))
        return sink.future

    def map(
        self,
        fn: Callable[..., R],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        soft_time_limit: Limit = DEFAULT,
        time_limit: Limit = DEFAULT,
    ) -> Iterator[R]:
        """Like ``Executor.map``: results in order; a failed task raises at its turn."""
        check_count("chunksize", chunksize, minimum=1)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables, strict=False))
        result: IMapIterator[R] = IMapIterator(len(items), ordered=True)
        if items:
            self._submit(result, fn, items, (True, None, chunksize), (soft_time_limit, time_limit))
        return _results(result, len(items), deadline)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more tasks. ``cancel_futures=True`` cancels the queued ones and terminates
        (SIGTERM, then SIGKILL after ``terminate_grace``) those running, whose futures fail
        with :class:`~safepool.PoolClosed`; otherwise they all run first. ``wait=True``
        returns when the workers have exited."""
        if cancel_futures:
            self._core.terminate()
            return
        self._core.close()
        if wait:
            self._core.join()


def _results(result: IMapIterator[R], length: int, deadline: float | None) -> Iterator[R]:
    for _ in range(length):
        if deadline is None:
            yield result.next()
            continue
        try:
            yield result.next(max(0.0, deadline - time.monotonic()))
        except multiprocessing.TimeoutError:
            raise concurrent.futures.TimeoutError from None
