"""The budget protocol: one limit shared by many processes (and, with some engines, many hosts).

A *budget* hands out at most ``limit`` :class:`Permit` objects at once, to any process that opens
it. Engines implement the :class:`Budget` protocol:

* :class:`~safepool.HostBudget` (one host, no server: the kernel gives a dead holder's permits
  back);
* ``PostgresBudget`` and ``RedisBudget`` (many hosts; the permits live in the database).

Every engine follows the same contract, so code (and ``SafeConnectionPool(budget=...)``) written
against one works with all of them:

* ``acquire(timeout=None) -> Permit`` waits up to ``timeout`` seconds (``None``: no limit; ``0``:
  do not wait) and raises :class:`~safepool.BudgetTimeout` (a ``PoolTimeout`` and a
  ``TimeoutError``) when none came free in time. A timeout is never early.
* ``release(permit)`` gives a permit back. A permit of another budget, a forged or foreign one,
  or a second release raise :class:`~safepool.LeaseError` and change nothing. Releasing a permit
  that a *parent* process held before ``fork()`` is a quiet no-op in the child: the permit stays
  the parent's.
* ``lease(timeout=None)`` is a context manager that releases on any exit, ``BaseException``
  included.
* ``stats()`` is a :class:`BudgetStats`; ``holders()`` lists a :class:`PermitHolder` per permit.
* ``Permit.token`` is a *fencing token*: strictly increasing across the whole budget, so a
  resource can refuse a request carrying a token older than one it has already seen.
* A permit whose holder dies comes back without the holder's help (how fast is the engine's
  promise). An engine that can lose a permit under a live holder (a terminated session, an
  expired entry) marks it: ``permit.valid`` turns false and the budget's ``on_lost`` callback
  runs with the permit.

This module holds only what every engine shares; it imports no engine.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from . import _fork
from .errors import LeaseError

__all__ = [
    "Budget",
    "BudgetStats",
    "Permit",
    "PermitHolder",
    "PermitLease",
    "check_budget_limit",
    "check_budget_name",
    "check_permit",
]


class _LostLock:
    """Serialises a permit's lost bookkeeping (``_lost``, ``_lost_marks``, ``_lost_listeners``)
    between the thread that adds a listener and an engine's thread that marks the permit lost.
    Held for a few stores at a time (and the marks, which only set flags); nothing is taken
    under it. A forked child gets a fresh one (a thread of the parent may have held it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()


_LOST = _LostLock()
_fork.register(_LOST)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_budget_name(name: object) -> str:
    """A budget name: 1-64 characters of ``A-Z a-z 0-9 _ . -``, not starting with ``.``/``-``/``_``.

    Names travel into file names, SQL and Redis keys, so the grammar is deliberately narrow.
    """
    if not isinstance(name, str):
        raise TypeError(f"a budget name must be a str, got {type(name).__name__} {name!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid budget name {name!r}: use 1-64 characters of letters, digits, '_', '.' "
            "and '-', starting with a letter or digit (e.g. 'pg-connections')"
        )
    return name


def check_budget_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be an int, got {type(limit).__name__} {limit!r}")
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return limit


class Permit:
    """One unit of a budget, held by the process that acquired it.

    Compare permits by identity. A permit cannot be pickled: it belongs to its process (pass the
    budget's name to other processes, and let them acquire their own).
    """

    __slots__ = ("__weakref__", "_engine_state", "_lost", "_lost_listeners", "_lost_marks",
                 "_owner", "_released", "budget", "pid", "since", "token")  # fmt: skip

    def __init__(
        self,
        owner: object,
        budget: str,
        token: int,
        engine_state: Any = None,
        *,
        pid: int | None = None,
        since: float | None = None,
    ) -> None:
        # pid and since: for engines that already know them (a getpid() is a system call).
        self._owner = owner  # the Budget object that issued it
        self.budget = budget  #: the budget's name
        self.token = token  #: the fencing token: strictly increasing across the budget
        self.pid = os.getpid() if pid is None else pid  #: the process that holds it
        self.since = time.time() if since is None else since  #: wall-clock time it was granted
        self._engine_state = engine_state  # the engine's own record (a slot, a key, ...)
        self._released = False
        self._lost: str | None = None
        self._lost_listeners: list[Callable[[Permit], object]] = []
        self._lost_marks: tuple[Callable[[], object], ...] = ()

    @property
    def valid(self) -> bool:
        """True while this process holds the permit: not released, not lost, not inherited."""
        return not self._released and self._lost is None and self.pid == os.getpid()

    @property
    def lost_reason(self) -> str | None:
        """Why the engine took the permit back from a live holder (None if it did not)."""
        return self._lost

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Permit belongs to the process that acquired it and cannot be pickled; "
            "open the budget by name in the other process and acquire there"
        )

    def __repr__(self) -> str:
        state = "valid" if self.valid else ("lost" if self._lost else "ended")
        return f"<Permit {self.budget!r} token={self.token} pid={self.pid} {state}>"

    # -- for engines ------------------------------------------------------------------------

    def _owned_by(self, owner: object) -> bool:
        return self._owner is owner

    def _mark_released(self) -> None:
        self._released = True

    def _add_lost_listener(
        self, listener: Callable[[Permit], object], *, mark: Callable[[], object] | None = None
    ) -> None:
        """Run ``listener(permit)`` once if the engine marks this permit lost (at once if it
        already is). Used by ``SafeConnectionPool(budget=...)``.

        ``mark`` (no locks, no I/O: it sets a flag) runs in the same step as the marking, before
        ``valid`` turns False, so that the holder never sees a lost permit without its flag set;
        ``listener`` runs later, outside any engine lock. Safe against a concurrent marking (the
        engine's thread): each listener runs exactly once.
        """
        with _LOST.lock:
            lost = self._lost is not None
            if not lost:
                if mark is not None:
                    self._lost_marks += (mark,)
                self._lost_listeners.append(listener)
        if lost:
            if mark is not None:
                mark()
            listener(self)

    def _mark_lost(self, reason: str) -> list[Callable[[Permit], object]]:
        """Run the permit's marks, then mark it lost; return the listeners to run (outside any
        engine lock). Marks first: cut short between the two, an item is flagged for a check
        its permit still passes, never the other way round."""
        with _LOST.lock:
            if self._lost is not None or self._released:
                return []
            for mark in self._lost_marks:
                mark()
            self._lost = reason
            listeners, self._lost_listeners = self._lost_listeners, []
        return listeners


