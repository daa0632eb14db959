"""Fault injection: raise an exception from a signal handler in the main thread, at a chosen delay.

A kernel timer (``timer_create`` with ``SIGEV_THREAD_ID``, through ctypes) sends SIGUSR1 to the
main thread when the delay is up, and the handler raises the chosen exception, exactly as a
Ctrl+C (SIGINT) or a SIGALRM-based timeout would. SIGALRM itself is left to pytest-timeout.

Why a kernel timer and not a thread that sleeps and then calls ``pthread_kill``: that thread needs
the GIL to send the signal, and a main thread that releases the GIL for short system calls many
times per switch interval (the fast path's lock probes do) starves it -- CPython's waiter asks
for a forced switch only if the GIL changed hands no time during its 5 ms wait. On 3.10 a signal
armed for 0.3 ms then arrived after seconds, and a sweep ran past its timeout. A thread is kept
as the fallback where ``timer_create`` is missing (not Linux).

The operation under test runs in a loop until the exception arrives, so the delay decides *where*
in the operation it lands; sweeping the delay over a seeded random range spreads the landing
points over every instruction of the operation. The handler raises once per ``arm()``: a late
signal that arrives after the loop was left is ignored.

Importable from child processes (spawn and forkserver put the tests directory on sys.path).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
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

from helpers import collect_earlier_garbage

__all__ = ["INTERRUPTIONS", "Interrupted", "Interrupter", "check_pool", "spin"]


class Interrupted(BaseException):
    """What the test's signal handler raises (a BaseException, like KeyboardInterrupt)."""


INJECTED = "interrupted by the test"

#: How long an operation may loop after its exception was due before the sweep fails (seconds).
_LOST = 10.0

#: How soon an exception due inside a ``hold_off`` block is tried again (seconds).
_RETRY = 2e-5

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
        self.landed = ""  # where the last exception was raised (for a failure's message)
        # ``with interrupter.hold_off:`` -- a block the exception does not land in: one due
        # meanwhile lands just after it. For the test's own bookkeeping, which an exception
        # landing halfway would corrupt; never around the code under test. A lock (taken and
        # released by C code, an attribute, no call of ours): no instruction where a handler
        # could run lies between the block's edges and the lock's state.
        self.hold_off = threading.Lock()
        self.swallowed = 0  # injected exceptions lost in a finalizer, and injected again
        self.stdlib_sockets = 0  # sockets the stdlib's interrupted connect left to the collector
        self._timer = _KernelTimer.for_main_thread(signal.SIGUSR1)
        self._thread: threading.Thread | None = None
        if self._timer is None:
            self._thread = threading.Thread(target=self._run, name="interrupter", daemon=True)
            self._thread.start()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._armed is not None and self.hold_off.locked():
            self._start(_RETRY)  # the test's bookkeeping: land just after it
            return
        exc, self._armed = self._armed, None
        if exc is not None:
            self.fired += 1
            self.landed = _where(frame)
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
        """Raise ``exc`` in the main thread after ``delay`` seconds. It may be raised before
        this returns (a short delay): call it where the exception is handled."""
        self._armed = exc
        self._start(delay)

    def _start(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.start(delay)
        else:
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
        fired = self.fired
        try:
            self.arm(delay, exc)  # in the try: a short delay may fire before arm() returns
            deadline = time.monotonic() + delay + _LOST
            while True:
                operation()
                if time.monotonic() > deadline:  # (a hang made into a failure that says why)
                    raise AssertionError(
                        f"the injected {exc.__name__} was lost: raised at {self.landed} and "
                        "never propagated"
                        if self.fired > fired
                        else f"the injected {exc.__name__} never arrived (armed: {self._armed})"
                    )
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
        if self._timer is not None:
            self._timer.delete()
        if self._thread is not None:
            self._requests.put(None)
            self._thread.join(5)
        signal.signal(signal.SIGUSR1, self._previous)

    def __enter__(self) -> Interrupter:
        # Earlier tests' garbage (objects in reference cycles) is finalized now, not by a
        # collection in the middle of the sweep, where an injected exception would land in
        # its finalizer: a fault of that test's cleanup, blamed on this one.
        collect_earlier_garbage()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sigevent(ctypes.Structure):
    """Linux's ``struct sigevent`` (64 bytes): the value, the signal, how to notify, then a
    union whose first int is the thread id for ``SIGEV_THREAD_ID``."""

    _fields_ = [
        ("value", ctypes.c_void_p),
        ("signo", ctypes.c_int),
        ("notify", ctypes.c_int),
        ("tid", ctypes.c_int),
        ("_pad", ctypes.c_int * 11),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


_SIGEV_THREAD_ID = 4
_CLOCK_MONOTONIC = 1


class _KernelTimer:
    """A one-shot POSIX timer that sends ``signo`` to one thread: no Python code runs (and no
    GIL is needed) between ``start()`` and the signal."""

    def __init__(self, libc: Any, timer: ctypes.c_void_p) -> None:
        self._libc = libc
        self._timer = timer
        self._pid = os.getpid()

    @classmethod
    def for_main_thread(cls, signo: int) -> _KernelTimer | None:
        """A timer aimed at the main thread, or None where the platform has none."""
        name = ctypes.util.find_library("c")
        if not sys.platform.startswith("linux") or name is None:
            return None
        libc = ctypes.CDLL(name, use_errno=True)
        if not hasattr(libc, "timer_create"):
            libc = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
        event = _Sigevent(signo=signo, notify=_SIGEV_THREAD_ID, tid=threading.get_native_id())
        timer = ctypes.c_void_p()
        if libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
            return None
        return cls(libc, timer)

    def start(self, delay: float) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("an Interrupter's timer is not inherited by a forked child")
        whole = int(delay)
        nsec = max(1, int((delay - whole) * 1e9)) if whole == 0 else int((delay - whole) * 1e9)
        spec = _Itimerspec(value=_Timespec(whole, nsec))
        if self._libc.timer_settime(self._timer, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timer_settime failed")

    def delete(self) -> None:
        if os.getpid() == self._pid:
            self._libc.timer_delete(self._timer)


def _where(frame: FrameType | None, depth: int = 5) -> str:
    """The innermost ``depth`` frames as ``file:line function``, innermost first."""
    where = []
    while frame is not None and len(where) < depth:
        code = frame.f_code
        where.append(f"{os.path.basename(code.co_filename)}:{frame.f_lineno} {code.co_name}")
        frame = frame.f_back
    return " < ".join(where)


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
