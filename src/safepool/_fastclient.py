"""The client side of the same-host fast path: a by-value proxy leasing from its pool's table.

:class:`FastLeasing` is mixed into :class:`~safepool.PoolProxy`. On a proxy's first lease in a
process it asks the server once for the pool's table (``fast_path``); if the table is there
(the same host), leases and releases go through it (:mod:`._fastlease`) and the server is only
asked to make an item (``fill``), to replace an expired one or take a discard
(``release_slot``), or for an item too large for the table (``value``). Otherwise -- another
host, a hosted pool, an old server -- the proxy keeps the round-trip path.

A fast lease's token is kept *negative* in the proxy's bookkeeping (``_by_id``, the claim), so
it can never be taken for a round-trip lease's (random, positive) token, and carries its slot:
``-(table token << 32 | slot)``.
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any

from ._fastlease import TableLeaser, attach
from ._fasttable import ITEM, TOO_LARGE
from .errors import LeaseError

__all__ = ["FastLeasing"]

_UNKNOWN = None  # not asked yet (in this process)
_NO_OFFER = object()  # nothing told when the proxy was made (see _offer_fast_path)
_SLOT_BITS = 32  # a fast lease's local token: -(table token << _SLOT_BITS | slot)
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_item, _ITEM_SIZE = ITEM.unpack_from, ITEM.size  # expires, last used, length, generation
_NEVER = float("inf")  # the expiry of an item without max_lifetime


def split_local(local: int) -> tuple[int, int]:
    """(slot, table token) of a fast lease's local token."""
    value = -local
    return value & _SLOT_MASK, value >> _SLOT_BITS


class FastLeasing:
    """Fast-path leasing for a proxy (see the module docstring). The proxy provides
    ``_callmethod``, ``_forget``, ``_send_release``, ``_leases_lock``, ``_by_id``,
    ``_inherited`` and ``_token``."""

    _fast: TableLeaser | bool | None
    _leases_lock: threading.Lock
    _by_id: dict[int, tuple[object, list[int]]]
    _inherited: set[int]

    def _callmethod(self, methodname: str, args: tuple[Any, ...] = ()) -> Any: ...

    def _forget(self, item: object, token: int) -> None: ...

    def _send_release(self, item: object, token: int, discard: bool) -> None: ...

    def _reset_fast(self) -> None:
        self._fast = _UNKNOWN
        self._fast_offer: Any = _NO_OFFER

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

    def _fast_acquire(
        self, leaser: TableLeaser, lease: list[Any], claim: Any, timeout: float | None
    ) -> Any:
        """Lease through the table. The lease is recorded in ``lease`` (by C code, as it is
        made), ``_by_id`` and ``claim`` (None for a plain acquire()); the caller's handler
        gives it back with :meth:`_fast_undo` if anything interrupts, here or in its own frame
        once this returned (Python 3.10 runs signal handlers there)."""
        mm, items, payloads, size = leaser.copies
        while True:
            leaser.lease_into(lease, timeout, self._fill)
            s, token = lease[-1]
            expires, _, length, _ = _item(mm, items + _ITEM_SIZE * s)
            if expires == _NEVER or expires > time.monotonic():
                break
            self._callmethod("release_slot", (s, token, True))  # the server replaces it
            lease.clear()
        if length == TOO_LARGE:  # not in the table: the server sends it
            data = self._callmethod("value", (s, token))
        else:
            start = payloads + size * s
            data = mm[start : start + length]
        item = pickle.loads(data)
        local = -((token << _SLOT_BITS) | s)
        if claim is not None:
            claim.item = item
            claim.token = local
        with self._leases_lock:
            self._by_id.setdefault(id(item), (item, []))[1].append(local)
        return item

    def _fast_undo(self, leaser: TableLeaser, lease: list[Any]) -> None:
        """An acquire was cut short: the lease it made last (``lease[-1]``), if any, is
        forgotten here and goes back to the table."""
        if not lease:
            return
        s, token = lease[-1]
        local = -((token << _SLOT_BITS) | s)
        with self._leases_lock:
            for key, (_, tokens) in self._by_id.items():
                if local in tokens:
                    tokens.remove(local)
                    if not tokens:
                        del self._by_id[key]
                    break
        if leaser.holds(s, token):
            self._give_back_slot(leaser, s, token, discard=False)

    def _fill(self, reg: int, gen: int, pid: int) -> tuple[int, int] | None:
        granted = self._callmethod("fill", (reg, gen, pid))
        return None if granted is None else (int(granted[0]), int(granted[1]))

    def _fast_release(self, leaser: TableLeaser, item: object, discard: bool) -> None:
        """Release ``item``, leased through this proxy's table (one lock for the bookkeeping:
        from the moment its token leaves ``_by_id`` the release happens, whatever interrupts)."""
        local = 0
        try:
            with self._leases_lock:
                held = self._by_id.get(id(item))
                if held is None or held[0] is not item or not held[1]:
                    if id(item) in self._inherited:
                        self._inherited.discard(id(item))
                        return  # leased by the parent before a fork: not ours to release
                    raise LeaseError(
                        f"this {type(item).__name__} is not leased through this proxy (never "
                        "leased, leased from another pool, or already released)"
                    )
                tokens = held[1]
                local = tokens[-1]
                if local < 0:
                    tokens.pop()
                    if not tokens:
                        del self._by_id[id(item)]
            if local > 0:  # a round-trip lease (not made by this process's table)
                self._send_release(item, local, discard)
                return
            value = -local
            s, token = value & _SLOT_MASK, value >> _SLOT_BITS
            if discard or not leaser.give_back(s, token):
                self._callmethod("release_slot", (s, token, discard))
        except BaseException as exc:
            if local < 0:
                self._forget(item, local)
                s, token = split_local(local)
                if not isinstance(exc, Exception) and leaser.holds(s, token):
                    self._give_back_slot(leaser, s, token, discard=discard)
            raise

    def _fast_settle(self, claim: Any) -> None:
        leaser, local = self._fast, claim.token
        self._forget(claim.item, local)
        s, token = split_local(local)
        if isinstance(leaser, TableLeaser) and leaser.holds(s, token):
            self._give_back_slot(leaser, s, token, discard=False)

    def _give_back_slot(self, leaser: TableLeaser, s: int, token: int, *, discard: bool) -> None:
        if discard or not leaser.give_back(s, token):
            self._callmethod("release_slot", (s, token, discard))