def check_permit(owner: object, permit: object, budget_name: str) -> bool:
    """The shared checks of ``release(permit)``; False means "a parent's permit: do nothing".

    Also False for a permit the engine marked lost (it holds nothing any more; the first such
    release is quiet, a second one is a double release). Raises :class:`LeaseError` (changing
    nothing) for anything that is not a live permit of ``owner``.
    """
    if not isinstance(permit, Permit):
        raise LeaseError(
            f"budget {budget_name!r}: release() takes a Permit from acquire(), got "
            f"{type(permit).__name__}"
        )
    if not permit._owned_by(owner):
        raise LeaseError(
            f"budget {budget_name!r}: this permit was issued by budget {permit.budget!r} "
            "(another budget object); release it there"
        )
    if permit.pid != os.getpid():
        return False  # inherited across fork: the parent's to release
    if permit._lost is not None and not permit._released:
        permit._released = True
        return False  # the engine took it back already; nothing is held to release
    if permit._released:
        raise LeaseError(f"budget {budget_name!r}: permit {permit.token} was already released")
    return True


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetStats:
    """A snapshot of a budget. Counters are the budget's across every process and since its
    creation, where the engine can keep them so; otherwise since this object opened it (the
    engine's documentation says which)."""

    name: str
    limit: int
    in_use: int  #: permits held now
    waiting: int  #: callers waiting for a permit now
    acquired: int  #: permits granted
    timeouts: int  #: acquire calls that gave up
    reclaimed: int  #: permits taken back from holders that died (or lost them)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class PermitHolder:
    """Who holds one permit (from ``budget.holders()``)."""

    pid: int
    since: float  #: wall-clock time the permit was granted
    token: int
    host: str | None = None  #: for engines shared across hosts

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@runtime_checkable
class Budget(Protocol):
    """What every budget engine provides (see the module docstring for the contract)."""

    @property
    def name(self) -> str: ...

    @property
    def limit(self) -> int: ...

    def acquire(self, timeout: float | None = None) -> Permit: ...

    def release(self, permit: Permit) -> None: ...

    def lease(self, timeout: float | None = None) -> PermitLease: ...

    def stats(self) -> BudgetStats: ...

    def holders(self) -> list[PermitHolder]: ...


