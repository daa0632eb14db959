"""The shared table of a by-value pool on the same-host fast path: layout and transitions.

A pool served by a ``PoolManager`` with ``share="value"`` keeps its items in a segment that the
server owns (``/dev/shm/safepool-pool-<pid>-<nonce>``) and that same-host clients map: a client
leases an idle item, and gives it back, under the segment's robust mutex, with no round trip to
the server. The segment extends a :class:`~safepool.HostBudget`'s (:mod:`._hosttable`): the same
mutex, registrations (a process's liveness is an OFD lock the kernel drops when it dies), FIFO
wait entries woken by futexes, journaled hand-offs and repair after a holder died inside the
mutex. What a budget calls a *slot* is here one item's place:

=========  =======================================================================================
state      meaning
=========  =======================================================================================
IDLE       holds an item (its pickled bytes in the payload area), free to lease (a budget's FREE)
LEASED     holds an item leased by (registration, generation, pid, since, token) (a budget's HELD)
EMPTY      no item: room for the server to make one
MAKING     the server is making an item into it (reserved by the server's own registration)
=========  =======================================================================================

After the budget's arrays come the pool header (nonce, counters, the pool's settings), one
:data:`ITEM` record per slot (the item's expiry and last use on CLOCK_MONOTONIC, shared by every
process of the host; its length; a generation) and the payload area (``item_bytes`` per slot;
an item whose pickled bytes do not fit is marked :data:`TOO_LARGE` and fetched from the server).

Who changes what (all under the mutex, except a holder marking its own LEASED slot IDLE, as for
budgets): clients lease IDLE slots, release their own, wait and hand off; only the server makes,
installs and closes items (EMPTY -> MAKING -> IDLE or LEASED -> EMPTY). ``closed`` reuses the
budget's ``unlinked`` word: set, it wakes every waiter, who then raises PoolClosed.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable

from ._hostipc import Futex, RobustMutex, Segment
from ._hosttable import (
    HEAD,
    HELD,
    TOKEN,
    U32,
    U64,
    UNLINKED,
    WAIT,
    WAITING,
    Layout,
    Table,
)
from .errors import BudgetUnavailable

__all__ = [
    "COUNTERS",
    "EMPTY",
    "IDLE",
    "ITEM",
    "LEASED",
    "MAKING",
    "REGS",
    "TOO_LARGE",
    "PoolLayout",
    "PoolTable",
    "lay_out",
    "validator",
]  # fmt: skip

_logger = logging.getLogger("safepool.pool")

MAGIC = b"SPPOOLT1"
VERSION = 1
IDLE, LEASED, EMPTY, MAKING = 0, 1, 3, 4  # slot state bytes (IDLE/LEASED: a budget's FREE/HELD)
IDLE_BYTE, EMPTY_BYTE, MAKING_BYTE = b"\x00", b"\x03", b"\x04"
LEASED_BYTE = b"\x01"
TOO_LARGE = 0xFFFFFFFF  # ITEM length: the bytes are not here, ask the server
REGS = 1024  # processes (and server threads) attached at once
WAITS = 1024  # threads waiting at once

# nonce, requests, waits, lease_time, wait_time, max_waiting, item_bytes
POOL = struct.Struct("@16sQQddII")
ITEM = struct.Struct("@ddII")  # expires, last_used (CLOCK_MONOTONIC), length, generation
# Per registration, written only by its own process: requests made, seconds its leases lasted.
# Folded into the pool's totals when the registration is reused.
COUNTERS = struct.Struct("@Qd")
_REQUESTS, _WAITS, _LEASE_TIME, _WAIT_TIME = 16, 24, 32, 40
_D = struct.Struct("@d")


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class PoolLayout(Layout):
    """A budget's layout for ``limit`` item slots, then the pool header, items and payloads."""

    def __init__(self, limit: int, item_bytes: int, regs: int = REGS, waits: int = WAITS) -> None:
        super().__init__(limit, regs, waits)
        self.item_bytes = item_bytes
        self.pool = _align(self.wait_rec + WAIT.size * waits)
        self.item_rec = _align(self.pool + POOL.size)
        self.payload = _align(self.item_rec + ITEM.size * limit)
        self.reg_counters = _align(self.payload + item_bytes * limit)
        self.size = _align(self.reg_counters + COUNTERS.size * regs, 4096)


