"""Fault injection: raise an exception from a signal handler in the main thread, at a chosen delay.

A helper thread sleeps for the delay and then sends SIGUSR1 to the main thread with
``pthread_kill``, whose handler raises the chosen exception, exactly as a Ctrl+C (SIGINT) or a
SIGALRM-based timeout would. SIGALRM itself is left to pytest-timeout.

The operation under test runs in a loop until the exception arrives, so the delay decides *where*
in the operation it lands; sweeping the delay over a seeded random range spreads the landing
points over every instruction of the operation. The handler raises once per ``arm()``: a late
signal that arrives after the loop was left is ignored.

Importable from child processes (spawn and forkserver put the tests directory on sys.path).
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["INTERRUPTIONS", "Interrupted", "Interrupter", "check_pool", "spin"]


class Interrupted(BaseException):
    """What the test's signal handler raises (a BaseException, like KeyboardInterrupt)."""


INJECTED = "interrupted by the test"

#: The exceptions a sweep raises from the handler, chosen at random per point.
INTERRUPTIONS: tuple[type[BaseException], ...] = (Interrupted, KeyboardInterrupt, SystemExit)


class Interrupter:
    """Raises an exception in the main thread ``delay`` seconds after ``arm(delay, exc)``."""

    def __init__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers run in the main thread only")
        self._main = threading.main_thread().ident
        self._armed: type[BaseException] | None = None
        self._requests: queue.SimpleQueue[float | None] = queue.SimpleQueue()
        self._previous = signal.signal(signal.SIGUSR1, self._handler)
        self.fired = 0
        self.swallowed = 0  # injected exceptions lost in a finalizer, and injected again
        self.stdlib_sockets = 0  # sockets the stdlib's interrupted connect left to the collector
        self._thread = threading.Thread(target=self._run, name="interrupter", daemon=True)
        self._thread.start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        exc, self._armed = self._armed, None
        if exc is not None:
            self.fired += 1
            # No local holds the exception: that would make a reference cycle (exception ->
            # traceback -> this frame -> exception), which keeps the interrupted frames alive
            # until the cyclic collector runs.
            raise exc(INJECTED)

    def _run(self) -> None:
        while True:
            delay = self._requests.get()
            if delay is None:
                return
            time.sleep(delay)
            assert self._main is not None
            signal.pthread_kill(self._main, signal.SIGUSR1)

    def arm(self, delay: float, exc: type[BaseException] = Interrupted) -> None:
        self._armed = exc
        self._requests.put(delay)

    def disarm(self) -> None:
        """Cancel the exception of the last ``arm()`` if it has not been raised yet."""
        self._armed = None

    def run_until_interrupted(
        self, operation: Callable[[], object], delay: float, exc: type[BaseException]
    ) -> type[BaseException]:
        """Run ``operation`` in a loop until the exception arrives; return its type.

        (Not the exception: its traceback would keep the interrupted frames alive, as a real
        program does not once it has handled the exception.)"""
        previous = sys.unraisablehook
        sys.unraisablehook = functools.partial(self._swallowed, previous, delay)
        self.arm(delay, exc)
        try:
            while True:
                operation()
        except exc as caught:
            return type(caught)
        finally:
            sys.unraisablehook = previous

    def _swallowed(self, previous: Any, delay: float, unraisable: Any) -> None:
        """CPython ignores an exception raised in a finalizer (a weakref callback, __del__):
        an injected one that landed there is lost, so inject it again."""
        error = unraisable.exc_value
        if type(error) in INTERRUPTIONS and str(error) == INJECTED:
            self.swallowed += 1
            self.arm(delay, type(error))
        elif isinstance(error, ResourceWarning) and "unclosed <socket" in str(error):
            # The stdlib's own connect (multiprocessing.connection.SocketClient) builds its
            # socket in Python code: interrupted there, it leaves the half-made socket to the
            # garbage collector, which closes it (and warns). Not safepool's to prevent.
            self.stdlib_sockets += 1
        else:
            previous(unraisable)

    def close(self) -> None:
        self._armed = None
        self._requests.put(None)
        self._thread.join(5)
        signal.signal(signal.SIGUSR1, self._previous)

    def __enter__(self) -> Interrupter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spin(seconds: float) -> None:
    """Busy for ``seconds`` in Python code (loop back edges: a signal lands inside)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def check_pool(pool: Any, *, held: int = 0, timeout: float = 1.0) -> None:
    """The invariants after an interruption, once nothing else runs: counts add up, nothing is
    in transit or waiting, and the full capacity is usable again within ``timeout`` seconds
    (every item distinct: none is held twice). ``pool`` is a pool or a proxy.

    A server thread still serving an aborted connection may grant a lease it then takes back
    (it reads the abort after the request before it): such a transient lease must be gone
    within ``timeout`` too."""
    from helpers import wait_until

    deadline = time.monotonic() + timeout

    def settled() -> bool:
        stats = pool.stats()
        return (stats.leased, stats.waiting) == (held, 0)

    with contextlib.suppress(TimeoutError):  # the assertion below says what is left
        wait_until(settled, timeout)
    stats = pool.stats()
    assert stats.size == stats.idle + stats.leased + stats.pending, stats
    assert (stats.leased, stats.waiting) == (held, 0), stats
    items = []
    try:
        for _ in range(stats.max_size - held):
            items.append(pool.acquire(timeout=max(0.0, deadline - time.monotonic())))
        identities = {_identity(pool, item) for item in items}
        assert len(identities) == len(items), f"an item was handed out twice: {items}"
    finally:
        for item in items:
            pool.release(item)
    # A transient lease (above) may also be granted while the items come back: it is gone
    # within the same bound, a lost one never is.
    with contextlib.suppress(TimeoutError):
        wait_until(settled, max(0.05, deadline - time.monotonic()))
    stats = pool.stats()
    assert (stats.leased, stats.pending, stats.waiting) == (held, 0, 0), stats


def _identity(pool: Any, item: Any) -> object:
    """What makes an item itself: the object in the server for a hosted item, the value for a
    by-value one (the tests' items are distinct values), the object for an in-process pool."""
    from safepool import HostedItem, PoolProxy

    if isinstance(item, HostedItem):
        return ("hosted", item.call(id))
    if isinstance(pool, PoolProxy):
        return ("value", item)
    return ("object", id(item))


def pick(rng: random.Random) -> type[BaseException]:
    return rng.choice(INTERRUPTIONS)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
