"""Maintenance of a pool: idle and expired items to close, leaked leases to report.

:class:`PoolMaintenance` is a base of :class:`~safepool.SafeConnectionPool`, whose public
:meth:`~safepool.SafeConnectionPool.maintain` (run by safepool's housekeeper thread, or by the
user) uses these steps. It adds no state of its own: the ``_locked_*`` steps run under the pool's
lock and follow the rules of :mod:`safepool._poolstate` (an item taken for closing is recorded in
transit for its own :class:`~safepool._poolstate.Claim` in the same step). Leak reports name the
holder and, when ``leak_timeout`` is set, the stack where the lease was acquired.
"""

from __future__ import annotations

import math
import sys
import threading
import traceback

from ._poolstate import Claim, Entry, PoolState, T

__all__ = ["PoolMaintenance"]

_STACK_LIMIT = 32  # frames kept of the stack where a lease was acquired


class PoolMaintenance(PoolState[T]):
    """Finding what maintenance must close or report (see the module docstring)."""

    __slots__ = ()  # the attributes below have their slots in SafeConnectionPool or PoolItems

    # Configuration, set by SafeConnectionPool.__init__ (_lifetime and _max_idle may be settled
    # later by its first DB-API connection, under the lock).
    _min_size: int
    _max_idle: float | None
    _lifetime: float
    _leak_timeout: float | None

    def _locked_take_stale(self, stale: list[Claim], now: float) -> bool:
        """Under the lock: move one idle entry past max_idle (beyond min_size) or max_lifetime
        into transit for a new claim appended to ``stale``. False when there is none."""
        idle = self._idle
        position = None
        if (
            self._max_idle is not None
            and idle
            and len(self._entries) + self._pending - len(stale) > self._min_size
            and now - idle[0].last_used >= self._max_idle
        ):
            position = 0
        elif self._lifetime != math.inf:
            position = next((i for i, e in enumerate(idle) if now >= e.expires), None)
        if position is None:
            return False
        claim = Claim()
        entry = idle[position]
        key = id(entry.item)
        entry.owner = claim
        claim.entry = entry
        self._transit[key] = entry
        del self._entries[key]
        self._pending += 1
        del idle[position]
        stale.append(claim)
        return True

    def _locked_find_leaks(
        self, now: float
    ) -> list[tuple[str | None, float, traceback.StackSummary | None]]:
        leaks: list[tuple[str | None, float, traceback.StackSummary | None]] = []
        if self._leak_timeout is None:
            return leaks
        for entry in self._entries.values():
            leased_at = entry.leased_at
            if (
                leased_at is not None
                and not entry.leak_reported
                and now - leased_at >= self._leak_timeout
            ):
                entry.leak_reported = True
                self._leaks += 1
                leaks.append((entry.holder, now - leased_at, entry.stack))
        return leaks

    def _next_maintenance(self, now: float) -> float:
        """Under the lock: seconds until maintain() has something to do."""
        due = [math.inf]
        if self._max_idle is not None:
            if self._idle and len(self._entries) + self._pending > self._min_size:
                due.append(self._idle[0].last_used + self._max_idle - now)
            else:
                due.append(self._max_idle)
        if self._leak_timeout is not None:
            leased = [
                e.leased_at
                for e in self._entries.values()
                if e.leased_at is not None and not e.leak_reported
            ]
            due.append((min(leased) - now if leased else 0.0) + self._leak_timeout)
        if self._lifetime != math.inf and self._idle:
            due.append(min(e.expires for e in self._idle) - now)
        return max(0.0, min(due))

    def _capture_stack(self, depth: int) -> traceback.StackSummary:
        frame = sys._getframe(depth)
        stack = traceback.StackSummary.extract(
            traceback.walk_stack(frame), limit=_STACK_LIMIT, lookup_lines=False
        )
        stack.reverse()
        return stack

    def _mark_holder(self, entry: Entry[T], stack: traceback.StackSummary | None) -> None:
        """Under the lock: remember who holds a lease, for leak reports."""
        if stack is None:
            return
        entry.stack = stack
        entry.holder = f"thread {threading.current_thread().name!r}"
        entry.leak_reported = False

    def _set_holder(self, item: T, holder: str) -> None:
        """Name the holder of a leased item in leak reports (the manager uses this)."""
        with self._lock:
            entry = self._entries.get(id(item))
            if entry is not None and entry.item is item:
                entry.holder = holder
                entry.stack = None
