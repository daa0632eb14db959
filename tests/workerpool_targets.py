"""Task functions for the worker pool tests (importable by spawn and forkserver workers)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

from helpers import LONG
from safepool import worker_resource

_leak: list[bytes] = []  # memory a task keeps in its worker (for max_memory_per_child)


def recorded(i: int, seconds: float, payload: int) -> tuple[int, bytes]:
    """Record who runs task ``i`` (runs, ran_on) and when it is done (done), in shared arrays."""
    worker_resource("runs")[i] += 1
    worker_resource("ran_on")[i] = os.getpid()
    time.sleep(seconds)
    worker_resource("done")[i] = 1
    return i * i, b"x" * payload


def at_barrier(_: object = None) -> int:
    """Wait for the other workers at the barrier: only N live workers can pass it."""
    worker_resource("barrier").wait(LONG)
    return os.getpid()


def getpid(_: object = None) -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def sleep_for(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def report_and_sleep(seconds: float) -> str:
    """Report the pid on ``ready`` (if ``seconds`` > 0), sleep; record how the sleep ended on
    ``cleaned``."""
    how = "returned"
    try:
        if seconds > 0:
            worker_resource("ready").put(os.getpid())
        time.sleep(seconds)
    except BaseException as exc:
        how = type(exc).__name__
        raise
    finally:
        worker_resource("cleaned").put((os.getpid(), how))
    return how


def report_and_sleep_long(seconds: float) -> None:
    """Report the pid on ``ready``, sleep, then report on ``cleaned``."""
    worker_resource("ready").put(os.getpid())
    time.sleep(seconds)
    worker_resource("cleaned").put((os.getpid(), "returned"))


def swallow_soft_limit(seconds: float) -> str:
    """Catch the soft-limit exception and keep running: the hard limit must end it."""
    worker_resource("ready").put(os.getpid())
    try:
        time.sleep(seconds)
    except Exception as exc:
        worker_resource("cleaned").put((os.getpid(), type(exc).__name__))
        time.sleep(seconds)
    return "survived"


def lease_and_sleep(pool: Any, seconds: float, use_with: bool) -> str:
    """Hold a lease of a PoolManager pool (a process-bound lease) while sleeping."""
    if use_with:
        with pool.lease():
            worker_resource("ready").put(os.getpid())
            time.sleep(seconds)
    else:
        pool.acquire(timeout=LONG)
        worker_resource("ready").put(os.getpid())
        time.sleep(seconds)
    return "finished"


class SlowFinalizer:
    """A task argument whose ``__del__`` (run in the worker when the task's arguments are
    dropped) reports, then sleeps: a SIGTERM landing then is raised inside the finalizer."""

    def __del__(self) -> None:
        try:
            worker_resource("ready").put(os.getpid())
        except Exception:  # in the parent (no resources): nothing to report
            return
        time.sleep(LONG)


def take(_: object) -> str:
    return "taken"


def ignore_sigterm_and_sleep(seconds: float) -> str:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker_resource("ready").put(os.getpid())
    time.sleep(seconds)
    return "slept"


def c_sleep(seconds: int) -> str:
    """Sleep inside a C call (libc sleep through ctypes, which releases the GIL)."""
    how = "returned"
    try:
        worker_resource("ready").put(os.getpid())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ctypes.CDLL(None).sleep(seconds)
    except BaseException as exc:
        how = type(exc).__name__
        raise
    finally:
        worker_resource("cleaned").put((os.getpid(), how))
    return how


def sigterm_blocked_sleep(seconds: float) -> str:
    """SIGTERM blocked in the thread that would run its handler, as C code can do."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    worker_resource("ready").put(os.getpid())
    time.sleep(seconds)
    return "slept"


def leak(megabytes: int) -> int:
    """Keep ``megabytes`` MiB in this worker; return its pid."""
    _leak.append(b"x" * (megabytes << 20))  # written, so resident
    return os.getpid()


def rss(_: object = None) -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exit_now(code: int) -> None:
    os._exit(code)


def raise_system_exit(_: object = None) -> None:
    raise SystemExit(5)


def unpicklable_result(_: object = None) -> Any:
    return lambda: None


def install_system_exit_sigterm_handler() -> None:
    """A correct SIGTERM handler (raises SystemExit), without safepool's finalizer fix."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)


def failing_initializer() -> None:
    raise RuntimeError("no database")
