"""The state of a :class:`~safepool.SafeConnectionPool` and its named transitions.

Every change of a pool's state is one of the ``_locked_*`` methods below, run under the pool's
lock. Each is *atomic with respect to interruptions*: CPython runs signal handlers (the usual
source of ``KeyboardInterrupt`` and of exceptions raised by handlers) only when a Python
function starts, at a loop's back edge, after a builtin call returns and (on 3.10) after any
call returns -- never between two attribute or subscript stores. So a transition makes every
call it needs (the clock, ``id()``, a new lock) *before* its first change, then changes state
with plain stores, and makes at most one builtin call, as its very last step. An exception can
therefore only arrive before a transition or after it, never in the middle, and a transition
records who owns the result (a :class:`Claim`) in the same step. Whatever an interruption cuts
short is then given back by :meth:`PoolState._settle`-style recovery in the pool, from the claim.

On 3.10 a *taken conditional jump* is a check point too (``POP_JUMP_IF_FALSE``/``_TRUE`` check
for signals when they jump, forward or back): an ``if`` (or a conditional expression) whose test
skips its body runs handlers there. So a transition decides every branch before its first change
and then changes state in one straight run per branch (``_locked_drop`` duplicates its stores
rather than testing ``if waiter is None`` half-way; ``_locked_hand_off`` picks the dicts to move
the entry between up front). Measured: ``_locked_drop`` testing ``entry.permit`` after clearing
``claim.entry`` left an entry in transit, owned by nobody, in ~2 of 3 long sweeps of
test_signal_handler_raising_in_construction_and_close on 3.10.

One more rule, for CPython 3.13.0: an exception raised at the back edge of a ``while cond:`` loop
can miss the ``with``/``try`` handlers of its own function (CPython issue 108214: measured here,
a ``with lock:`` around such a loop left the lock held after ~15% of interruptions). Inside a
``with`` or ``try``, loops are written ``for ...:`` or ``while True: ... break``;
tests/test_source_rules.py checks it.

An item is in exactly one place:

* **idle**: in ``_entries`` and in ``_idle``, ``leased_at is None``;
* **leased**: in ``_entries``, ``leased_at`` set; ``owner`` is the claim of the call or lease
  that holds it (None for a plain ``acquire()``);
* **in transit**: in ``_transit`` while it is being made, checked, reset or closed outside the
  lock; ``owner`` is the claim of the one call doing that.
"""

from __future__ import annotations

import math
import queue
import threading
import traceback
from collections import deque
from typing import Any, Generic, Protocol, TypeVar

from .errors import PoolTimeout

__all__ = ["Claim", "Entry", "PoolLock", "PoolState", "pool_lock"]

T = TypeVar("T")


class PoolLock(Protocol):
    """What :func:`pool_lock` returns: ``with lock:`` holds it; ``locked()`` says if it is held."""

    def __enter__(self) -> object: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def locked(self) -> bool: ...


