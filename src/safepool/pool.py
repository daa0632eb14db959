"""SafeConnectionPool: a bounded, thread-safe pool of reusable items.

The pool core knows nothing about processes: it imports no multiprocessing. Fork safety comes from
:mod:`safepool._fork`; sharing across processes from :mod:`safepool.manager`, which hosts this
very class in a manager server.

Design, in brief:

* One lock per pool guards all state; the state and its named transitions live in
  :mod:`safepool._poolstate`, with the invariants. Every call into user code (factory, check,
  reset, close) and every wait happens outside the lock.
* Waiters queue in strict arrival order. Each has its own lock, which the pool releases to wake
  exactly that waiter after handing it an item, or a reserved slot to fill with a new item. A
  waiter that times out re-checks under the pool lock, so an item handed to it at the last moment
  is used, never lost.
* Interruptions: a ``BaseException`` at any point (a hook or the factory raising
  ``KeyboardInterrupt``, a signal handler raising during a wait or inside the bookkeeping) leaves
  the counts consistent and the capacity intact, then propagates. Each call records what it holds
  in a :class:`~safepool._poolstate.Claim`, in the same step as the state changes, and gives
  it back (:meth:`~safepool._poolitems.PoolItems._settle`) when it is cut short.
  ``with pool.lease()`` is safe to the instruction; a plain ``acquire()`` cannot protect the
  caller's own frame.

This module holds the public methods and the fast paths of ``acquire``/``release`` (inlined: no
extra call on them). The steps a call takes outside the lock (waiting its turn, making, vetting,
resetting and closing items, giving back what a call cut short holds) live in
:mod:`safepool._poolitems`, and maintenance's (idle and expired items, leak reports) in
:mod:`safepool._poolmaintain`: both are bases of :class:`SafeConnectionPool`.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal, Protocol

from typing_extensions import Self

from . import _fork, _housekeeper
from ._config import AUTO, DEFAULT_TIMEOUT, check_duration, check_pool_options
from ._lease import Lease
from ._poolitems import PoolItems
from ._poolmaintain import PoolMaintenance
from ._poolstate import Claim, Entry, PoolLock, T
from .budget import Budget
from .dbapi import _SQLITE_PROBE, _close_inherited_sockets
from .errors import LeaseError, PoolClosed, TooManyWaiting
from .stats import LeaseInfo, PoolStats

__all__ = ["PoolObserver", "SafeConnectionPool", "WaitHook", "check_pool_options", "close_item"]

logger = logging.getLogger(__name__)

_SPINS = 100
_pool_numbers = itertools.count(1)
# What release() finds for an item that has no entry: never leased (leased_at is None).
_NOT_LEASED: Entry[Any] = Entry(None, 0.0, math.inf, check=False, reset=False)


def _yield_while_locked(lock: PoolLock) -> None:
    """Wait for a pool lock that another thread holds, without sleeping on it at first.

    Critical sections are a few bytecodes long, so a held lock means its holder was pre-empted
    by the GIL inside one. Sleeping on it costs a wake-up and a context switch, and where the
    lock is handed to a sleeping thread (a ``threading.Lock``; 3.13's ``SimpleQueue``, which
    the pool lock is, see ``_poolstate.pool_lock``) every later hand-off costs one too (a lock
    convoy: 10-40x slower, for as long as threads keep arriving). Yielding the GIL instead
    lets the holder finish. The caller then takes the lock with ``with`` (which an
    interruption cannot leave held).
    """
    for _ in range(_SPINS):
        time.sleep(0)
        if not lock.locked():
            return


def close_item(item: object) -> None:
    """The default way to close an item: call its ``close()`` method if it has one."""
    close = getattr(item, "close", None)
    if close is not None:
        close()


class PoolObserver(Protocol):
    """Told of each item made, each item obtained and each lease ended, with durations in
    seconds (for metrics: see safepool.metrics). Called outside the pool's lock, on the calling
    thread; it must be quick and must not raise. Set with ``pool._observer = observer``."""

    def created(self, pool: str, seconds: float) -> None: ...  # the factory's run time

    def waited(self, pool: str, seconds: float) -> None: ...  # acquire's time to obtain an item

    def used(self, pool: str, seconds: float) -> None: ...  # how long an item was leased


class WaitHook(Protocol):
    """Told when an acquire() starts and stops waiting, with a way to cancel the wait (the
    manager server uses this to cancel a wait whose client went away)."""

    def waiting(self, cancel: Callable[[BaseException], None]) -> None: ...

    def done_waiting(self) -> None: ...


class SafeConnectionPool(PoolItems[T], PoolMaintenance[T]):
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
        :func:`safepool.dbapi.check_connection` is a ready-made one for database connections.
    :param reset: run on an item when it is released. If it raises or returns ``False`` the item
        is closed instead of reused. The default, ``"auto"``, resets DB-API connections only
        (sqlite3, psycopg, anything with ``cursor``/``commit``/``rollback``): one released
        inside a transaction is rolled back, with a warning naming the pool, so it never
        reaches the next holder inside it (:func:`safepool.dbapi.rollback_if_in_transaction`);
        if the rollback fails, the connection is closed and replaced. Other items are handed on
        as they are, at no cost. ``reset=None`` turns it off.
    :param configure: run once on each new item, before its first use (e.g. set PRAGMAs or a
        ``search_path``). If it raises, the item is closed, no slot is lost, and the acquire
        raises :class:`FactoryError`.
    :param close: how to close an item; default: call its ``close()`` method if it has one.
    :param max_lifetime: seconds after which an item is replaced rather than handed out
        (``None``: never). The default, ``"auto"``, is 3600 s (as psycopg_pool's) for
        connections to a database server (any DB-API connection but sqlite3's): servers,
        proxies and firewalls drop or reconfigure long-lived connections, and a server's
        per-connection memory grows. Never for other items (tokens, sqlite3 connections: an
        in-memory database lives only as long as its connection). Settled by the first
        DB-API connection the pool makes.
    :param max_idle: seconds after which idle items beyond ``min_size`` are closed (``None``:
        never). The default, ``"auto"``, is 600 s (as psycopg_pool's) for connections to a
        database server, so that an idle pool gives its connections back; never otherwise.
    :param leak_timeout: seconds after which a lease still held is reported (a warning with the
        stack where it was acquired) and counted in ``stats().leaks``.
    :param name: used in log messages, errors and stats.
    :param background: run maintenance (``max_idle``, ``leak_timeout``) in safepool's shared
        daemon thread. Pass ``False`` to start no thread (e.g. in a pre-fork server) and call
        :meth:`maintain` yourself.
    :param clock: monotonic clock for item ages and lease times (injectable for tests); waiting
        always uses real time.
    :param budget: a budget shared with other pools, processes or hosts (a
        :class:`~safepool.HostBudget`, ``PostgresBudget``, ``RedisBudget``, or any object with
        ``acquire(timeout)`` and ``release(permit)``): every item that exists holds one permit.
        The factory runs only with a permit in hand, waiting for one counts against the acquire
        timeout, closing an item gives its permit back, and an item whose permit is lost (its
        engine took it back) is closed as soon as it is idle or returned.
    """

    # Slots, not a __dict__: attribute access on the lease path stays specialised.
    # (The state settled by the first DB-API connection has its slots in PoolItems.)
    __slots__ = (
        "__weakref__", "_budget", "_clock", "_close_item", "_configure", "_factory",
        "_housekeeping", "_leak_timeout", "_min_size", "_observer", "_timeout",
    )  # fmt: skip

    def __init__(
        self,
        *,
        factory: Callable[[], T],
        max_size: int = 10,
        min_size: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        max_waiting: int = 0,
        check: Callable[[T], object] | None = None,
        reset: Callable[[T], object] | Literal["auto"] | None = AUTO,
        configure: Callable[[T], object] | None = None,
        close: Callable[[T], object] | None = None,
        max_lifetime: float | Literal["auto"] | None = AUTO,
        max_idle: float | Literal["auto"] | None = AUTO,
        leak_timeout: float | None = None,
        name: str | None = None,
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
        budget: Budget | None = None,
    ) -> None:
        check_pool_options(
            factory=factory, max_size=max_size, min_size=min_size, timeout=timeout,
            max_waiting=max_waiting, check=check, reset=reset, configure=configure, close=close,
            max_lifetime=max_lifetime, max_idle=max_idle, leak_timeout=leak_timeout, name=name,
            background=background, clock=clock, budget=budget,
        )  # fmt: skip
        self.name = name if name is not None else f"pool-{next(_pool_numbers)}"
        self._factory = factory
        self._max_size = max_size
        self._min_size = min_size
        self._timeout = float(timeout)
        self._max_waiting = max_waiting
        self._check = check
        self._init_db_defaults(reset, max_lifetime, max_idle)
        self._configure = configure
        self._close_item = close if close is not None else close_item
        self._leak_timeout = leak_timeout
        self._clock = clock
        self._budget = budget
        self._observer = None
        self._init_state(closed=False)
        _fork.register(self)
        self._housekeeping = background
        self._background = background and (self._max_idle is not None or leak_timeout is not None)
        if self._background:
            _housekeeper.register(self)
        self._prefill()

    def _prefill(self) -> None:
        """Make ``min_size`` idle items (not counted as requests or leases)."""
        for _ in range(self._min_size):
            claim = Claim()
            try:
                with self._lock:
                    self._locked_reserve(claim)
                entry = self._make(claim, time.monotonic() + self._timeout)
                now = self._clock()
                with self._lock:
                    self._locked_restore(claim, entry, id(entry.item), now)
            except BaseException:
                self._settle(claim)
                self.close()
                raise

    # -- leasing --------------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> T:
        """Lease an item, waiting up to ``timeout`` seconds (default: the pool's ``timeout``).

        Raises :class:`PoolTimeout` if none became available in time, :class:`TooManyWaiting` if
        ``max_waiting`` callers already wait, :class:`PoolClosed` if the pool is closed, and
        :class:`FactoryError` (chained to the cause) if making a new item failed.
        """
        if timeout is not None:
            check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
        if self._lock.locked():
            _yield_while_locked(self._lock)
        clock = self._clock  # (a local: calling a slot attribute as a method costs more)
        entry = None
        try:
            with self._lock:
                # Fast path: the newest idle item, unless it has expired or must be checked
                # first (or leases are tracked): then reuse_until is in the past. The transition
                # (_locked_lease_idle) is inlined here, so that `entry` records the lease in the
                # same step: nothing can interrupt a run of stores, and the one call, pop()
                # (cheaper than `del idle[-1]`, which rotates the deque), comes last.
                idle = self._idle
                if idle:
                    candidate = idle[-1]
                    now = clock()
                    if now < candidate.reuse_until:
                        entry = candidate
                        candidate.leased_at = now
                        self._requests += 1
                        idle.pop()
            if entry is not None:
                observer = self._observer
                if observer is not None:
                    observer.waited(self.name, 0.0)
                return entry.item
        except BaseException:
            if entry is not None:  # leased, then interrupted before it reached the caller
                self.release(entry.item)
            raise
        claim = Claim()
        try:
            return self._acquire_slow(timeout, claim, None, 3)
        except BaseException:
            self._settle(claim)
            raise

    def _acquire_slow(
        self, timeout: float | None, claim: Claim, hook: WaitHook | None, depth: int
    ) -> T:
        """Lease an item into ``claim``: reuse, wait, vet or make. The caller settles ``claim``
        if this raises. ``depth``: frames up to the caller, for leak reports."""
        stack = self._capture_stack(depth + 1) if self._leak_timeout is not None else None
        budget_time = self._timeout if timeout is None else timeout
        deadline = time.monotonic() + budget_time
        if self._orphans:
            self._settle_orphans()
        with self._lock:
            self._locked_claim(claim, timeout)
        if claim.queued:
            self._wait(claim, deadline, budget_time, hook)
        entry = claim.entry
        if entry is not None and entry.leased_at is None:
            entry = self._vet(claim, entry)
        if entry is None:
            entry = self._make(claim, deadline)
        if entry.leased_at is None:
            now = self._clock()
            with self._lock:
                if self._closed:
                    raise PoolClosed(f"pool {self.name!r} was closed")  # settle closes it
                self._locked_lease_vetted(claim, id(entry.item), now)
        if stack is not None:
            with self._lock:
                self._mark_holder(entry, stack)
        observer = self._observer
        if observer is not None:
            observer.waited(self.name, time.monotonic() - deadline + budget_time)
        return entry.item

    def _locked_claim(self, claim: Claim, timeout: float | None) -> None:
        """Under the lock: give ``claim`` an idle item (leased, or in transit to vet), a
        reserved slot, or a place in the queue; or raise, changing nothing but the counters."""
        if self._closed:
            raise PoolClosed(f"pool {self.name!r} is closed")
        now = self._clock()
        self._requests += 1
        if self._idle:
            entry = self._idle[-1]
            if self._check is None and now < entry.expires:
                self._locked_lease_idle(claim, entry, now)
            else:
                self._locked_vet_idle(claim, entry, id(entry.item))
        elif len(self._entries) + self._pending < self._max_size:
            self._locked_reserve(claim)
        else:
            if self._max_waiting and len(self._waiters) >= self._max_waiting:
                raise TooManyWaiting(
                    f"pool {self.name!r}: {len(self._waiters)} callers are already waiting "
                    f"(max_waiting={self._max_waiting})"
                )
            budget = self._timeout if timeout is None else timeout
            if budget == 0:
                error = self._timeout_error(budget)
                self._timeouts += 1
                raise error
            wakeup = threading.Lock()
            wakeup.acquire()
            self._locked_enqueue(claim, wakeup, now)

    def release(self, item: T, *, discard: bool = False) -> None:
        """Give a leased item back. With ``discard=True`` the item is closed instead of reused.

        Raises :class:`LeaseError`, changing nothing, if the item is not currently leased from
        this pool (never leased, leased from another pool, or already released).
        """
        # DB-API connections: may it be inside a transaction? Then it is reset (rolled back)
        # before it is reused. sqlite3's probe (the default backend) is tested first and read
        # as a plain attribute (half the cost of calling the getter).
        probe = self._probe
        if probe is _SQLITE_PROBE:
            try:
                slow = item.in_transaction or discard  # type: ignore[attr-defined]
            except Exception:  # e.g. closed by its holder: the reset fails, and it is closed
                slow = True
        elif probe is None:
            slow = discard
        else:
            try:
                slow = True if probe(item) else discard
            except Exception:
                slow = True
        if self._lock.locked():
            _yield_while_locked(self._lock)
        clock = self._clock
        key = id(item)
        claim = None
        try:
            with self._lock:
                try:
                    entry = self._entries[key]  # (a subscript costs less than get())
                except KeyError:
                    entry = _NOT_LEASED  # (refused below, not in this handler: to chain nothing)
                # One test refuses both: an item not held here as leased (unknown, or in transit:
                # the stand-in) and an idle one. (No identity test is needed: an entry keeps its
                # item alive, so the live object whose id is the entry's key is that item.)
                if entry.leased_at is None:
                    self._release_unknown(item, None if entry is _NOT_LEASED else entry)
                    return
                now = clock()
                used = now - entry.leased_at
                if slow or now >= entry.keep_until or self._closed:
                    claim = Claim()
                    self._locked_to_transit(claim, entry, key, now)
                elif self._waiters:
                    self._locked_hand_off(None, entry, key, now)
                else:
                    # _locked_return, inlined on the hot path (stores, then one append)
                    self._lease_time += used
                    entry.leased_at = None
                    entry.owner = None
                    entry.last_used = now
                    self._idle.append(entry)
            observer = self._observer
            if observer is not None:
                observer.used(self.name, used)
            if claim is not None:
                self._finish_return(claim, discard=discard)
        except BaseException:
            if claim is not None:
                self._settle(claim)
            raise

    def lease(self, timeout: float | None = None) -> Lease[T]:
        """``with pool.lease() as item:`` -- the item is released however the block exits."""
        return Lease(self, timeout)

    # -- the Leaser protocol (see safepool._lease) ----------------------------------------------

    def _new_claim(self) -> Claim:
        return Claim()

    def _acquire_into(self, claim: Claim, timeout: float | None, hook: WaitHook | None = None) -> T:
        if timeout is not None:
            check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
        clock = self._clock
        with self._lock:
            idle = self._idle
            if idle:
                candidate = idle[-1]
                now = clock()
                if now < candidate.reuse_until:
                    self._requests += 1
                    self._locked_lease_idle(claim, candidate, now)
        if claim.entry is None:
            return self._acquire_slow(timeout, claim, hook, 4)
        observer = self._observer
        if observer is not None:
            observer.waited(self.name, 0.0)
        return claim.entry.item  # type: ignore[no-any-return]

    def _release_claim(self, claim: Claim) -> None:
        entry = claim.entry
        if entry is None or entry.owner is not claim or entry.leased_at is None:
            raise LeaseError(f"pool {self.name!r}: this lease was already released")
        self.release(entry.item)  # its transitions take the entry from the claim

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pool: waiters get :class:`PoolClosed` now, idle items are closed now,
        leased items are closed when they are released. Closing twice is harmless; after an
        interruption, closing again finishes the work."""
        owned: list[Claim] = []
        error = PoolClosed(f"pool {self.name!r} was closed while waiting")
        try:
            with self._lock:
                while True:  # not `while cond:` (CPython issue 108214, see _poolstate)
                    if not self._locked_close_next(owned, error):
                        break
            if owned:
                logger.debug("pool %r: closing, %d idle items", self.name, len(owned))
            for claim in owned:
                self._discard(claim, claim.entry)  # type: ignore[arg-type]
        except BaseException:
            # Cut short: finish the bookkeeping, and drop what was not closed yet.
            with self._lock:
                while True:
                    if not self._locked_close_next(owned, error):
                        break
            self._drop_unclosed(owned)
            raise

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

    def __reduce__(self) -> Any:
        raise TypeError(
            f"a SafeConnectionPool cannot be pickled or sent to another process (pool "
            f"{self.name!r}), e.g. as an argument of a ProcessPoolExecutor or multiprocessing "
            "task: its items and locks belong to this process. To share one bounded pool among "
            "processes, create it in a safepool.PoolManager (manager.SafeConnectionPool(...), or "
            "a named one with safepool.register_pool) and pass the proxy; to give each process "
            "its own pool, build it there (safepool.per_process or safepool.ProcessLocal)"
        )

    def stats(self) -> PoolStats:
        """A consistent snapshot of sizes and counters."""
        if self._orphans:
            self._settle_orphans()
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
                revoked=self._revoked,
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
        limit = self._leak_timeout
        return [
            LeaseInfo(
                holder=holder or "unknown",
                since=wall - (now - at),
                held_for=now - at,
                leaked=limit is not None and now - at >= limit,
            )
            for at, holder in held
        ]

    def _count_reclaimed(self) -> None:
        """Count a lease returned on behalf of a holder that died (the manager calls this)."""
        with self._lock:
            self._reclaimed += 1

    def _count_revoked(self) -> None:
        """Count a lease an operator took back from its holder (the manager calls this)."""
        with self._lock:
            self._revoked += 1

    def maintain(self) -> float:
        """Close idle items past ``max_idle`` or ``max_lifetime`` and report leaks, now.

        A background thread does this on its own when ``max_idle`` or ``leak_timeout`` is set;
        call it yourself to run maintenance at a moment of your choosing. Returns the seconds
        until maintenance is next due (``inf`` if never).
        """
        now = self._clock()
        stale: list[Claim] = []
        try:
            with self._lock:
                if self._closed:
                    return math.inf
                while True:
                    if not self._locked_take_stale(stale, now):
                        break
                leaks = self._locked_find_leaks(now)
                delay = self._next_maintenance(now)
            for claim in stale:
                self._discard(claim, claim.entry)  # type: ignore[arg-type]
        except BaseException:
            for claim in stale:
                self._settle(claim)  # a no-op for the ones already closed
            raise
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

    # -- fork handling (see safepool._fork) -----------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child: start over with an empty pool. Never touch the old lock."""
        inherited = {key: e.item for key, e in self._entries.items() if e.leased_at is not None}
        unused = [e.item for e in (*self._idle, *self._transit.values())]
        _fork.abandon((self._entries, self._idle, self._transit, self._waiters))
        self._init_state(closed=self._closed)
        self._inherited = inherited
        # Never handed out here: the child's copies of their sockets go (a leased item stays
        # whole: the code that leased it may still hold it in the child).
        _close_inherited_sockets(unused)