class PoolTable(Table):
    """One process's view of a pool's segment (see the module docstring)."""

    layout: PoolLayout
    #: How to name a holder process in logs (the server sets it: its sessions know more).
    describe_pid: Callable[[int], str] = staticmethod(lambda pid: f"pid {pid}")

    def on_reclaimed(self, name: str, reclaimed: list[tuple[int, int]]) -> None:
        for pid, _ in reclaimed:
            _logger.warning(
                "pool %r: %s ended holding a lease; it is back in the pool",
                name,
                self.describe_pid(pid),
            )

    # -- reading -------------------------------------------------------------------------------

    def nonce(self) -> bytes:
        return bytes(self.mm[self.layout.pool : self.layout.pool + 16])

    def closed(self) -> bool:
        return self.unlinked()

    def item(self, s: int) -> tuple[float, float, int, int]:
        """(expires, last_used, length, generation) of slot ``s``'s item."""
        expires, last_used, length, gen = ITEM.unpack_from(
            self.mm, self.layout.item_rec + ITEM.size * s
        )
        return expires, last_used, length, gen

    def payload(self, s: int, length: int) -> bytes:
        start = self.layout.payload + self.layout.item_bytes * s
        return self.mm[start : start + length]

    def count(self, state: bytes) -> int:
        return len(self.positions(self.layout.slot_state, self.layout.limit, state))

    def pool_counter(self, offset: int) -> float:
        """A pool total: the header's, plus (requests, lease time) every registration's own."""
        base = self.layout.pool + offset
        if offset in (_LEASE_TIME, _WAIT_TIME):
            total = float(_D.unpack_from(self.mm, base)[0])
        else:
            total = float(U64.unpack_from(self.mm, base)[0])
        if offset in (_REQUESTS, _LEASE_TIME):
            lay = self.layout
            area = memoryview(self.mm)[
                lay.reg_counters : lay.reg_counters + COUNTERS.size * lay.regs
            ]
            try:  # one C-level pass over every registration's (requests, lease time)
                words = area.cast("Q" if offset == _REQUESTS else "d")
                try:
                    total += sum(words[0 if offset == _REQUESTS else 1 :: 2])
                finally:
                    words.release()
            finally:
                area.release()
        return total

    def register(self, pid: int, name: str) -> None:
        """Claim a registration (under the mutex); what a previous owner of its index counted
        goes into the pool's totals first."""
        super().register(pid, name)
        lay, mm = self.layout, self.mm
        at = lay.reg_counters + COUNTERS.size * self.reg
        requests, lease_time = COUNTERS.unpack_from(mm, at)
        if requests or lease_time:
            req_at = lay.pool + _REQUESTS
            U64.pack_into(mm, req_at, U64.unpack_from(mm, req_at)[0] + requests)
            self.add_time(_LEASE_TIME, lease_time)
            COUNTERS.pack_into(mm, at, 0, 0.0)

    def max_waiting(self) -> int:
        return int(POOL.unpack_from(self.mm, self.layout.pool)[5])

    def empty_slot(self) -> int:
        lay = self.layout
        at = self.mm.find(EMPTY_BYTE, lay.slot_state, lay.slot_state + lay.limit)
        return at - lay.slot_state if at >= 0 else -1

    # -- counters (under the mutex) --------------------------------------------------------------

    def count_request(self) -> None:
        at = self.layout.pool + _REQUESTS
        U64.pack_into(self.mm, at, U64.unpack_from(self.mm, at)[0] + 1)

    def count_wait(self) -> None:
        at = self.layout.pool + _WAITS
        U64.pack_into(self.mm, at, U64.unpack_from(self.mm, at)[0] + 1)

    def add_time(self, offset: int, seconds: float) -> None:
        at = self.layout.pool + offset
        _D.pack_into(self.mm, at, _D.unpack_from(self.mm, at)[0] + seconds)

    # -- the holder's release ------------------------------------------------------------------

    def returned(self, s: int) -> None:
        """Under the mutex: LEASED slot ``s`` goes back IDLE (the lease's time is counted, and
        the item's last use); the caller hands off to waiters next."""
        lay, mm = self.layout, self.mm
        at = lay.item_rec + ITEM.size * s
        expires, _, length, gen = ITEM.unpack_from(mm, at)
        self.add_time(_LEASE_TIME, max(0.0, time.time() - self.slot(s)[4]))
        ITEM.pack_into(mm, at, expires, time.monotonic(), length, gen)
        mm[lay.slot_state + s] = IDLE  # the commit

    # -- the server's side: making and closing items ----------------------------------------------

    def reserve(self) -> int:
        """Under the mutex: an EMPTY slot becomes MAKING (the server's); -1 if none."""
        s = self.empty_slot()
        if s >= 0:
            self.mm[self.layout.slot_state + s] = MAKING
        return s

    def install(self, s: int, data: bytes | None, expires: float, now: float) -> None:
        """Under the mutex: write a new item into MAKING slot ``s`` (``data`` None: too large to
        keep here). The slot stays MAKING: the caller then leases it or makes it idle."""
        lay, mm = self.layout, self.mm
        at = lay.item_rec + ITEM.size * s
        gen = (ITEM.unpack_from(mm, at)[3] + 1) & 0xFFFFFFFF
        if data is not None:
            start = lay.payload + lay.item_bytes * s
            mm[start : start + len(data)] = data
        ITEM.pack_into(mm, at, expires, now, TOO_LARGE if data is None else len(data), gen)

    def grant_made(self, s: int, reg: int, gen: int, pid: int, now: float) -> int:
        """Under the mutex: MAKING slot ``s`` becomes LEASED to registration (reg, gen); the
        new token."""
        mm = self.mm
        token = U64.unpack_from(mm, TOKEN)[0] + 1
        struct.pack_into("@QIII4xd", mm, self.layout.slot_rec + 32 * s, token, reg, gen, pid,
                         time.time())  # fmt: skip
        mm[self.layout.slot_state + s] = HELD  # the commit
        U64.pack_into(mm, TOKEN, token)
        return int(token)

    def set_idle(self, s: int) -> list[int]:
        """Under the mutex: MAKING slot ``s`` becomes IDLE; then hand off to waiters."""
        self.mm[self.layout.slot_state + s] = IDLE
        return self.hand_off()

    def set_empty(self, s: int) -> list[int]:
        """Under the mutex: slot ``s`` (its item closed) becomes EMPTY. Waiters are woken to
        look again (one of them asks the server for a new item)."""
        lay = self.layout
        self.mm[lay.slot_state + s] = EMPTY
        return [self.word_address(e) for e in self.positions(lay.wait_state, lay.waits, b"\x01")]

    def set_closed(self) -> list[int]:
        """Under the mutex: the pool is closed; every waiter is woken (and raises)."""
        U32.pack_into(self.mm, UNLINKED, 1)
        lay = self.layout
        waiters = self.positions(lay.wait_state, lay.waits, b"\x01")
        for e in waiters:
            U32.pack_into(self.mm, lay.wait_rec + WAIT.size * e, 1)
        return [self.word_address(e) for e in waiters]

    def leased_by(self, reg: int, gen: int) -> list[int]:
        """The slots LEASED by registration (reg, gen)."""
        lay = self.layout
        return [s for s in self.positions(lay.slot_state, lay.limit, LEASED_BYTE)
                if self.slot(s)[1:3] == (reg, gen)]  # fmt: skip

    def waiting_count(self) -> int:
        return int(U32.unpack_from(self.mm, WAITING)[0])


