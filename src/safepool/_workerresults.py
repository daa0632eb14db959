"""What a :class:`safepool.WorkerPool` returns: results that fill in as workers report.

Each object here is a *sink* of :mod:`safepool._workercore`: the manager thread calls
``_deliver(start, values, errors)`` with the results of consecutive tasks of the job, and the
errors of the failed ones by their offset in ``values``. Each
has one lock guarding its own state; callbacks run outside it, in the manager thread, as
``multiprocessing.Pool`` runs them in its result thread (a callback that blocks delays every
other result). Callers wait on :mod:`safepool._waiting` objects, not on ``threading.Event`` or
``Condition``: a Ctrl+C in ``get()`` or ``next()`` must not leave a lock held that the manager
thread then needs (it would hang, and the pool with it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from ._waiting import Beacon, Flag
from .errors import PoolClosed

__all__ = ["ApplyResult", "FutureSink", "IMapIterator", "MapResult"]

R = TypeVar("R")

Callback = Callable[[Any], object] | None


class ApplyResult(Generic[R]):
    """The result of one ``apply_async`` call, like ``multiprocessing.pool.AsyncResult``."""

    def __init__(self, callback: Callback = None, error_callback: Callback = None) -> None:
        self._event = Flag()
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value: Any = None

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> R:
        """The result, or the task's error raised here; ``multiprocessing.TimeoutError`` if it
        is not there within ``timeout`` seconds."""
        if not self._event.wait(timeout):
            raise multiprocessing.TimeoutError
        if self._success:
            return self._value  # type: ignore[no-any-return]
        raise self._value

    def _claim(self, start: int, count: int) -> bool:
        return True

    def _deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        if errors:
            self._finish(False, errors[0])
        else:
            self._finish(True, values[0])

    def _finish(self, ok: bool, value: Any) -> None:
        self._success, self._value = ok, value
        try:
            if ok and self._callback is not None:
                self._callback(value)
            elif not ok and self._error_callback is not None:
                self._error_callback(value)
        finally:
            self._event.set()


class MapResult(ApplyResult[list[R]]):
    """The result of ``map_async``/``starmap_async``: the list, or the first error (in the order
    the failures happened), once every task has ended."""

    def __init__(
        self, length: int, callback: Callback = None, error_callback: Callback = None
    ) -> None:
        super().__init__(callback, error_callback)
        self._lock = threading.Lock()  # guards _values, _left, _error
        self._values: list[Any] = [None] * length
        self._left = length
        self._error: BaseException | None = None
        if length == 0:
            self._finish(True, [])

    def _deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        with self._lock:
            self._values[start : start + len(values)] = values
            if errors and self._error is None:
                self._error = errors[min(errors)]
            self._left -= len(values)
            done = self._left == 0
        if done:
            if self._error is None:
                self._finish(True, self._values)
            else:
                self._finish(False, self._error)


class IMapIterator(Generic[R]):
    """The iterator of ``imap`` (in order) and ``imap_unordered``: each result as it arrives; a
    task's error is raised when its turn comes, and iteration can go on after it."""

    def __init__(self, length: int, *, ordered: bool) -> None:
        self._lock = threading.Lock()  # guards the fields below
        self._arrivals = Beacon()  # bumped after results arrive
        self._ordered = ordered
        self._length = length
        self._next = 0  # index of the next item to yield
        self._ready: dict[int, tuple[bool, Any]] = {}  # ordered: arrived, not yet yielded
        self._arrived: collections.deque[tuple[bool, Any]] = collections.deque()  # unordered

    def __iter__(self) -> Iterator[R]:
        return self

    def next(self, timeout: float | None = None) -> R:
        """The next result; ``multiprocessing.TimeoutError`` if none within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            seen = self._arrivals.sequence()
            with self._lock:
                if self._next >= self._length:
                    raise StopIteration
                outcome = self._pop()
            if outcome is not None:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise multiprocessing.TimeoutError
            self._arrivals.wait(seen, left)
        ok, value = outcome
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    __next__ = next

    def _pop(self) -> tuple[bool, Any] | None:
        if self._ordered:
            outcome = self._ready.pop(self._next, None)
        else:
            outcome = self._arrived.popleft() if self._arrived else None
        if outcome is not None:
            self._next += 1
        return outcome

    def _claim(self, start: int, count: int) -> bool:
        return True

    def _deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        outcomes = [(True, value) for value in values]
        for offset, error in errors.items():
            outcomes[offset] = (False, error)
        with self._lock:
            if self._ordered:
                self._ready.update(enumerate(outcomes, start))
            else:
                self._arrived.extend(outcomes)
        self._arrivals.bump()


class FutureSink:
    """One ``concurrent.futures.Future`` of a ``WorkerExecutor.submit()``."""

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def _claim(self, start: int, count: int) -> bool:
        # False when it was cancelled while queued: then it does not run.
        return self.future.set_running_or_notify_cancel()

    def _deliver(self, start: int, values: list[Any], errors: dict[int, BaseException]) -> None:
        ok, value = (False, errors[0]) if errors else (True, values[0])
        if self.future.done():  # cancelled while queued, then the pool was terminated
            return
        if not ok and not self.future.running() and isinstance(value, PoolClosed):
            self.future.cancel()  # terminated before it started: cancelled, as shutdown says
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)
