"""The life of a pool's items outside the lock: waited for, made, vetted, reset, or closed.

:class:`PoolItems` is a base of :class:`~safepool.SafeConnectionPool` (which holds the public
methods and the fast paths of ``acquire``/``release``). It holds the steps that run user code or
may wait, between the transitions of :class:`~safepool._poolstate.PoolState`:

* waiting in the queue for an item or a slot (each waiter's own lock, released by the pool when
  it serves it; a timeout re-checks under the pool lock, so an item served late is not lost);
* making an item: its budget permit first (``budget=``), then the factory, ``configure``, and
  the DB-API defaults its first connection settles (``"auto"`` options, the release probe);
* vetting an idle item before reuse (``max_lifetime``, a lost permit, ``check``);
* finishing a return (``reset``, the default rollback) and closing an item, whose slot then goes
  to the oldest waiter or is freed;
* giving back whatever a call cut short still holds (:meth:`PoolItems._settle`).

Each step follows the rules in :mod:`safepool._poolstate`: user code and waits run outside the
lock, every change of state is one ``_locked_*`` transition that records its owner (a
:class:`~safepool._poolstate.Claim`) in the same step, and a ``BaseException`` anywhere leaves
the claim holding exactly what must be given back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _housekeeper, dbapi
from ._config import DB_MAX_IDLE, DB_MAX_LIFETIME, redact
from ._poolstate import Claim, Entry, PoolState, T
from .budget import Budget
from .errors import FactoryError, LeaseError, PoolTimeout

if TYPE_CHECKING:
    from .pool import PoolObserver, WaitHook

__all__ = ["AUTO_RESET", "NO_AUTO", "PoolItems"]

# The pool's logger: these messages are the pool's own (see safepool.pool).
logger = logging.getLogger("safepool.pool")

AUTO_RESET = frozenset({"reset"})  # PoolItems._auto once its first connection is made
NO_AUTO: frozenset[str] = frozenset()
_ORPHAN_CHECK = 0.5  # seconds a waiter sleeps at most before it looks for orphaned leases


class PoolItems(PoolState[T]):
    """The steps of an item's life outside the lock (see the module docstring)."""

    # The state these steps settle has its slots here (mypy checks that assignments go to a
    # slot of the class); the configuration they read is SafeConnectionPool's.
    __slots__ = (
        "_auto", "_background", "_lifetime", "_max_idle", "_probe", "_probe_class", "_reset",
        "_rollback",
    )  # fmt: skip

    # Configuration, set by SafeConnectionPool.__init__ (read without the lock).
    _factory: Callable[[], T]
    _configure: Callable[[T], object] | None
    _close_item: Callable[[T], object]
    _clock: Callable[[], float]
    _budget: Budget | None
    _leak_timeout: float | None
    _housekeeping: bool  # background= as given
    _observer: PoolObserver | None
    # Settled by the first DB-API connection the pool makes (_adopt, under the lock).
    _auto: frozenset[str]  # the options still "auto"
    _rollback: Callable[[Any], object]  # the default reset of DB-API connections
    _reset: Callable[[Any], object] | None
    _probe: Callable[[Any], object] | None
    _probe_class: type | None
    _lifetime: float  # max_lifetime (inf: none)
    _max_idle: float | None
    _background: bool  # registered with the housekeeper thread

    if TYPE_CHECKING:
        # SafeConnectionPool's (_settle releases a leased entry; the housekeeper maintains).
        def release(self, item: T, *, discard: bool = False) -> None: ...

        def maintain(self) -> float: ...
    # -- waiting for an item or a slot ----------------------------------------------------------

    def _timeout_error(self, timeout: float) -> PoolTimeout:
        return PoolTimeout(
            f"pool {self.name!r}: no item available within {timeout:g}s "
            f"(max_size={self._max_size}, all leased)"
        )

    def _wait(self, claim: Claim, deadline: float, budget: float, hook: WaitHook | None) -> None:
        """Block until the pool serves ``claim`` or ``deadline`` passes (``budget`` seconds after
        the call began). Raises the timeout, or the error the claim was served with (PoolClosed,
        a cancellation)."""
        wakeup = claim.wakeup
        assert wakeup is not None
        if hook is not None:
            hook.waiting(lambda reason: self._cancel(claim, reason))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining > 0 and wakeup.acquire(True, min(remaining, _ORPHAN_CHECK)):
                    break
                if self._orphans:  # an item may be held by a lease that no longer exists
                    self._settle_orphans()
                error = self._timeout_error(budget)
                now = time.monotonic()
                with self._lock:
                    if not claim.queued:
                        break
                    if now >= deadline:
                        self._locked_dequeue(claim, self._clock(), error, wake=False)
                        raise error
        finally:
            if hook is not None:
                hook.done_waiting()
        if claim.error is not None:
            raise claim.error

    def _cancel(self, claim: Claim, reason: BaseException) -> None:
        """From another thread: end ``claim``'s wait with ``reason`` if it is still queued."""
        now = self._clock()
        with self._lock:
            if claim.queued:
                self._locked_dequeue(claim, now, reason, wake=True)

    # -- making an item -------------------------------------------------------------------------

    def _init_db_defaults(
        self, reset: Any, max_lifetime: float | str | None, max_idle: float | str | None
    ) -> None:
        """The options that may be "auto": settled by the first DB-API connection (_adopt)."""
        self._auto = frozenset(
            option
            for option, value in (
                ("reset", reset), ("max_lifetime", max_lifetime), ("max_idle", max_idle)
            )
            if isinstance(value, str)
        )  # fmt: skip
        self._rollback = functools.partial(dbapi._rollback_returned, pool=self.name)
        if reset is dbapi.rollback_if_in_transaction:
            reset = self._rollback  # the same, with this pool's name in its warnings
        self._reset = None if isinstance(reset, str) else reset
        # Set by _adopt for the pool's first connection: release puts a connection back idle
        # directly unless probe(conn) says it may be inside a transaction. It is only a filter:
        # a connection of another class takes the slow path on every release whatever it says
        # (its entry's keep_until is -inf), and an item not leased here is refused anyway.
        self._probe = None
        self._probe_class = None
        self._lifetime = float(max_lifetime) if isinstance(max_lifetime, int | float) else math.inf
        self._max_idle = float(max_idle) if isinstance(max_idle, int | float) else None

    def _make(self, claim: Claim, deadline: float) -> Entry[T]:
        """Owning a reserved slot in ``claim``: make a new item, recorded in transit for it
        (with a budget, first take the item's permit, waiting until ``deadline`` at most)."""
        if self._background:
            _housekeeper.ensure_running()
        if self._budget is not None:
            self._take_permit(claim, deadline)
        started = time.monotonic()
        try:
            claim.made = self._factory()
        except Exception as exc:
            # The cause's text too (the __cause__ is lost when the error crosses to another
            # process), with anything that looks like a credential redacted.
            raise FactoryError(
                f"pool {self.name!r}: the factory raised {type(exc).__name__}: {redact(str(exc))}"
            ) from exc
        item: Any = claim.made
        if self._configure is not None:
            self._run_configure(claim, item)
        slow_return = bool(self._auto) and self._adopt(item)
        slow_return = slow_return or self._reset is not None
        key = id(item)
        entry = Entry(
            item,
            self._clock(),
            self._lifetime,
            check=self._check is not None or self._leak_timeout is not None,
            reset=slow_return,
        )
        with self._lock:
            duplicate = key in self._entries or key in self._transit
            if duplicate:
                claim.made = None  # it is the pool's already: never close it
            else:
                self._locked_made(claim, entry, key)
        if duplicate:
            raise FactoryError(
                f"pool {self.name!r}: the factory returned an object that is already in the "
                "pool; it must return a new object on every call"
            )
        if entry.permit is not None:
            entry.permit._add_lost_listener(
                functools.partial(self._permit_lost, entry), mark=entry.must_check
            )
        observer = self._observer
        if observer is not None:
            observer.created(self.name, time.monotonic() - started)
        return entry

    def _run_configure(self, claim: Claim, item: Any) -> None:
        """Run ``configure`` on the new ``item`` (``claim.made``); if it raises, close the item
        (the claim keeps its slot, for the caller to give back) and raise FactoryError."""
        try:
            self._configure(item)  # type: ignore[misc]
        except Exception as exc:
            claim.made = None
            self._run_hook(self._close_item, item, "close")
            raise FactoryError(
                f"pool {self.name!r}: configure raised {type(exc).__name__}: {redact(str(exc))}; "
                "the new item was closed"
            ) from exc

    def _adopt(self, item: object) -> bool:
        """A new item, with some options still "auto": settle them if it is a DB-API
        connection. True if the item must take the slow path on every release (to be reset):
        a connection with no probe of its own (see ``release``)."""
        if not dbapi.is_connection(item):
            return False
        server = dbapi._is_server_connection(item)
        resets = "reset" in self._auto
        probe = dbapi.transaction_probe(item) if resets else None
        probed = probe is not None and probe is not dbapi._maybe_in_transaction
        cls = type(item)
        register = False
        with self._lock:  # plain stores (an interruption: the next item settles them again)
            if server and "max_lifetime" in self._auto:
                self._lifetime = DB_MAX_LIFETIME
            if server and "max_idle" in self._auto:
                self._max_idle = DB_MAX_IDLE
                register = self._housekeeping and not self._background
                self._background = self._housekeeping
            if probed and self._probe is None:
                self._probe, self._probe_class = probe, cls
            own_probe = self._probe_class is cls
            self._auto = AUTO_RESET if resets else NO_AUTO
        if register:
            _housekeeper.register(self)
        return resets and not own_probe

    def _take_permit(self, claim: Claim, deadline: float) -> None:
        """Give ``claim`` the budget permit its new item needs."""
        assert self._budget is not None
        self._release_permits(claim)  # (none, unless a call cut short left one)
        remaining = max(0.0, deadline - time.monotonic())
        try:
            # extend(map(...)): the permit is stored by C code, with no instruction between
            # its grant and its record where an interruption could lose it.
            claim.permits.extend(map(self._budget.acquire, (remaining,)))
        except PoolTimeout:
            with self._lock:
                self._timeouts += 1
            raise

    # -- vetting, returning and closing an item -------------------------------------------------

    def _vet(self, claim: Claim, entry: Entry[T]) -> Entry[T] | None:
        """Decide whether ``claim``'s entry in transit may be handed out. Returns it if so;
        otherwise closes it and returns None, ``claim`` keeping the slot for a replacement."""
        reason = None
        if self._clock() >= entry.expires:
            reason = "max_lifetime reached"
        elif entry.permit is not None and not entry.permit.valid:
            reason = "its budget permit was lost"
        elif self._check is not None and not self._run_hook(self._check, entry.item, "check"):
            reason = "check failed"
        if reason is None:
            return entry
        logger.debug("pool %r: replacing an item (%s)", self.name, reason)
        claim.closing = True
        self._run_hook(self._close_item, entry.item, "close")
        key = id(entry.item)
        with self._lock:
            self._locked_drop_keep_slot(claim, key)
            if reason == "check failed":
                self._lost += 1
        claim.closing = False
        # Its permit goes back too: the replacement queues for one like anyone else, so that
        # a busy pool cannot keep a shared budget's permits from other pools forever.
        self._release_permits(claim)
        return None

    def _finish_return(self, claim: Claim, *, discard: bool) -> None:
        """``claim``'s entry came back into transit: reset it and put it back, or close it."""
        entry = claim.entry
        assert entry is not None
        keep = not discard and not self._closed
        if entry.permit is not None and not entry.permit.valid:
            keep = False
        reset = self._reset
        if reset is None and "reset" in self._auto and dbapi.is_connection(entry.item):
            reset = self._rollback  # the default reset of DB-API connections
        if keep and reset is not None and not self._run_hook(reset, entry.item, "reset"):
            keep = False
            with self._lock:
                self._lost += 1
        now = self._clock()
        with self._lock:
            if keep and not self._closed and now < entry.expires:
                self._locked_restore(claim, entry, id(entry.item), now)
                return
        self._discard(claim, entry)

    def _discard(self, claim: Claim, entry: Entry[T]) -> None:
        """Close ``claim``'s entry in transit, then free its slot (to a waiter, or for good).

        Closing comes first so that a waiter given the slot never makes its item while the old
        one is still open: the pool never holds more than ``max_size`` live items. If closing is
        cut short the entry still leaves the pool (it is not closed a second time).
        """
        try:
            if not claim.closing:
                claim.closing = True
                self._run_hook(self._close_item, entry.item, "close")
        finally:
            now = self._clock()
            with self._lock:
                if entry.owner is claim:
                    self._locked_drop(claim, entry, id(entry.item), now)
            self._release_permits(claim)

    def _release_permits(self, claim: Claim) -> None:
        """Give back the permits ``claim`` holds (outside the lock: it may be I/O)."""
        permits = claim.permits
        while permits:
            permit = permits[-1]
            try:
                self._budget.release(permit)  # type: ignore[union-attr]
            except LeaseError:
                pass  # released already (by a call cut short after it)
            except Exception as exc:  # the engine is unreachable: the permit is its to reclaim
                logger.warning(
                    "pool %r: giving back a budget permit failed: %s: %s",
                    self.name,
                    type(exc).__name__,
                    exc,
                )
            del permits[-1]

    def _permit_lost(self, entry: Entry[T], permit: object) -> None:
        """The budget's engine took ``entry``'s permit back (from its thread): the item is closed
        now if it is idle, else when it is next released or vetted."""
        claim = Claim()
        key = id(entry.item)
        with self._lock:
            if entry.owner is None and entry.leased_at is None and entry in self._idle:
                self._locked_take_idle(claim, entry, key)
        if claim.entry is not None:
            logger.warning("pool %r: an item's budget permit was lost; closing it", self.name)
            self._discard(claim, entry)

    def _release_unknown(self, item: object, entry: Entry[T] | None) -> None:
        """Under the lock: ``item`` is not leased from this pool. Raise, changing nothing."""
        key = id(item)
        if key in self._inherited and self._inherited[key] is item:
            # Leased by the parent before a fork: abandoned here, never reused nor closed.
            del self._inherited[key]
            logger.debug("pool %r: ignoring release of an item inherited across fork", self.name)
            return
        if entry is not None and entry.item is item:
            raise LeaseError(f"pool {self.name!r}: this {type(item).__name__} was already released")
        if key in self._transit and self._transit[key].item is item:
            raise LeaseError(
                f"pool {self.name!r}: this {type(item).__name__} is being returned already"
            )
        raise LeaseError(
            f"pool {self.name!r}: this {type(item).__name__} was not leased from this pool"
        )

    def _run_hook(self, hook: Callable[[Any], object], item: object, what: str) -> bool:
        """Run check/reset/close; log failures; True if it succeeded. A BaseException (e.g.
        KeyboardInterrupt) propagates: the caller's claim gives everything back."""
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

    # -- giving back what a call cut short holds ------------------------------------------------

    def _settle_orphans(self) -> None:
        """Settle the claims of leases collected while held (each is settled before it leaves
        the queue, and settling twice is harmless)."""
        orphans = self._orphans
        while orphans:
            ref = orphans[0]
            self._settle(ref.claim)
            self._lease_refs.discard(ref)
            with contextlib.suppress(IndexError, ValueError):
                orphans.remove(ref)

    def _settle(self, claim: Claim) -> None:
        """Give back everything ``claim`` holds: its place in the queue, a reserved slot, an
        entry leased to it or in transit for it. Used when a call is cut short; idempotent."""
        now = self._clock()
        with self._lock:
            if claim.queued:
                self._locked_dequeue(claim, now, None, wake=False)
                return
            entry = claim.entry
            owned = entry is not None and entry.owner is claim
            leased = owned and entry.leased_at is not None  # type: ignore[union-attr]
            if claim.slot:
                self._locked_free_slot(claim, now)
        made, claim.made = claim.made, None
        if made is not None:
            self._run_hook(self._close_item, made, "close")
        if leased:
            with contextlib.suppress(LeaseError):  # settled meanwhile by another thread
                self.release(entry.item)  # type: ignore[union-attr]
        elif owned:
            self._discard(claim, entry)  # type: ignore[arg-type]
        self._release_permits(claim)

    def _drop_unclosed(self, claims: list[Claim]) -> None:
        """Closing was cut short: the remaining entries leave the pool without being closed."""
        now = self._clock()
        with self._lock:
            for claim in claims:
                entry = claim.entry
                if entry is not None and entry.owner is claim:
                    self._locked_drop(claim, entry, id(entry.item), now)
        for claim in claims:
            self._release_permits(claim)
