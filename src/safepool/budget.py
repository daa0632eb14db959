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

import dataclasses
import os
import re
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

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

    __slots__ = ("__weakref__", "_engine_state", "_lost", "_lost_listeners", "_owner",
                 "_released", "budget", "pid", "since", "token")  # fmt: skip

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

    def _add_lost_listener(self, listener: Callable[[Permit], object]) -> None:
        """Run ``listener(permit)`` once if the engine marks this permit lost (at once if it
        already is). Used by ``SafeConnectionPool(budget=...)``."""
        if self._lost is not None:
            listener(self)
        else:
            self._lost_listeners.append(listener)

    def _mark_lost(self, reason: str) -> list[Callable[[Permit], object]]:
        """Mark the permit lost; return the listeners to run (outside any engine lock)."""
        if self._lost is not None or self._released:
            return []
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


class PermitLease:
    """``with budget.lease() as permit:`` -- released however the block exits."""

    __slots__ = ("_budget", "_permit", "_timeout")

    def __init__(self, budget: _Acquirer, timeout: float | None) -> None:
        self._budget = budget
        self._timeout = timeout
        self._permit: Permit | None = None

    def __enter__(self) -> Permit:
        permit = self._budget.acquire(self._timeout)
        self._permit = permit
        return permit

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            self._budget.release(permit)  # quiet for a lost or inherited permit