def pool_lock() -> PoolLock:
    """A pool's lock: a token in a :class:`queue.SimpleQueue`. ``with lock:`` takes the token
    (``get()``, waiting if another thread holds it) and puts it back (``put()``).

    Why not a :class:`threading.Lock`: two reasons, both measured on the pool's hot paths.

    * *Cost.* ``with lock:`` looks ``__enter__`` and ``__exit__`` up on the lock's type and
      binds each to the lock, and a lock's acquire and release each make an atomic operation.
      Here the lock's class (one per lock, made once) holds the queue's bound ``get``, ``put``
      and ``empty`` as plain class attributes (built-in methods are not descriptors: ``with``
      finds them as they are), and taking or giving back an uncontended token is a list
      operation under the GIL. About 10 % of an in-process lease + release.
    * *No lock convoy on 3.10-3.12.* A thread that waited for a ``threading.Lock`` owns it as
      soon as it wakes, before it has the GIL back: every thread that then arrives sleeps too,
      and each hand-off costs a context switch. A waiting ``get()`` only learns that the queue
      is no longer empty, and takes the token under the GIL, so the running thread is never
      blocked by a sleeping one. (3.13's queue hands an item to a sleeping ``get()`` directly;
      the fast paths keep their ``locked()`` check and yield, see ``_yield_while_locked``.)

    Interruptions: ``get`` and ``put`` are C code (CPython's ``_queue``), called by ``with``
    itself, so as with a ``threading.Lock`` no signal handler can run between taking the token
    and the block's handler: an interruption can never leave the token taken. A ``get()``
    interrupted while it waits takes nothing. ``__exit__(type, value, traceback)`` is
    ``put(item, block, timeout)``, whose ``block`` and ``timeout`` are ignored: the token put back
    is the exception's type, or None (no one reads it). (``put`` does test ``block``'s truth: an
    exception whose ``__bool__`` raises would keep the token; tests/test_interrupt_safe_waits.py
    checks one whose ``__bool__`` is False.) The queue only ever holds one token: ``put`` runs
    only at the end of a ``with`` that took it.

    In a forked child the pool makes a new lock (``_init_state``): the old one is never touched.
    """
    tokens: queue.SimpleQueue[object] = queue.SimpleQueue()
    tokens.put(None)
    namespace = {
        "__slots__": (),
        "__enter__": tokens.get,
        "__exit__": tokens.put,
        "locked": tokens.empty,
    }
    lock: PoolLock = type("PoolLock", (), namespace)()
    return lock


class Entry(Generic[T]):
    """One item the pool owns, with its bookkeeping."""

    __slots__ = ("created", "expires", "holder", "item", "keep_until", "last_used", "leak_reported",
                 "leased_at", "owner", "permit", "reuse_until", "stack")  # fmt: skip

    def __init__(self, item: T, now: float, lifetime: float, *, check: bool, reset: bool) -> None:
        self.item = item
        self.created = now
        self.expires = now + lifetime  # inf when there is no max_lifetime
        # The fast paths make one comparison each: acquire hands an idle item out directly only
        # while now < reuse_until (-inf when it must be checked first, or leases are tracked),
        # and release puts it back directly only while now < keep_until (-inf when it must be
        # reset, or the pool is closed). A DB-API connection under the default reset keeps a
        # finite keep_until: release probes it first (see SafeConnectionPool.release).
        self.reuse_until = -math.inf if check else self.expires
        self.keep_until = -math.inf if reset else self.expires
        self.last_used = now
        self.leased_at: float | None = None  # None while idle or in transit
        self.owner: Claim | None = None  # see the module docstring
        self.holder: str | None = None
        self.stack: traceback.StackSummary | None = None
        self.leak_reported = False
        self.permit: Any = None  # the budget permit this item holds (budget= pools)

    def must_check(self) -> None:
        """Send this item down both slow paths from now on (its permit was lost): acquire and
        release check it before handing it out or putting it back. Sets two floats: safe from
        any thread, without the pool lock (the fast paths read each once)."""
        self.reuse_until = self.keep_until = -math.inf


class Claim:
    """What one call holds while it runs, recorded by the transitions that give it things.

    ``queued``: waiting in ``_waiters`` (``wakeup`` is released when it is served). Once served
    it holds one of: ``entry`` (leased to it, or in transit for it), ``slot`` (a reserved slot to
    make a new item in), ``error`` (the pool was closed, or the wait was cancelled).
    ``made``: an item the factory returned that is not recorded yet. ``closing``: ``entry``'s
    close hook has run (it is not run twice). ``permits``: budget permits the call holds -- one
    taken for the item it is about to make, or the permit of an item it closed, to give back.
    """

    __slots__ = ("closing", "enqueued_at", "entry", "error", "made", "permits", "queued", "slot",
                 "wakeup")  # fmt: skip

    def __init__(self) -> None:
        self.entry: Entry[Any] | None = None
        self.slot = False
        self.queued = False
        self.error: BaseException | None = None
        self.made: object = None
        self.permits: list[Any] = []
        self.closing = False
        self.wakeup: threading.Lock | None = None
        self.enqueued_at = 0.0