def lay_out(
    limit: int,
    item_bytes: int,
    nonce: bytes,
    max_waiting: int,
    mutex_factory: Callable[[Segment], RobustMutex],
) -> Callable[[Segment], None]:
    """The ``lay_out`` callback of :meth:`Segment.open` for a new pool table."""

    def run(segment: Segment) -> None:
        lay = PoolLayout(limit, item_bytes)
        mm = segment.mm
        mutex_factory(segment).initialise()
        mm[lay.slot_state : lay.slot_state + limit] = EMPTY_BYTE * limit
        for s in range(limit):
            ITEM.pack_into(mm, lay.item_rec + ITEM.size * s, math.inf, 0.0, 0, 0)
        POOL.pack_into(mm, lay.pool, nonce, 0, 0, 0.0, 0.0, max_waiting, item_bytes)
        HEAD.pack_into(mm, 0, b"\0" * 8, VERSION, limit, lay.regs, lay.waits)
        mm[0:8] = MAGIC  # last: the segment is whole

    return run


def validator(nonce: bytes) -> Callable[[Segment], None]:
    """Accept only the server's segment: same layout version and the nonce it announced."""

    def run(segment: Segment) -> None:
        _magic, version, limit, regs, waits = HEAD.unpack_from(segment.mm, 0)
        if version != VERSION:
            raise BudgetUnavailable(f"pool table version {version}, expected {VERSION}")
        item_bytes = POOL.unpack_from(segment.mm, PoolLayout(limit, 0, regs, waits).pool)[6]
        lay = PoolLayout(limit, item_bytes, regs, waits)
        if len(segment.mm) != lay.size or POOL.unpack_from(segment.mm, lay.pool)[0] != nonce:
            raise BudgetUnavailable("not this server's pool table")

    return run


def open_table(segment: Segment, mutex: RobustMutex, futex: Futex) -> PoolTable:
    _magic, _version, limit, regs, waits = HEAD.unpack_from(segment.mm, 0)
    item_bytes = POOL.unpack_from(segment.mm, PoolLayout(limit, 0, regs, waits).pool)[6]
    return PoolTable(segment, PoolLayout(limit, item_bytes, regs, waits), mutex, futex)
