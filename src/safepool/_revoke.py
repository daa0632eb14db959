"""Taking a lease back from a stopped or hung holder: the pieces :class:`HostedPool` uses.

An operator revokes a lease by its id (``pool.revoke(lease_id, action=...)``, or
``python -m safepool revoke``). Revoking is one more way a :class:`~safepool._records.LeaseRecord`
ends, and follows the same rule as release, reclaim and cancel (see :mod:`safepool._records`):
whoever removes the record from ``HostedPool._leases`` ends it. The named transition is
``HostedPool._locked_revoke``: under the pool's ``_lock`` it removes the record, marks it revoked
and remembers its token here, in one step. A release racing it either removed the record first
(the revoke then finds no such lease and changes nothing) or finds it gone and, through this
memory, raises :class:`~safepool.errors.LeaseRevoked`. Either way the item goes back exactly once.

A lease whose holder is running a call on the item in the server right now (``item.call``) is
not revoked: the item is in use by a server thread, and giving it to someone else would be a
double lease. The operator is told so, and can revoke once the call returns.
"""

from __future__ import annotations

import collections
from typing import Any

from .errors import LeaseError, LeaseRevoked

__all__ = ["ACTIONS", "RevokedLeases", "check_action", "check_lease_id"]

#: What revoking does with the item: close it, or return it to the pool after its reset hook.
ACTIONS = ("close", "reset")

_KEPT = 4096  # revoked tokens remembered per pool (older ones answer "no such lease")


def check_action(action: Any) -> str:
    if action not in ACTIONS:
        raise ValueError(
            f"action must be 'close' (close the item) or 'reset' (return it to the pool after "
            f"the pool's reset hook), got {action!r}"
        )
    return str(action)


def check_lease_id(lease_id: Any) -> int:
    if isinstance(lease_id, bool) or not isinstance(lease_id, int) or lease_id < 1:
        raise TypeError(
            f"lease_id must be a lease's id, a positive int (as pool.leases() and "
            f"`python -m safepool inspect` show it), got {lease_id!r}"
        )
    return lease_id


class RevokedLeases:
    """The tokens of the leases a pool revoked, newest last, at most ``_KEPT``.

    Not locked itself: the owning HostedPool's ``_lock`` guards it.
    """

    __slots__ = ("_by_token",)

    def __init__(self) -> None:
        # token -> (lease id, action, holder's session id)
        self._by_token: collections.OrderedDict[int, tuple[int, str, str | None]] = (
            collections.OrderedDict()
        )

    def add(self, token: int, lease_id: int, action: str, session: str | None) -> None:
        self._by_token[token] = (lease_id, action, session)
        if len(self._by_token) > _KEPT:
            self._by_token.popitem(last=False)

    def error(self, pool: str, token: int, session: str | None) -> LeaseRevoked | None:
        """The error for the holder's use of revoked lease ``token``; None if it is not one
        (or ``session`` is not the holder's)."""
        found = self._by_token.get(token)
        if found is None:
            return None
        lease_id, action, holder = found
        if holder is not None and session is not None and holder != session:
            return None
        return revoked_error(pool, lease_id, action)


def revoked_error(pool: str, lease_id: int, action: str) -> LeaseRevoked:
    what = (
        "its item was closed"
        if action == "close"
        else "its item went back to the pool (after the pool's reset hook) and may be in "
        "another holder's hands now"
    )
    return LeaseRevoked(
        f"pool {pool!r}: lease {lease_id} was revoked by an operator while this process held it "
        f"(it was stopped or hung); {what}. Lease a new item",
        pool=pool,
        lease_id=lease_id,
        action=action,
    )


def busy_error(pool: str, lease_id: int) -> LeaseError:
    return LeaseError(
        f"pool {pool!r}: lease {lease_id} is running a call on its item in the server right "
        "now; it cannot be revoked until that call returns (revoking would hand an item in use "
        "to someone else). Try again, or stop the work the call is doing"
    )


def unknown_error(pool: str, lease_id: int, held: list[int]) -> LeaseError:
    shown = ", ".join(map(str, held[:20])) or "none"
    return LeaseError(
        f"pool {pool!r}: no lease {lease_id} is held (it was released, reclaimed or revoked "
        f"meanwhile, or never existed); leases held now: {shown}"
    )
