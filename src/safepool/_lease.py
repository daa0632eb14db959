"""The ``lease()`` context manager, shared by pools and their proxies.

``with pool.lease() as item:`` must give the item back however the block ends, including when a
signal handler raises (Ctrl+C, a timeout alarm) at an unlucky instant. CPython runs signal
handlers only at a few places: when a Python function starts, at the back edge of a loop, after
a call to a builtin returns, and (on 3.10) after any call returns -- never between two attribute
or subscript stores. So the handoff of the item between the pool and this object is done through
a *claim*: the leaser records what the call holds in the claim in the same step as it changes its
own state, and whatever interrupts either side finds out from the claim what to give back
(``_settle``).

One instant is out of reach of any ``try``: the first instruction of ``__exit__`` itself, which
``with`` calls from C. An exception raised there leaves the lease object holding its claim. For
that case the lease keeps a weak reference to itself whose callback is the leaser's orphan sink,
a ``deque.append``: when the lease object is collected still holding its claim (in CPython, as
soon as the exception has been handled), the reference lands in the leaser's orphan queue,
which the leaser's next operation settles (a proxy's sink is a ``SimpleQueue.put`` instead, and
a thread settles it at once: see safepool._settler). The callback is C code: it runs no Python
frame, so it can neither swallow a signal nor take a lock in the middle of the leaser's own
critical section (a collection can happen anywhere). The leaser keeps the reference reachable
(``_lease_refs``) until the lease ends cleanly, because the cyclic garbage collector calls no
callback of a weak reference that is itself garbage -- and an exception's traceback often is
part of a cycle (the lease then goes back when the collector next runs, usually within
milliseconds in a busy program, rather than at once). A clean exit drops the reference, so the
callback never fires for it. This costs about 0.3 us per ``with`` block.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Lease", "LeaseRef", "Leaser"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class LeaseRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to a :class:`Lease`, carrying the lease's claim (and its leaser) to the
    orphan queue."""

    __slots__ = ("claim", "owner")
    claim: Any
    owner: Any


class Leaser(Protocol[T_co]):
    """What :class:`Lease` needs from a pool or a proxy (the claim is the leaser's own type).

    ``_orphan_sink`` must be a C-level callable (a deque's ``append``): it receives a
    :class:`LeaseRef` whose lease was collected still holding its claim. ``_lease_refs`` holds
    the references of the leases in progress (see the module docstring).
    """

    _orphan_sink: Callable[[LeaseRef], object]
    _lease_refs: set[LeaseRef]

    def _new_claim(self) -> Any: ...

    def _acquire_into(self, claim: Any, timeout: float | None) -> T_co: ...

    def _release_claim(self, claim: Any) -> None: ...

    def _settle(self, claim: Any) -> None: ...


class Lease(Generic[T]):
    """The context manager ``lease()`` returns: acquires on entry, always releases on exit.

    An interruption inside ``__enter__`` after the item was leased gives it back before the
    exception propagates; one inside ``__exit__`` still gives the item back.
    """

    __slots__ = ("__weakref__", "_claim", "_pool", "_ref", "_timeout")

    def __init__(self, pool: Leaser[T], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._claim: Any = None
        self._ref: LeaseRef | None = None

    def __enter__(self) -> T:
        pool = self._pool
        claim = pool._new_claim()
        ref = LeaseRef(self, pool._orphan_sink)
        ref.claim = claim
        ref.owner = pool
        pool._lease_refs.add(ref)  # if this object dies holding the claim, the leaser hears
        self._ref = ref
        self._claim = claim
        try:
            return pool._acquire_into(claim, self._timeout)
        except BaseException:
            pool._settle(claim)  # a lease granted just before the interruption goes back
            self._end()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        claim = self._claim
        try:
            self._pool._release_claim(claim)
        except BaseException as error:
            if not isinstance(error, Exception):
                self._pool._settle(claim)  # the release was cut short: finish it
            self._end()
            raise
        self._end()

    def _end(self) -> None:
        """A clean end: the weak reference goes, and its callback with it."""
        ref, self._ref = self._ref, None
        self._pool._lease_refs.discard(ref)
