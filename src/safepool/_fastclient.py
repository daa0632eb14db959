"""The client side of the same-host fast path: a by-value proxy leasing from its pool's table.

:class:`FastLeasing` is mixed into :class:`~safepool.PoolProxy`. On a proxy's first lease in a
process it asks the server once for the pool's table (``fast_path``); if the table is there
(the same host), leases and releases go through it (:mod:`._fastlease`) and the server is only
asked to make an item (``fill``), to replace an expired one or take a discard
(``release_slot``), or for an item too large for the table (``value``). Otherwise -- another
host, a hosted pool, an old server -- the proxy keeps the round-trip path.

A fast lease's token is kept *negative* in the proxy's bookkeeping (``_by_id``, the claim), so
it can never be taken for a round-trip lease's (random, positive) token.
"""

from __future__ import annotations

import pickle
import threading
from typing import Any

from ._fastlease import TableLeaser, attach
from .errors import LeaseError

__all__ = ["FastLeasing"]

_UNKNOWN = None  # not asked yet (in this process)
_NO_OFFER = object()  # nothing told when the proxy was made (see _offer_fast_path)


class FastLeasing:
    """Fast-path leasing for a proxy (see the module docstring). The proxy provides
    ``_callmethod``, ``_forget``, ``_leases_lock``, ``_by_id`` and ``_token``."""

    _fast: TableLeaser | bool | None
    _fast_slots: dict[int, int]  # -token -> slot, for this process's fast leases
    _leases_lock: threading.Lock
    _by_id: dict[int, tuple[object, list[int]]]

    def _callmethod(self, methodname: str, args: tuple[Any, ...] = ()) -> Any: ...

    def _forget(self, item: object, token: int) -> None: ...

    def _reset_fast(self) -> None:
        self._fast = _UNKNOWN
        self._fast_offer: Any = _NO_OFFER
        self._fast_slots = {}

    def _offer_fast_path(self, descriptor: dict[str, Any] | None) -> None:
        """What ``fast_path`` returned when the pool was created (in the same reply): the first
        lease uses it instead of asking."""
        self._fast_offer = descriptor

    def _fast_leaser(self) -> TableLeaser | None:
        """This process's leaser for the pool's table; None to use round trips."""
        fast = self._fast
        if fast is _UNKNOWN:
            descriptor, self._fast_offer = self._fast_offer, _NO_OFFER
            if descriptor is _NO_OFFER:
                descriptor = self._callmethod("fast_path")
            leaser = attach(descriptor, str(descriptor["name"])) if descriptor else None
            with self._leases_lock:
                if self._fast is _UNKNOWN:
                    self._fast = leaser if leaser is not None else False
                fast = self._fast
        return fast if isinstance(fast, TableLeaser) else None

    def _fast_acquire(self, leaser: TableLeaser, claim: Any, timeout: float | None) -> Any:
        lease: list[Any] = []  # (slot, token): stored by C code (extend), where handlers see it
        try:
            while True:
                lease.extend(map(leaser.lease, (timeout,), (self._fill,)))
                s, token = lease[-1]
                data, expired = leaser.payload(s)
                if not expired:
                    break
                self._callmethod("release_slot", (s, token, True))  # the server replaces it
                lease.clear()
            if data is None:  # too large for the table
                data = self._callmethod("value", (s, token))
            item = pickle.loads(data)
            claim.item = item
            claim.token = -token
            self._fast_slots[-token] = s
            with self._leases_lock:
                self._by_id.setdefault(id(item), (item, []))[1].append(-token)
        except BaseException:
            if claim.token is not None:
                self._fast_settle(claim)
            elif lease and lease[-1] is not None and leaser.holds(*lease[-1]):
                self._give_back_slot(leaser, *lease[-1], discard=False)
            raise
        return item

    def _fill(self, reg: int, gen: int, pid: int) -> tuple[int, int] | None:
        granted = self._callmethod("fill", (reg, gen, pid))
        return None if granted is None else (int(granted[0]), int(granted[1]))

    def _fast_release(self, item: object, local: int, discard: bool) -> None:
        leaser = self._fast
        s = self._fast_slots.get(local)
        if not isinstance(leaser, TableLeaser) or s is None:
            raise LeaseError(f"this {type(item).__name__} is not leased through this proxy")
        try:
            self._forget_fast(item, local)  # from here on the release happens, whatever interrupts
            if discard or not leaser.give_back(s, -local):
                self._callmethod("release_slot", (s, -local, discard))
        except BaseException as exc:
            self._forget(item, local)
            if not isinstance(exc, Exception) and leaser.holds(s, -local):
                self._give_back_slot(leaser, s, -local, discard=discard)
            raise

    def _forget_fast(self, item: object, local: int) -> None:
        """This process no longer holds the fast lease ``local`` of ``item`` (idempotent)."""
        with self._leases_lock:
            held = self._by_id.get(id(item))
            if held is not None and held[0] is item and local in held[1]:
                held[1].remove(local)
                if not held[1]:
                    del self._by_id[id(item)]
            self._fast_slots.pop(local, None)

    def _fast_settle(self, claim: Any) -> None:
        leaser, local = self._fast, claim.token
        s = self._fast_slots.get(local)
        self._forget(claim.item, local)
        if isinstance(leaser, TableLeaser) and s is not None and leaser.holds(s, -local):
            self._give_back_slot(leaser, s, -local, discard=False)

    def _give_back_slot(self, leaser: TableLeaser, s: int, token: int, *, discard: bool) -> None:
        if discard or not leaser.give_back(s, token):
            self._callmethod("release_slot", (s, token, discard))
