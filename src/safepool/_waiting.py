"""Waiting that an exception raised anywhere cannot break: :class:`Beacon` and :class:`Flag`.

``threading.Condition`` and ``threading.Event`` are not safe against an exception raised by a
signal handler (``KeyboardInterrupt``, or any handler that raises) in the waiting thread:
``Condition.__enter__`` is Python code that takes the lock and then returns, and the handler
can run between the two, leaving the lock held by nobody's ``with``; the next ``with`` on it
deadlocks, and with an ``Event`` the thread that calls ``set()`` hangs too. (Python runs signal
handlers after a call into C returns, such as the lock's acquire.)

These two keep the same shape with the parts that can be interrupted made harmless:

* the state lock is a C lock taken only by ``with lock:`` (entering a ``with`` on a C lock runs
  no Python code between the acquire and the block, so its exit always runs);
* a waiter sleeps on a lock of its own, made locked, that the notifier releases (what
  ``Condition`` does inside); an interrupted or timed-out waiter at worst stays in the list
  until the next notification, which then releases a lock nobody waits on.
"""

from __future__ import annotations

import contextlib
import threading

__all__ = ["Beacon", "Flag"]


def _locked() -> threading.Lock:
    waiter = threading.Lock()
    waiter.acquire()
    return waiter


def _release_all(waiters: list[threading.Lock]) -> None:
    for waiter in waiters:
        with contextlib.suppress(RuntimeError):  # pragma: no cover - released once only
            waiter.release()


class Beacon:
    """A sequence number that threads wait to see change (a Condition over a counter)."""

    # _lock guards _seq and _waiters. Invariant: every lock in _waiters is held (locked at
    # creation, released once: by bump(), which takes it out of the list under _lock).
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self._waiters: list[threading.Lock] = []

    def sequence(self) -> int:
        """The current number (read it before looking, then wait for it to change)."""
        return self._seq  # one read of an int: atomic

    def bump(self) -> None:
        """Change the number and wake every thread waiting on the one before."""
        with self._lock:
            self._seq += 1
            waiters, self._waiters = self._waiters, []
        _release_all(waiters)

    def wait(self, seen: int, timeout: float | None) -> bool:
        """Until the number is no longer ``seen`` (True) or ``timeout`` seconds pass (False)."""
        waiter = _locked()
        with self._lock:
            if self._seq != seen:
                return True
            self._waiters.append(waiter)
        if waiter.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return True
        with self._lock:  # timed out: leave the list (a bump may have taken us out already)
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return self._seq != seen


class Flag:
    """A flag threads wait for: ``threading.Event``'s interface, safe to interrupt."""

    # _lock guards _set and _waiters (invariant as in Beacon; no waiter while _set).
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._waiters: list[threading.Lock] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        with self._lock:
            self._set = True
            waiters, self._waiters = self._waiters, []
        _release_all(waiters)

    def clear(self) -> None:
        with self._lock:
            self._set = False

    def wait(self, timeout: float | None = None) -> bool:
        """Until the flag is set (True) or ``timeout`` seconds pass (False)."""
        if self._set:
            return True
        return self._wait(timeout)

    def _wait(self, timeout: float | None) -> bool:
        waiter = _locked()
        with self._lock:
            if self._set:
                return True
            self._waiters.append(waiter)
        if waiter.acquire(True, -1 if timeout is None else max(0.0, timeout)):
            return True
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return self._set
