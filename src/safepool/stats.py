"""Point-in-time statistics of a pool."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LeaseInfo", "PoolReport", "PoolStats"]


@dataclasses.dataclass(frozen=True, slots=True)
class PoolStats:
    """A consistent snapshot of a pool, taken under the pool's lock.

    Gauges describe the pool now; counters accumulate since the pool was created (or, in a
    forked child, since the fork gave the child its own empty pool).
    """

    name: str
    #: Gauges.
    size: int  #: items that exist or are being made: ``idle + leased + pending``
    idle: int  #: items ready to be leased
    leased: int  #: items currently held by callers
    pending: int  #: slots reserved while an item is being made, checked or closed
    waiting: int  #: callers blocked waiting for an item
    max_size: int
    min_size: int
    #: Counters.
    created: int  #: items the factory made
    closed: int  #: items the pool closed (expired, idle, discarded, failed, pool closed)
    requests: int  #: acquire calls, successful or not
    waits: int  #: acquire calls that had to wait in the queue
    timeouts: int  #: acquire calls that gave up with PoolTimeout
    lost: int  #: items dropped because check or reset failed
    leaks: int  #: leases held longer than leak_timeout
    reclaimed: int  #: leases returned because their holder died
    wait_time: float  #: total seconds callers spent waiting in the queue
    lease_time: float  #: total seconds items spent leased (completed leases)
    revoked: int = 0  #: leases an operator took back from a stopped or hung holder

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (for JSON, logging or metrics)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds one lease, and since when (from ``pool.leases()``)."""

    holder: str  #: a description: "thread 'worker-3'", or "pid 412 (ForkPoolWorker-2) on db1, ..."
    since: float  #: wall-clock time (``time.time()``) the lease began
    held_for: float  #: seconds it has been held
    pid: int | None = None  #: the holder's process, when it is another process
    host: str | None = None  #: the holder's host name, when it is another process
    #: The lease's id in its pool (what ``revoke`` takes); None where leases have no id (an
    #: in-process pool, a lease a same-host client took in a fast-path table itself).
    lease_id: int | None = None
    process: str | None = None  #: the holder's process name, when it is another process
    leaked: bool = False  #: held longer than the pool's ``leak_timeout``

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class PoolReport:
    """One pool of a server, as an operator sees it (``safepool.admin.inspect_server``)."""

    id: str  #: the pool's id in its server
    name: str  #: the pool's name (what ``revoke`` takes, with ``id`` to tell apart equal names)
    share: str  #: "hosted" or "value"
    fast_path: bool  #: whether same-host clients lease in a shared table
    stats: PoolStats
    leases: tuple[LeaseInfo, ...]  #: every lease held, oldest first

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
