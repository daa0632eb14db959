"""The ``lease()`` context manager, shared by pools and their proxies.

``with pool.lease() as item:`` must give the item back however the block ends, including when a
signal handler raises (Ctrl+C, a timeout alarm) at an unlucky instant. CPython runs signal
handlers only at a few places: when a Python function starts, at the back edge of a loop, after
a call to a builtin returns, and (on 3.10) after any call returns -- never between two attribute
or subscript stores. So the handoff of the item between the pool and this object is done through
a *claim*: the leaser records what the call holds in the claim in the same step as it changes its
own state, and whatever interrupts either side finds out from the claim what to give back
(``_settle``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Lease", "Leaser"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Leaser(Protocol[T_co]):
    """What :class:`Lease` needs from a pool or a proxy (the claim is the leaser's own type)."""

    def _new_claim(self) -> Any: ...

    def _acquire_into(self, claim: Any, timeout: float | None) -> T_co: ...

    def _release_claim(self, claim: Any) -> None: ...

    def _settle(self, claim: Any) -> None: ...


class Lease(Generic[T]):
    """The context manager ``lease()`` returns: acquires on entry, always releases on exit.

    An interruption inside ``__enter__`` after the item was leased gives it back before the
    exception propagates; one inside ``__exit__`` still gives the item back.
    """

    __slots__ = ("_claim", "_pool", "_timeout")

    def __init__(self, pool: Leaser[T], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._claim: Any = None

    def __enter__(self) -> T:
        claim = self._claim = self._pool._new_claim()
        try:
            return self._pool._acquire_into(claim, self._timeout)
        except BaseException:
            self._pool._settle(claim)  # a lease granted just before the interruption goes back
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
            raise