class _Acquirer(Protocol):
    def acquire(self, timeout: float | None = None) -> Permit: ...

    def release(self, permit: Permit) -> None: ...


class _LeaseRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a :class:`PermitLease`, carrying its permit: when the lease is
    collected still holding it (its ``__exit__`` cut short as it began, where a signal handler
    may run), the callback -- C code, ``_orphans.append`` -- queues it for release."""

    __slots__ = ("budget", "permit")
    budget: Any
    permit: Permit | None


# Leases collected while holding a permit, queued by their references' callback and released at
# this process's next lease(); _live keeps the references alive until their lease has ended.
# (deque and set operations are atomic: no lock.)
_orphans: collections.deque[_LeaseRef] = collections.deque()
_live: set[_LeaseRef] = set()


def _settle_orphans() -> None:
    """Release the permits of leases collected while holding one. Settling twice is harmless:
    a permit is taken off its reference once released, and a second release changes nothing."""
    while True:
        try:
            ref = _orphans[0]
        except IndexError:
            return
        permit = ref.permit
        if permit is not None:
            with contextlib.suppress(Exception):  # released already: LeaseError, no change
                ref.budget.release(permit)
            ref.permit = None
        _live.discard(ref)
        with contextlib.suppress(IndexError, ValueError):
            _orphans.remove(ref)


class PermitLease:
    """``with budget.lease() as permit:`` -- released however the block exits, even when an
    interruption cuts ``__exit__`` short as it begins (then at this process's next lease())."""

    __slots__ = ("__weakref__", "_budget", "_permit", "_ref", "_timeout")

    def __init__(self, budget: _Acquirer, timeout: float | None) -> None:
        self._budget = budget
        self._timeout = timeout
        self._permit: Permit | None = None
        self._ref: _LeaseRef | None = None

    def __enter__(self) -> Permit:
        if _orphans:
            _settle_orphans()
        # The permit is stored by C code (extend over map): on Python 3.10 a signal handler may
        # run in this frame after acquire() returns, before its result is stored; the handler
        # below still finds it then, and gives it back (the block never runs, nor __exit__).
        got: list[Permit] = []
        try:
            got.extend(map(self._budget.acquire, (self._timeout,)))
            self._permit = got[-1]
            ref = _LeaseRef(self, _orphans.append)
            ref.budget, ref.permit = self._budget, got[-1]
            _live.add(ref)
            self._ref = ref
        except BaseException:
            self._permit = None
            if got:
                with contextlib.suppress(Exception):  # the interruption is what propagates
                    self._budget.release(got[-1])
            raise
        return got[-1]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The reference keeps the permit until it is released: cut short anywhere before, the
        # lease's collection queues it (see _LeaseRef).
        permit, self._permit = self._permit, None
        ref, self._ref = self._ref, None
        if permit is not None:
            try:
                self._budget.release(permit)  # quiet for a lost or inherited permit
            except BaseException:
                # Cut short: finish it. A release that had happened already says so with
                # LeaseError, and changes nothing.
                with contextlib.suppress(Exception):
                    self._budget.release(permit)
                raise
        if ref is not None:
            ref.permit = None
            _live.discard(ref)
