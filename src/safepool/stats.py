"""Point-in-time statistics of a pool."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["LeaseInfo", "PoolStats"]


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

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
