"""SafeConnectionPool: a bounded, thread-safe pool of reusable items.

The pool core knows nothing about processes: it imports no multiprocessing. Fork safety comes from
:mod:`safepool._fork`; sharing across processes from :mod:`safepool.manager`, which hosts this
very class in a manager server.

Design, in brief:

* One lock per pool guards all state (see :class:`SafeConnectionPool` for the invariants). Every
  state transition happens under it; every call into user code (factory, check, reset, close) and
  every wait happens outside it.
* Waiters queue in strict arrival order. Each has its own lock, which the pool releases to wake
  exactly that waiter after handing it an item, or a reserved slot to fill with a new item. A
  waiter that times out re-checks under the pool lock, so an item handed to it at the last moment
  is used, never lost.
* An item "in transit" (being checked, reset or closed) is out of ``_entries`` and counted in
  ``_pending`` and kept in ``_transit``, so capacity is never lost and never exceeded.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from typing_extensions import Self

from . import _fork, _housekeeper
from ._config import check_callable, check_count, check_duration, check_name, redact
from .errors import FactoryError, LeaseError, PoolClosed, PoolTimeout, TooManyWaiting
from .stats import LeaseInfo, PoolStats

__all__ = ["SafeConnectionPool"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
_STACK_LIMIT = 32
_pool_numbers = itertools.count(1)


_SPINS = 100


def _acquire_contended(lock: threading.Lock) -> None:
    """Take a pool lock that another thread holds, without sleeping on it at first.

    Critical sections are a few bytecodes long, so a held lock means its holder was pre-empted
    by the GIL inside one. Blocking here would hand the lock to a sleeping thread, and from then
    on every hand-off would cost a context switch (a lock convoy: 10-40x slower, for as long as
    threads keep arriving). Yielding the GIL instead lets the holder finish; only if that fails
    ``_SPINS`` times do we block.
    """
    for _ in range(_SPINS):
        time.sleep(0)
        if lock.acquire(False):
            return
    lock.acquire()


def check_pool_options(
    *,
    factory: Any,
    max_size: Any = 10,
    min_size: Any = 0,
    timeout: Any = DEFAULT_TIMEOUT,
    max_waiting: Any = 0,
    check: Any = None,
    reset: Any = None,
    close: Any = None,
    max_lifetime: Any = None,
    max_idle: Any = None,
    leak_timeout: Any = None,
    name: Any = None,
    background: Any = True,
    clock: Any = time.monotonic,
) -> None:
    """Validate :class:`SafeConnectionPool` options without making a pool (or any item).

    Raises ``TypeError``/``ValueError`` naming the argument and the value. The manager calls this
    in the client, before options travel to a server, so errors arrive early and with their type.
    """
    check_callable("factory", factory)
    check_count("max_size", max_size, minimum=1)
    check_count("min_size", min_size, minimum=0)
    if min_size > max_size:
        raise ValueError(
            f"min_size ({min_size}) must not exceed max_size ({max_size}); "
            "raise max_size or lower min_size"
        )
    check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
    check_count("max_waiting", max_waiting, minimum=0)
    for arg_name, hook in (("check", check), ("reset", reset), ("close", close)):
        if hook is not None:
            check_callable(arg_name, hook)
    for arg_name, value in (
        ("max_lifetime", max_lifetime),
        ("max_idle", max_idle),
        ("leak_timeout", leak_timeout),
    ):
        if value is not None:
            check_duration(arg_name, value, allow_zero=False, allow_inf=True)
    if name is not None:
        check_name(name)
    if not isinstance(background, bool):
        raise TypeError(f"background must be a bool, got {type(background).__name__}")
    check_callable("clock", clock)


def close_item(item: object) -> None:
    """The default way to close an item: call its ``close()`` method if it has one."""
    close = getattr(item, "close", None)
    if close is not None:
        close()


class _Entry(Generic[T]):
    """One item the pool owns, with its bookkeeping."""

    __slots__ = ("created", "expires", "holder", "item", "keep_until", "last_used", "leak_reported",
                 "leased_at", "reuse_until", "stack")  # fmt: skip

    def __init__(self, item: T, now: float, lifetime: float, *, check: bool, reset: bool) -> None:
        self.item = item
        self.created = now
        self.expires = now + lifetime  # inf when max_lifetime is None
        # The fast paths make one comparison each: acquire hands an idle item out directly only
        # while now < reuse_until (-inf when it must be checked first, or leases are tracked),
        # and release puts it back directly only while now < keep_until (-inf when it must be
        # reset, or the pool is closed).
        self.reuse_until = -math.inf if check else self.expires
        self.keep_until = -math.inf if reset else self.expires
        self.last_used = now
        self.leased_at: float | None = None  # None while idle or in transit
        self.holder: str | None = None
        self.stack: traceback.StackSummary | None = None
        self.leak_reported = False


class _Waiter:
    """A caller blocked in acquire(). The pool releases ``wakeup`` after filling one result slot."""

    __slots__ = ("enqueued_at", "entry", "error", "slot", "wakeup")

    def __init__(self, now: float) -> None:
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.enqueued_at = now
        self.entry: _Entry[Any] | None = None  # an item: leased to us (or in transit, to check)
        self.slot = False  # a reserved slot: make a new item in it
        self.error: BaseException | None = None  # e.g. PoolClosed

    @property
    def served(self) -> bool:
        return self.entry is not None or self.slot or self.error is not None


class SafeConnectionPool(Generic[T]):
    """A bounded pool of items (connections, clients, tokens) shared safely by many threads.

    Every argument is keyword-only and validated here, so a bad configuration fails at
    construction with a message naming the argument, not at first use.

    :param factory: called with no arguments to make one item.
    :param max_size: most items that may exist at once (idle + leased + being made).
    :param min_size: items made at construction; idle shrinking never goes below it.
    :param timeout: default seconds :meth:`acquire` waits for an item (``math.inf``: forever).
        It bounds the wait for capacity, not the factory's own run time.
    :param max_waiting: most callers that may wait at once; beyond it :class:`TooManyWaiting` is
        raised at once. 0 means unlimited.
    :param check: run on an existing item before it is handed out again (never on a brand-new
        one). If it raises or returns ``False`` the item is closed and silently replaced.
    :param reset: run on an item when it is released. If it raises or returns ``False`` the item
        is closed instead of reused.
    :param close: how to close an item; default: call its ``close()`` method if it has one.
    :param max_lifetime: seconds after which an item is replaced rather than handed out.
    :param max_idle: seconds after which idle items beyond ``min_size`` are closed.
    :param leak_timeout: seconds after which a lease still held is reported (a warning with the
        stack where it was acquired) and counted in ``stats().leaks``.
    :param name: used in log messages, errors and stats.
    :param background: run maintenance (``max_idle``, ``leak_timeout``) in safepool's shared
        daemon thread. Pass ``False`` to start no thread (e.g. in a pre-fork server) and call
        :meth:`maintain` yourself.
    :param clock: monotonic clock for item ages and lease times (injectable for tests); waiting
        always uses real time.
    """

    # Slots, not a __dict__: attribute access on the lease path stays specialised (a dict of more
    # than 30 keys loses CPython's shared-keys fast path).
    __slots__ = (
        "__weakref__", "_background", "_check", "_clock", "_close_item", "_closed",
        "_closed_count", "_created", "_entries", "_factory", "_idle", "_inherited",
        "_leak_timeout", "_leaks", "_lease_time", "_lifetime", "_lock", "_lost", "_max_idle",
        "_max_size", "_max_waiting", "_min_size", "_pending", "_reclaimed", "_requests",
        "_reset", "_timeout", "_timeouts", "_transit", "_wait_time", "_waiters", "_waits",
        "name",
    )  # fmt: skip

    # _lock guards every attribute below it. While _lock is free:
    #   len(_entries) + _pending <= max_size                     (capacity is never exceeded)
    #   _idle holds entries of _entries whose leased_at is None  (the rest of _entries is leased)
    #   _pending == len(_transit) + slots reserved for the factory
    #   _waiters is non-empty only while _idle is empty and the pool is at max_size
    _lock: threading.Lock
    _entries: dict[int, _Entry[T]]  # id(item) -> entry, for every idle or leased item
    _idle: deque[_Entry[T]]  # LIFO at the right; the left end has been idle longest
    _transit: dict[int, _Entry[T]]  # items being checked, reset or closed outside the lock
    _pending: int
    _waiters: deque[_Waiter]
    _closed: bool
    # Items leased in the parent before a fork: releasing them in the child is a no-op.
    _inherited: dict[int, T]

    def __init__(
        self,
        *,
        factory: Callable[[], T],
        max_size: int = 10,
        min_size: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        max_waiting: int = 0,
        check: Callable[[T], object] | None = None,
        reset: Callable[[T], object] | None = None,
        close: Callable[[T], object] | None = None,
        max_lifetime: float | None = None,
        max_idle: float | None = None,
        leak_timeout: float | None = None,
        name: str | None = None,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_pool_options(
            factory=factory,
            max_size=max_size,
            min_size=min_size,
            timeout=timeout,
            max_waiting=max_waiting,
            check=check,
            reset=reset,
            close=close,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            leak_timeout=leak_timeout,
            name=name,
            background=background,
            clock=clock,
        )
        self.name = name if name is not None else f"pool-{next(_pool_numbers)}"

        self._factory = factory
        self._max_size = max_size
        self._min_size = min_size
        self._timeout = float(timeout)
        self._max_waiting = max_waiting
        self._check = check
        self._reset = reset
        self._close_item: Callable[[T], object] = close if close is not None else close_item
        self._lifetime = math.inf if max_lifetime is None else float(max_lifetime)
        self._max_idle = max_idle
        self._leak_timeout = leak_timeout
        self._clock = clock

        self._init_state(closed=False)
        _fork.register(self)
        self._background = background and (max_idle is not None or leak_timeout is not None)
        if self._background:
            _housekeeper.register(self)
        self._prefill()

    def _init_state(self, *, closed: bool) -> None:
        """Give the pool fresh, empty state (at construction, and in a forked child)."""
        self._lock = threading.Lock()
        self._entries = {}
        self._idle = deque()
        self._transit = {}
        self._pending = 0
        self._waiters = deque()
        self._closed = closed
        self._inherited = {}
        # Counters (see PoolStats).
        self._created = self._closed_count = self._requests = self._waits = 0
        self._timeouts = self._lost = self._leaks = self._reclaimed = 0
        self._wait_time = self._lease_time = 0.0

    def _prefill(self) -> None:
        items: list[T] = []
        try:
            for _ in range(self._min_size):
                items.append(self.acquire(timeout=0))
        except BaseException:
            for item in items:
                self.release(item)
            self.close()
            raise
        for item in items:
            self.release(item)

    # -- leasing --------------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> T:
        """Lease an item, waiting up to ``timeout`` seconds (default: the pool's ``timeout``).

        Raises :class:`PoolTimeout` if none became available in time, :class:`TooManyWaiting` if
        ``max_waiting`` callers already wait, :class:`PoolClosed` if the pool is closed, and
        :class:`FactoryError` (chained to the cause) if making a new item failed.
        """
        if timeout is not None:
            check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
        # The two hot paths call lock.acquire()/release() in try/finally rather than `with`: the
        # same guarantees, ~30% less time per lease (see benchmarks/pool_inprocess.py).
        lock = self._lock
        if lock.locked():
            _acquire_contended(lock)
        else:
            lock.acquire()
        try:
            # Fast path: the newest idle item, unless it has expired or must be checked first (or
            # leases are tracked for leaks): then reuse_until is in the past. A closed pool has no
            # idle items.
            idle = self._idle
            if idle:
                entry = idle.pop()
                now = self._clock()
                if now < entry.reuse_until:
                    self._requests += 1
                    entry.leased_at = now
                    return entry.item
                idle.append(entry)  # untouched: the slow path decides
        finally:
            lock.release()
        return self._acquire_slow(timeout)

    def _acquire_slow(self, timeout: float | None) -> T:
        stack = self._capture_stack() if self._leak_timeout is not None else None
        entry: _Entry[T] | None
        waiter: _Waiter | None
        with self._lock:
            if self._closed:
                raise PoolClosed(f"pool {self.name!r} is closed")
            self._requests += 1
            if self._idle:
                entry = self._idle.pop()
                now = self._clock()
                if self._check is None and now < entry.expires:
                    entry.leased_at = now
                    self._mark_holder(entry, stack)
                    return entry.item
                self._to_transit(entry)
                waiter = None
            elif len(self._entries) + self._pending < self._max_size:
                self._pending += 1  # a reserved slot: we make the item outside the lock
                entry = waiter = None
            else:
                waiter = self._enqueue(timeout)
                entry = None
        if waiter is not None:
            entry = self._wait(waiter, timeout)
            if entry is not None and entry.leased_at is not None:
                if stack is not None:
                    with self._lock:
                        self._mark_holder(entry, stack)
                return entry.item
        # We own an in-transit entry to vet, or an empty slot to fill.
        if entry is not None:
            entry = self._vet(entry)
        if entry is None:
            entry = self._make()
        with self._lock:
            leased = self._lease_vetted(entry, stack)
        if not leased:  # the pool was closed meanwhile
            self._run_hook(self._close_item, entry.item, "close")
            raise PoolClosed(f"pool {self.name!r} was closed")
        return entry.item

    def release(self, item: T, *, discard: bool = False) -> None:
        """Give a leased item back. With ``discard=True`` the item is closed instead of reused.

        Raises :class:`LeaseError`, changing nothing, if the item is not currently leased from
        this pool (never leased, leased from another pool, or already released).
        """
        lock = self._lock
        if lock.locked():
            _acquire_contended(lock)
        else:
            lock.acquire()
        try:
            # Keyed by id(): both objects are alive, so an id match means the very same object.
            try:
                entry: _Entry[T] | None = self._entries[id(item)]
            except KeyError:
                entry = None  # raise outside the handler: no spurious KeyError context
            if entry is None or entry.leased_at is None:
                self._release_unknown(item, entry)
                return
            now = self._clock()
            self._lease_time += now - entry.leased_at
            entry.leased_at = None
            if discard or now >= entry.keep_until:
                self._to_transit(entry)  # reset or close it outside the lock, below
            else:
                entry.last_used = now
                if self._waiters:
                    self._hand_off(entry, now)
                else:
                    self._idle.append(entry)
                return
        finally:
            lock.release()
        self._return_slow(entry, discard=discard)

    def lease(self, timeout: float | None = None) -> Lease[T]:
        """``with pool.lease() as item:`` -- the item is released however the block exits."""
        return Lease(self, timeout)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pool: waiters get :class:`PoolClosed` now, idle items are closed now,
        leased items are closed when they are released. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for entry in self._entries.values():
                entry.keep_until = -math.inf  # leased items are closed when they come back
            idle = list(self._idle)
            self._idle.clear()
            for entry in idle:
                self._to_transit(entry)
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:
                waiter.error = PoolClosed(f"pool {self.name!r} was closed while waiting")
                waiter.wakeup.release()
        logger.debug("pool %r: closing, %d idle items", self.name, len(idle))
        for entry in idle:
            self._discard(entry)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def stats(self) -> PoolStats:
        """A consistent snapshot of sizes and counters."""
        with self._lock:
            idle = len(self._idle)
            return PoolStats(
                name=self.name,
                size=len(self._entries) + self._pending,
                idle=idle,
                leased=len(self._entries) - idle,
                pending=self._pending,
                waiting=len(self._waiters),
                max_size=self._max_size,
                min_size=self._min_size,
                created=self._created,
                closed=self._closed_count,
                requests=self._requests,
                waits=self._waits,
                timeouts=self._timeouts,
                lost=self._lost,
                leaks=self._leaks,
                reclaimed=self._reclaimed,
                wait_time=self._wait_time,
                lease_time=self._lease_time,
            )

    def leases(self) -> list[LeaseInfo]:
        """Who holds each current lease, and since when (oldest first).

        The holder is the acquiring thread when ``leak_timeout`` is set (which records it), and
        "unknown" otherwise.
        """
        now, wall = self._clock(), time.time()
        with self._lock:
            held = [
                (e.leased_at, e.holder) for e in self._entries.values() if e.leased_at is not None
            ]
        held.sort(key=lambda h: h[0])
        return [
            LeaseInfo(holder=holder or "unknown", since=wall - (now - at), held_for=now - at)
            for at, holder in held
        ]

    def _count_reclaimed(self) -> None:
        """Count a lease returned on behalf of a holder that died (the manager calls this)."""
        with self._lock:
            self._reclaimed += 1

    def maintain(self) -> float:
        """Close idle items past ``max_idle`` or ``max_lifetime`` and report leaks, now.

        A background thread does this on its own when ``max_idle`` or ``leak_timeout`` is set;
        call it yourself to run maintenance at a moment of your choosing. Returns the seconds
        until maintenance is next due (``inf`` if never).
        """
        now = self._clock()
        leaks: list[tuple[str | None, float, traceback.StackSummary | None]] = []
        with self._lock:
            if self._closed:
                return math.inf
            expired = self._pop_stale_idle(now)
            if self._leak_timeout is not None:
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
            delay = self._next_maintenance(now)
        for entry in expired:
            self._discard(entry)
        for holder, held, stack in leaks:
            logger.warning(
                "pool %r: a lease has been held for %.3fs (leak_timeout=%ss) by %s; "
                "acquired at:\n%s",
                self.name,
                held,
                self._leak_timeout,
                holder or "an unknown holder",
                "".join(stack.format()) if stack is not None else "  (stack not recorded)\n",
            )
        return delay

    def __repr__(self) -> str:
        # Never the factory or its arguments: they may hold credentials.
        state = "closed" if self._closed else "open"
        size = len(self._entries) + self._pending
        return (
            f"<{type(self).__name__} {self.name!r} {state} size={size}/{self._max_size} "
            f"idle={len(self._idle)} waiting={len(self._waiters)}>"
        )

    # -- internals: every method named _locked_* or documented "under the lock" needs _lock ------

    def _to_transit(self, entry: _Entry[T]) -> None:
        """Under the lock: move an entry out of _entries while I/O runs on it outside the lock."""
        key = id(entry.item)
        self._transit[key] = entry  # first, so a fork at any point still sees it referenced
        del self._entries[key]
        self._pending += 1

    def _enqueue(self, timeout: float | None) -> _Waiter:
        """Under the lock: join the queue of waiters, or refuse at once."""
        if self._max_waiting and len(self._waiters) >= self._max_waiting:
            raise TooManyWaiting(
                f"pool {self.name!r}: {len(self._waiters)} callers are already waiting "
                f"(max_waiting={self._max_waiting})"
            )
        if timeout is None:
            timeout = self._timeout
        if timeout == 0:
            self._timeouts += 1
            raise self._timeout_error(timeout)
        waiter = _Waiter(self._clock())
        self._waiters.append(waiter)
        self._waits += 1
        return waiter

    def _timeout_error(self, timeout: float) -> PoolTimeout:
        return PoolTimeout(
            f"pool {self.name!r}: no item available within {timeout:g}s "
            f"(max_size={self._max_size}, all leased)"
        )

    def _wait(self, waiter: _Waiter, timeout: float | None) -> _Entry[T] | None:
        """Block until the pool serves ``waiter`` or ``timeout`` passes (outside the lock).

        Returns a leased entry, an in-transit entry to vet, or None for a reserved slot.
        """
        budget = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining > 0 and waiter.wakeup.acquire(
                    True, min(remaining, threading.TIMEOUT_MAX)
                ):
                    break
                with self._lock:
                    if waiter.served:
                        break
                    if time.monotonic() >= deadline:
                        self._waiters.remove(waiter)
                        self._timeouts += 1
                        self._wait_time += self._clock() - waiter.enqueued_at
                        raise self._timeout_error(budget)
        except BaseException as exc:
            if not isinstance(exc, PoolTimeout):
                self._abandon_wait(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.entry

    def _abandon_wait(self, waiter: _Waiter) -> None:
        """An interrupted waiter (e.g. KeyboardInterrupt) leaves the queue; what it was handed
        goes back to the pool, so nothing is lost."""
        with self._lock:
            if not waiter.served:
                self._waiters.remove(waiter)
                return
        if waiter.entry is not None and waiter.entry.leased_at is not None:
            self.release(waiter.entry.item)
        elif waiter.entry is not None:
            self._return_slow(waiter.entry, discard=False)
        elif waiter.slot:
            self._free_slot()

    def _hand_off(self, entry: _Entry[T], now: float) -> None:
        """Under the lock: give a returned entry to the oldest waiter."""
        waiter = self._waiters.popleft()
        self._wait_time += now - waiter.enqueued_at
        entry.leak_reported = False
        if self._check is None and now < entry.expires:
            entry.leased_at = now
        else:
            self._to_transit(entry)  # the waiter vets it outside the lock
        waiter.entry = entry
        waiter.wakeup.release()

    def _free_slot(self) -> None:
        """A reserved slot is no longer needed: give it to the oldest waiter, or drop it."""
        with self._lock:
            self._locked_free_slot()

    def _locked_free_slot(self) -> None:
        """Under the lock: release a reserved slot, handing it to the oldest waiter if any."""
        if self._waiters:  # never while closed: close() wakes and drops every waiter
            waiter = self._waiters.popleft()
            self._wait_time += self._clock() - waiter.enqueued_at
            waiter.slot = True  # the slot stays reserved (pending), now the waiter's
            waiter.wakeup.release()
        else:
            self._pending -= 1

    def _vet(self, entry: _Entry[T]) -> _Entry[T] | None:
        """Outside the lock: decide whether an in-transit entry may be handed out.

        Returns the entry if it may; otherwise closes it and returns None, keeping its slot
        reserved for a replacement.
        """
        now = self._clock()
        reason = None
        if now >= entry.expires:
            reason = "max_lifetime reached"
        elif self._check is not None and not self._run_hook(self._check, entry.item, "check"):
            reason = "check failed"
        if reason is None:
            return entry
        logger.debug("pool %r: replacing an item (%s)", self.name, reason)
        self._run_hook(self._close_item, entry.item, "close")
        with self._lock:
            del self._transit[id(entry.item)]
            self._closed_count += 1
            if reason == "check failed":
                self._lost += 1
        return None

    def _make(self) -> _Entry[T]:
        """Outside the lock, owning a reserved slot: make a new item with the factory."""
        try:
            item = self._factory()
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, Exception):
                # The cause's text too (the __cause__ is lost when the error crosses to another
                # process), with anything that looks like a credential redacted.
                raise FactoryError(
                    f"pool {self.name!r}: the factory raised {type(exc).__name__}: "
                    f"{redact(str(exc))}"
                ) from exc
            raise
        now = self._clock()
        entry = _Entry(
            item,
            now,
            self._lifetime,
            check=self._check is not None or self._leak_timeout is not None,
            reset=self._reset is not None,
        )
        with self._lock:
            key = id(item)
            if key in self._entries or key in self._transit:
                self._locked_free_slot()
                raise FactoryError(
                    f"pool {self.name!r}: the factory returned an object that is already in the "
                    "pool; it must return a new object on every call"
                )
            self._transit[key] = entry
            self._created += 1
        if self._background:
            _housekeeper.ensure_running()
        return entry

    def _lease_vetted(self, entry: _Entry[T], stack: traceback.StackSummary | None) -> bool:
        """Under the lock: an in-transit entry that passed vetting becomes leased.

        Returns False if the pool was closed meanwhile: the caller must close the item.
        """
        key = id(entry.item)
        if self._closed:
            del self._transit[key]
            self._pending -= 1
            self._closed_count += 1
            return False
        self._entries[key] = entry
        del self._transit[key]
        self._pending -= 1
        entry.leased_at = self._clock()
        entry.leak_reported = False
        self._mark_holder(entry, stack)
        return True

    def _return_slow(self, entry: _Entry[T], *, discard: bool) -> None:
        """Outside the lock: finish returning an in-transit entry (reset, or close)."""
        reset = self._reset
        if not discard and not self._closed and reset is not None:
            discard = not self._run_hook(reset, entry.item, "reset")
            if discard:
                with self._lock:
                    self._lost += 1
        with self._lock:
            if not (discard or self._closed or self._clock() >= entry.expires):
                key = id(entry.item)
                self._entries[key] = entry
                del self._transit[key]
                self._pending -= 1
                entry.last_used = self._clock()
                if self._waiters:
                    self._hand_off(entry, entry.last_used)
                else:
                    self._idle.append(entry)
                return
        self._discard(entry)

    def _discard(self, entry: _Entry[T]) -> None:
        """Outside the lock: close an in-transit entry, then free its slot.

        Closing comes first so that a waiter given the slot never makes its item while the old
        one is still open: the pool never holds more than ``max_size`` live items.
        """
        self._run_hook(self._close_item, entry.item, "close")
        with self._lock:
            del self._transit[id(entry.item)]
            self._closed_count += 1
            self._locked_free_slot()

    def _release_unknown(self, item: object, entry: _Entry[T] | None) -> None:
        """Under the lock: ``item`` is not leased from this pool. Raise, changing nothing."""
        if self._inherited.pop(id(item), None) is item:
            # Leased by the parent before a fork: abandoned here, never reused nor closed.
            logger.debug("pool %r: ignoring release of an item inherited across fork", self.name)
            return
        if entry is not None and entry.item is item:
            raise LeaseError(f"pool {self.name!r}: this {type(item).__name__} was already released")
        if id(item) in self._transit:
            raise LeaseError(
                f"pool {self.name!r}: this {type(item).__name__} is being returned already"
            )
        raise LeaseError(
            f"pool {self.name!r}: this {type(item).__name__} was not leased from this pool"
        )

    def _run_hook(self, hook: Callable[[Any], object], item: object, what: str) -> bool:
        """Outside the lock: run check/reset/close; log failures; True if it succeeded."""
        try:
            ok = hook(item) is not False
        except Exception as exc:
            logger.warning(
                "pool %r: %s of a %s failed: %s: %s",
                self.name,
                what,
                type(item).__name__,
                type(exc).__name__,
                exc,
            )
            return False
        if not ok:
            logger.warning(
                "pool %r: %s of a %s returned False", self.name, what, type(item).__name__
            )
        return ok

    def _pop_stale_idle(self, now: float) -> list[_Entry[T]]:
        """Under the lock: move idle entries past max_idle (beyond min_size) or max_lifetime
        into transit, and return them for closing."""
        stale: list[_Entry[T]] = []
        if self._max_idle is not None:
            idle = self._idle
            while (
                idle
                and len(self._entries) + self._pending - len(stale) > self._min_size
                and now - idle[0].last_used >= self._max_idle
            ):
                stale.append(idle.popleft())
        if self._lifetime != math.inf and any(now >= e.expires for e in self._idle):
            stale.extend(e for e in self._idle if now >= e.expires)
            self._idle = deque(e for e in self._idle if now < e.expires)
        for entry in stale:
            self._to_transit(entry)
        return stale

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

    def _capture_stack(self) -> traceback.StackSummary:
        frame = sys._getframe(3)  # _capture_stack < _acquire_slow < acquire < caller
        stack = traceback.StackSummary.extract(
            traceback.walk_stack(frame), limit=_STACK_LIMIT, lookup_lines=False
        )
        stack.reverse()
        return stack

    def _mark_holder(self, entry: _Entry[T], stack: traceback.StackSummary | None) -> None:
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

    def _after_fork_in_child(self) -> None:
        """In a forked child: start over with an empty pool. Never touch the old lock."""
        inherited = {key: e.item for key, e in self._entries.items() if e.leased_at is not None}
        _fork.abandon((self._entries, self._idle, self._transit, self._waiters))
        self._init_state(closed=self._closed)
        self._inherited = inherited


class Leaser(Protocol[T]):
    """Anything that leases items: a pool, or a proxy to one in another process."""

    def acquire(self, timeout: float | None = None) -> T: ...

    def release(self, item: T, *, discard: bool = False) -> None: ...


class Lease(Generic[T]):
    """The context manager ``lease()`` returns: acquires on entry, always releases on exit."""

    __slots__ = ("_item", "_pool", "_timeout")

    def __init__(self, pool: Leaser[T], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout

    def __enter__(self) -> T:
        self._item = self._pool.acquire(self._timeout)
        return self._item

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        item = self._item
        del self._item
        self._pool.release(item)
