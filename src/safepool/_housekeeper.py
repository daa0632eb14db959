"""One daemon thread that runs :meth:`SafeConnectionPool.maintain` for every pool that needs it.

Pools with ``max_idle`` or ``leak_timeout`` register here. The thread sleeps until the earliest
pool is due (each ``maintain()`` returns its next due time), so it costs nothing on the lease
path and wakes only when there is work. It holds pools weakly: a pool nobody uses any more is not
kept alive by it. In a forked child the thread does not exist; it is started again the next time
a pool there makes an item.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any, Protocol

from . import _fork
from ._signals import start_daemon
from ._waiting import Beacon

__all__ = ["ensure_running", "register"]

logger = logging.getLogger(__name__)

# Bounds on one sleep: a pool with a fake clock or a long timeout is still polled now and then.
_MIN_SLEEP = 0.005
_MAX_SLEEP = 30.0


class Maintainable(Protocol):
    name: str

    def maintain(self) -> float: ...


class _Housekeeper:
    # _lock guards _pools and _thread; _wake is bumped when a pool is added (interrupt-safe:
    # register() runs in the user's thread, where a Ctrl+C may land anywhere).
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = Beacon()
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def register(self, pool: Maintainable) -> None:
        with self._lock:
            self._pools.add(pool)
        self._wake.bump()
        self.ensure_running()

    def ensure_running(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            thread = self._thread
            if (thread is None or not thread.is_alive()) and self._pools:
                # Kept only once started: a start cut short (a signal handler raising; no
                # thread to be had) leaves none, and the next pool operation starts one.
                self._thread = None
                self._thread = start_daemon(self._run, name="safepool-housekeeper")

    def _run(self) -> None:
        while True:
            seen = self._wake.sequence()
            with self._lock:
                pools = list(self._pools)
                if not pools:
                    self._thread = None
                    return
            delay = _MAX_SLEEP
            for pool in pools:
                try:
                    delay = min(delay, pool.maintain())
                except Exception:
                    logger.exception("pool %r: maintenance failed", pool.name)
            del pools, pool
            self._wake.wait(seen, max(_MIN_SLEEP, delay))

    def _after_fork_in_child(self) -> None:
        # The thread did not survive the fork; its lock may have been held by it.
        self._lock = threading.Lock()
        self._wake = Beacon()
        self._thread = None


_housekeeper = _Housekeeper()
_fork.register(_housekeeper)
register = _housekeeper.register
ensure_running = _housekeeper.ensure_running
