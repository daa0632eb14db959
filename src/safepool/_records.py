"""One record per cross-process lease, in the server.

A lease a client process holds on an item of a hosted pool is one :class:`LeaseRecord`. The same
object is reachable from the pool that granted it (``HostedPool._leases``, by token), from the
session of the holder process (``SessionRegistry``, to reclaim it when the process dies) and,
until the client takes the reply that carries it, from the connection it was granted on
(``ServerChannel.unacked``, to take it back if the reply is never taken).

A record ends exactly once: whoever removes it from its pool's ``_leases`` (release, reclaim,
cancel, revoke) ends it; everyone else finds it gone and does nothing. A revoked lease is also
remembered by token (``HostedPool._revoked``), so that its holder's later use or release raises
:class:`~safepool.errors.LeaseRevoked` rather than a plain "no such lease".

Lock order (never the reverse, and never more than these two at once):

1. ``HostedPool._lock`` (guards ``_leases``), released before anything else is taken;
2. ``record.call_lock`` (serialises calls on the leased item; ending a lease waits for a call in
   flight), then nothing;
3. ``SessionRegistry._lock`` and the pool's own lock are leaves: taken alone, never while any
   lock above is held.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["LeaseRecord"]


class LeaseRecord:
    """One item of a hosted pool, leased to one client process, under one token."""

    __slots__ = ("call_lock", "dead", "id", "item", "pool", "revoked", "session", "since", "token")

    def __init__(
        self, pool: Any, token: int, item: Any, session: str | None, lease_id: int = 0
    ) -> None:
        self.pool = pool  # the HostedPool that granted it
        self.token = token
        self.id = lease_id  # small and sequential per pool: what operators see and revoke
        self.item = item
        self.session = session  # the holder process's session id (None: a stdlib client)
        self.since = time.time()
        # Serialises calls on this lease (HostedItem.call) and makes its end wait for a call in
        # flight. Made by the first call, under HostedPool._lock (most leases never make one).
        # dead: the lease has ended (set under call_lock, if there is one).
        self.call_lock: threading.Lock | None = None
        self.dead = False
        # revoked: what an operator had done with the item ("close" or "reset") when the lease
        # was revoked; set under HostedPool._lock, in the step that removes it from _leases.
        self.revoked: str | None = None

    def take_back(self) -> None:
        """The client never took the reply that granted this lease: it goes back to its pool."""
        self.pool.cancel_grant(self)

    def finish(self) -> None:
        """Mark the lease ended, after any call in flight on it. Called once the record left
        HostedPool._leases: a call that found it there has made its call_lock by then."""
        if self.call_lock is None:
            self.dead = True
            return
        with self.call_lock:
            self.dead = True

    def __repr__(self) -> str:
        state = "ended" if self.dead else "live"
        return f"<LeaseRecord {self.token} of {getattr(self.pool, 'name', '?')!r} {state}>"