class PoolState(Generic[T]):
    """The pool's state, and the transitions between states (all under ``_lock``)."""

    __slots__ = (
        "_check", "_closed", "_closed_count", "_created", "_entries", "_idle",
        "_inherited", "_leaks", "_lease_refs", "_lease_time", "_lock", "_lost", "_max_size",
        "_max_waiting", "_orphan_sink", "_orphans", "_pending", "_reclaimed", "_requests",
        "_revoked", "_timeouts", "_transit", "_wait_time", "_waiters", "_waits", "name",
    )  # fmt: skip

    # _lock guards every attribute here. While _lock is free:
    #   len(_entries) + _pending <= _max_size                  (capacity is never exceeded)
    #   _idle holds the entries of _entries whose leased_at is None (the rest are leased)
    #   _pending == len(_transit) + reserved slots; each transit entry and each reserved slot is
    #     owned by exactly one Claim (slots given to a waiter are owned by its claim)
    #   _waiters holds the queued claims, oldest first; it is non-empty only while _idle is
    #     empty and the pool is at _max_size
    # Lock order: the pool lock is a leaf: nothing else is locked while it is held, and no user
    # code (factory, hooks) ever runs under it.
    name: str
    _lock: PoolLock  # (see pool_lock)
    _entries: dict[int, Entry[T]]  # id(item) -> entry, for every idle or leased item
    _idle: deque[Entry[T]]  # LIFO at the right; the left end has been idle longest
    _transit: dict[int, Entry[T]]  # id(item) -> entry being made, checked, reset or closed
    _pending: int
    _waiters: deque[Claim]
    _closed: bool
    _inherited: dict[int, T]  # leased in the parent before a fork: releasing them is a no-op
    # References to leases collected while still holding a claim (see safepool._lease),
    # settled by the next operation that may wait, or reports. Appended by a weakref callback
    # (_orphan_sink, the deque's own append), so read and changed without the lock.
    _orphans: deque[Any]
    _orphan_sink: Any
    _lease_refs: set[Any]  # the LeaseRefs of leases in progress (see safepool._lease)
    _check: Any
    _max_size: int
    _max_waiting: int
    # Counters (see PoolStats).
    _created: int
    _closed_count: int
    _requests: int
    _waits: int
    _timeouts: int
    _lost: int
    _leaks: int
    _reclaimed: int
    _revoked: int
    _wait_time: float
    _lease_time: float

    def _init_state(self, *, closed: bool) -> None:
        """Give the pool fresh, empty state (at construction, and in a forked child)."""
        self._lock = pool_lock()
        self._entries = {}
        self._idle = deque()
        self._transit = {}
        self._pending = 0
        self._waiters = deque()
        self._closed = closed
        self._inherited = {}
        self._orphans = deque()
        self._orphan_sink = self._orphans.append
        self._lease_refs = set()
        self._created = self._closed_count = self._requests = self._waits = 0
        self._timeouts = self._lost = self._leaks = self._reclaimed = self._revoked = 0
        self._wait_time = self._lease_time = 0.0

    # -- giving a call something --------------------------------------------------------------

    def _locked_lease_idle(self, claim: Claim | None, entry: Entry[T], now: float) -> None:
        """The newest idle entry (``entry``, checked usable) becomes leased to ``claim``."""
        entry.leased_at = now
        entry.owner = claim
        entry.leak_reported = False
        if claim is not None:
            claim.entry = entry
        self._idle.pop()  # (the one call, last; cheaper than `del`, which rotates the deque)

    def _locked_vet_idle(self, claim: Claim, entry: Entry[T], key: int) -> None:
        """The newest idle entry goes into transit, for ``claim`` to check it outside the lock."""
        entry.owner = claim
        claim.entry = entry
        self._transit[key] = entry
        del self._entries[key]
        self._pending += 1
        del self._idle[-1]

    def _locked_take_idle(self, claim: Claim, entry: Entry[T], key: int) -> None:
        """An idle entry (anywhere in ``_idle``) goes into transit for ``claim``, to be closed."""
        position = self._idle.index(entry)
        entry.owner = claim
        claim.entry = entry
        self._transit[key] = entry
        del self._entries[key]
        self._pending += 1
        del self._idle[position]

    def _locked_reserve(self, claim: Claim) -> None:
        """``claim`` gets a reserved slot, to make a new item in."""
        claim.slot = True
        self._pending += 1

    def _locked_enqueue(self, claim: Claim, wakeup: threading.Lock, now: float) -> None:
        """``claim`` joins the queue (``wakeup`` is already acquired)."""
        claim.wakeup = wakeup
        claim.enqueued_at = now
        claim.queued = True
        self._waits += 1
        self._waiters.append(claim)

    def _locked_made(self, claim: Claim, entry: Entry[T], key: int) -> None:
        """The item made in ``claim``'s slot is recorded, in transit for ``claim``."""
        entry.permit = claim.permits[0] if claim.permits else None
        del claim.permits[:]
        entry.owner = claim
        claim.entry = entry
        claim.made = None
        claim.slot = False
        self._transit[key] = entry
        self._created += 1

    def _locked_lease_vetted(self, claim: Claim, key: int, now: float) -> None:
        """``claim``'s entry in transit passed its checks: it becomes leased to ``claim``."""
        entry = self._transit[key]
        entry.leased_at = now
        entry.leak_reported = False
        self._entries[key] = entry
        del self._transit[key]
        self._pending -= 1

    # -- taking things back -------------------------------------------------------------------

    def _locked_return(self, entry: Entry[T], now: float) -> None:
        """A leased entry comes back fit for reuse: to the oldest waiter, or idle."""
        if self._waiters:
            self._locked_hand_off(None, entry, id(entry.item), now)
            return
        self._lease_time += now - entry.leased_at  # type: ignore[operator]
        entry.leased_at = None
        entry.owner = None
        entry.last_used = now
        self._idle.append(entry)

    def _locked_to_transit(self, claim: Claim, entry: Entry[T], key: int, now: float) -> None:
        """A leased entry comes back to be reset or closed by ``claim``, outside the lock."""
        self._lease_time += now - entry.leased_at  # type: ignore[operator]
        entry.leased_at = None
        entry.owner = claim
        claim.entry = entry
        self._transit[key] = entry
        del self._entries[key]
        self._pending += 1

    def _locked_restore(self, claim: Claim | None, entry: Entry[T], key: int, now: float) -> None:
        """An entry in transit for ``claim`` (reset, or just made) is fit for reuse: to the
        oldest waiter, or idle."""
        if self._waiters:
            self._locked_hand_off(claim, entry, key, now)
            return
        if claim is not None:
            claim.entry = None
        entry.owner = None
        entry.last_used = now
        self._entries[key] = entry
        del self._transit[key]
        self._pending -= 1
        self._idle.append(entry)

    def _locked_hand_off(
        self, previous: Claim | None, entry: Entry[T], key: int, now: float
    ) -> None:
        """Give ``entry`` (leased by its releaser, or in transit for ``previous``) to the oldest
        waiter: leased to it when it may be used as is, else in transit for it to check.
        (Every branch is decided before the first change: see the module docstring.)"""
        waiter = self._waiters[0]
        usable = self._check is None and now < entry.expires
        was_leased = entry.leased_at is not None
        used = now - entry.leased_at if was_leased else 0.0  # type: ignore[operator]
        leased_at = now if usable else None
        holder = previous if previous is not None else waiter  # (waiter.entry is set below)
        # The entry moves from source to target (a scratch dict when it stays where it is).
        if usable == was_leased:
            source, target, delta = {key: entry}, self._entries if usable else self._transit, 0
        elif usable:
            source, target, delta = self._transit, self._entries, -1
        else:
            source, target, delta = self._entries, self._transit, 1
        holder.entry = None
        self._lease_time += used
        entry.last_used = now
        entry.leak_reported = False
        entry.owner = waiter
        waiter.entry = entry
        waiter.queued = False
        self._wait_time += now - waiter.enqueued_at
        entry.leased_at = leased_at
        target[key] = entry
        del source[key]
        self._pending += delta
        del self._waiters[0]
        waiter.wakeup.release()  # type: ignore[union-attr]

    def _locked_drop(self, claim: Claim, entry: Entry[T], key: int, now: float) -> None:
        """An entry in transit (``claim``'s) was closed: it leaves the pool, and its slot goes
        to the oldest waiter, or is freed. (Two branches, each a straight run of changes,
        decided before the first: see the module docstring.)"""
        permits = () if entry.permit is None else (entry.permit,)  # given back by the caller
        if not self._waiters:
            claim.entry = None
            claim.permits += permits
            entry.permit = None
            entry.owner = None
            del self._transit[key]
            self._closed_count += 1
            self._pending -= 1
            return
        waiter = self._waiters[0]
        claim.entry = None
        claim.permits += permits
        entry.permit = None
        entry.owner = None
        del self._transit[key]
        self._closed_count += 1
        waiter.slot = True  # the slot stays reserved (pending), now the waiter's
        waiter.queued = False
        self._wait_time += now - waiter.enqueued_at
        del self._waiters[0]
        waiter.wakeup.release()  # type: ignore[union-attr]

    def _locked_drop_keep_slot(self, claim: Claim, key: int) -> None:
        """``claim``'s entry failed its check and was closed; ``claim`` keeps the slot, to make
        a replacement, and the item's budget permit, to give back outside the lock."""
        entry = self._transit[key]
        if entry.permit is not None:
            claim.permits += (entry.permit,)
        entry.permit = None
        claim.entry = None
        claim.slot = True
        del self._transit[key]
        self._closed_count += 1

    def _locked_free_slot(self, claim: Claim, now: float) -> None:
        """``claim``'s reserved slot is not needed: to the oldest waiter, or freed. (Never
        while closed with waiters: close() wakes and drops every waiter.)"""
        if not self._waiters:
            claim.slot = False
            self._pending -= 1
            return
        waiter = self._waiters[0]
        claim.slot = False
        waiter.slot = True
        waiter.queued = False
        self._wait_time += now - waiter.enqueued_at
        del self._waiters[0]
        waiter.wakeup.release()  # type: ignore[union-attr]

    def _locked_dequeue(
        self, claim: Claim, now: float, error: BaseException | None, *, wake: bool
    ) -> None:
        """A queued claim leaves the queue unserved: it timed out, or was cancelled or
        interrupted. ``error`` is what its wait raises; ``wake`` when another thread does this."""
        position = self._waiters.index(claim)
        timed_out = isinstance(error, PoolTimeout)  # (a call: before the first change)
        claim.queued = False
        claim.error = error
        self._wait_time += now - claim.enqueued_at
        self._timeouts += timed_out
        del self._waiters[position]
        if wake:
            claim.wakeup.release()  # type: ignore[union-attr]

    def _locked_close_next(self, owned: list[Claim], error: BaseException) -> bool:
        """One step of closing: wake one waiter with ``error``, or move one idle entry into
        transit for a new claim appended to ``owned``. False when nothing is left to do.
        (A step at a time: an interruption between steps leaves consistent state, and calling
        close() again finishes the work.)"""
        self._closed = True
        if self._waiters:
            waiter = self._waiters[0]
            waiter.error = error
            waiter.queued = False
            del self._waiters[0]
            waiter.wakeup.release()  # type: ignore[union-attr]
            return True
        if not self._idle:
            return False
        claim = Claim()
        entry = self._idle[-1]
        key = id(entry.item)
        entry.owner = claim
        entry.keep_until = -math.inf
        claim.entry = entry
        self._transit[key] = entry
        del self._entries[key]
        self._pending += 1
        del self._idle[-1]
        owned.append(claim)
        return True
