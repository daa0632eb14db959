"""The shared table of a :class:`~safepool.HostBudget`: layout, state transitions, repair.

One segment per budget name (``/dev/shm/safepool-budget-<name>``), laid out as::

    0    header   magic "SPBUDGT1", version, limit, regs (R), waits (W)
    24   hot      token (last fencing token granted == permits granted), waiting, unlinked
    40   counters timeouts, reclaimed, next_ticket, last_reap (CLOCK_MONOTONIC), created
    80   journal  op, slot, entry, token: a hand-off in progress (see grant())
    128  mutex    the robust process-shared mutex (64 bytes)
    192  state bytes, one per record: slots[limit], regs[R], waits[W] (each 64-aligned)
    ...  records: slots[limit] x 32 B, regs[R] x 16 B, waits[W] x 32 B

* A **slot** is one permit: FREE, or HELD by (registration, generation, pid, since, token).
* A **registration** is one open budget object in one process (see :mod:`._hostipc`): USED
  while its OFD lock byte is held; ``gen`` grows at each reuse, so a stale record can never
  look like a newer holder's.
* A **wait entry** is one waiting thread: WAITING (with its FIFO ticket and a futex word), or
  GRANTED (a slot was handed to it: the slot is already HELD in its name).

Invariant, under the mutex: a slot is HELD only by a live registration, or by a dead one that
no one has noticed yet (``reap()`` frees those); ``waiting`` counts WAITING entries; a FREE slot
is never left while an entry is WAITING once ``hand_off()`` ran; ``token`` is >= every HELD
slot's token. Everything is written under the mutex, except that a live holder marks its own
HELD slot FREE without it (one byte store; the slot is its alone), then hands off under the
mutex if anyone waits.

Commit order (so a process killed at any instruction leaves a state ``repair()`` understands):
a slot's fields are written while it is FREE, then its state byte turns HELD (the commit), then
``token`` is stored. A hand-off to a waiter is journaled first (slot, entry, token), and the
journal is cleared last. A dead mutex owner's work is finished or undone by ``repair()``, which
the next ``lock()`` runs; it is idempotent, so a repairer may die too.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from ._hostipc import Futex, RobustMutex, Segment
from .errors import BudgetUnavailable

__all__ = [
    "FREE", "GRANTED", "HEAD", "HELD", "HOT", "MUTEX", "RECLAIMED", "SLOT", "TIMEOUTS", "TOKEN",
    "U32", "U64", "UNLINKED", "WAITING", "Layout", "Table", "lay_out", "locked", "validator",
    "wake",
]  # fmt: skip

logger = logging.getLogger("safepool.hostbudget")

MAGIC = b"SPBUDGT1"
VERSION = 1
REGS = 4096  # budget objects open at once, across the host
WAITS = 4096  # threads waiting at once, across the host
FREE, HELD, GRANTED = 0, 1, 2  # state bytes (USED and WAITING are HELD)
FREE_BYTE, HELD_BYTE = b"\x00", b"\x01"
REAP_INTERVAL = 0.002  # seconds between two liveness sweeps by waiters (across the host)

HEAD = struct.Struct("@8sIIII")  # magic, version, limit, regs, waits
HOT = struct.Struct("@QII")  # token, waiting, unlinked
U64 = struct.Struct("@Q")
U32 = struct.Struct("@I")
_D = struct.Struct("@d")
_JOURNAL = struct.Struct("@III4xQ")  # op, slot, entry, token
SLOT = struct.Struct("@QIII4xd")  # token, reg, gen, pid, since
_OWNER = struct.Struct("@QII")  # the first fields of SLOT: token, reg, gen
REG = struct.Struct("@IId")  # pid, gen, since
WAIT = struct.Struct("@IiIIQI4x")  # word, slot, reg, gen, ticket, pid
TOKEN, WAITING, UNLINKED = 24, 32, 36
TIMEOUTS, RECLAIMED, NEXT_TICKET, LAST_REAP, CREATED = 40, 48, 56, 64, 72
JOURNAL, MUTEX, STATES = 80, 128, 192
_GRANT = 1


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


class Layout:
    """Offsets of a segment for ``limit`` slots."""

    def __init__(self, limit: int, regs: int = REGS, waits: int = WAITS) -> None:
        self.limit, self.regs, self.waits = limit, regs, waits
        self.slot_state = STATES
        self.reg_state = _align(self.slot_state + limit)
        self.wait_state = _align(self.reg_state + regs)
        self.slot_rec = _align(self.wait_state + waits)
        self.reg_rec = self.slot_rec + SLOT.size * limit
        self.wait_rec = self.reg_rec + REG.size * regs
        self.size = _align(self.wait_rec + WAIT.size * waits, 4096)


class Table:
    """One process's view of a budget's segment, and the transitions on it.

    Methods named ``locked_*`` (and ``repair``, ``reap``, ``hand_off``, ``grant``) run with
    the mutex held; they return the futex words to wake, which the caller wakes after unlocking.
    """

    def __init__(self, segment: Segment, layout: Layout, mutex: RobustMutex, futex: Futex) -> None:
        self.segment = segment
        self.mm = segment.mm
        self.layout = layout
        self.mutex = mutex
        self.futex = futex
        self.reg = -1  # our registration, and its generation
        self.gen = 0
        self.pid = 0

    # -- reading -----------------------------------------------------------------------------

    def token(self) -> int:
        return int(U64.unpack_from(self.mm, TOKEN)[0])

    def waiting(self) -> int:
        return int(U32.unpack_from(self.mm, WAITING)[0])

    def unlinked(self) -> bool:
        return bool(U32.unpack_from(self.mm, UNLINKED)[0])

    def counter(self, offset: int) -> int:
        return int(U64.unpack_from(self.mm, offset)[0])

    def _bump(self, offset: int, by: int = 1) -> None:
        U64.pack_into(self.mm, offset, U64.unpack_from(self.mm, offset)[0] + by)

    def positions(self, base: int, count: int, state: bytes) -> list[int]:
        """Indexes of the records whose state byte is ``state`` (scanned at C speed)."""
        mm, end, found = self.mm, base + count, []
        at = mm.find(state, base, end)
        while at >= 0:
            found.append(at - base)
            at = mm.find(state, at + 1, end)
        return found

    def slot(self, s: int) -> tuple[int, int, int, int, float]:
        token, reg, gen, pid, since = SLOT.unpack_from(
            self.mm, self.layout.slot_rec + SLOT.size * s
        )
        return token, reg, gen, pid, since

    def word_address(self, e: int) -> int:
        return self.segment.base + self.layout.wait_rec + WAIT.size * e

    # -- liveness ----------------------------------------------------------------------------

    def alive(self, reg: int, gen: int, cache: dict[int, bool]) -> bool:
        """Whether registration ``reg`` at generation ``gen`` is a live process's (cached per
        sweep: one F_OFD_GETLK per registration)."""
        lay, mm = self.layout, self.mm
        if reg >= lay.regs or mm[lay.reg_state + reg] != HELD:
            return False
        if REG.unpack_from(mm, lay.reg_rec + REG.size * reg)[1] != gen:
            return False
        if reg == self.reg:
            return True
        known = cache.get(reg)
        if known is None:
            known = cache[reg] = self.segment.registration_alive(reg)
        return known

    # -- repair ------------------------------------------------------------------------------

    def repair(self, name: str) -> list[int]:
        """After EOWNERDEAD: finish or undo what the dead owner left, then reap."""
        lay, mm = self.layout, self.mm
        held = self.positions(lay.slot_state, lay.limit, HELD_BYTE)
        top = max([self.token(), *(self.slot(s)[0] for s in held)])
        U64.pack_into(mm, TOKEN, top)  # a grant committed just before the owner died
        wake: list[int] = []
        op, s, e, token = _JOURNAL.unpack_from(mm, JOURNAL)
        committed = op == _GRANT and mm[lay.slot_state + s] == HELD and self.slot(s)[0] == token
        if committed and mm[lay.wait_state + e] == HELD:  # the slot is the waiter's: tell it
            self._mark_granted(e, s)
            wake.append(self.word_address(e))
        _JOURNAL.pack_into(mm, JOURNAL, 0, 0, 0, 0)
        count = len(self.positions(lay.wait_state, lay.waits, HELD_BYTE))
        U32.pack_into(mm, WAITING, count)
        logger.warning("budget %r: a process died inside the budget; state repaired", name)
        return wake + self.reap(name)

    def reap(self, name: str) -> list[int]:
        """Free the slots and wait entries of dead registrations, then hand off free slots."""
        lay, mm = self.layout, self.mm
        cache: dict[int, bool] = {}
        for e in self.positions(lay.wait_state, lay.waits, HELD_BYTE):
            _, _, reg, gen, _, _ = WAIT.unpack_from(mm, lay.wait_rec + WAIT.size * e)
            if not self.alive(reg, gen, cache):
                mm[lay.wait_state + e] = FREE
                U32.pack_into(mm, WAITING, self.waiting() - 1)
        for e in self.positions(lay.wait_state, lay.waits, b"\x02"):
            _, _, reg, gen, _, _ = WAIT.unpack_from(mm, lay.wait_rec + WAIT.size * e)
            if not self.alive(reg, gen, cache):
                mm[lay.wait_state + e] = FREE  # its slot is HELD in its name: freed below
        reclaimed = []
        for s in self.positions(lay.slot_state, lay.limit, HELD_BYTE):
            token, reg, gen, pid, _ = self.slot(s)
            if not self.alive(reg, gen, cache):
                mm[lay.slot_state + s] = FREE
                self._bump(RECLAIMED)
                reclaimed.append((pid, token))
        for reg, alive in cache.items():
            if not alive and mm[lay.reg_state + reg] == HELD:
                mm[lay.reg_state + reg] = FREE
        _D.pack_into(mm, LAST_REAP, time.monotonic())
        if reclaimed:
            self.on_reclaimed(name, reclaimed)
        return self.hand_off()

    def on_reclaimed(self, name: str, reclaimed: list[tuple[int, int]]) -> None:
        """Report permits taken back from dead holders, as (pid, token) pairs."""
        logger.warning(
            "budget %r: took back %d permit(s) from dead holder(s) (pid, token): %s",
            name, len(reclaimed), reclaimed,
        )  # fmt: skip

    def reap_due(self) -> bool:
        return bool(time.monotonic() - _D.unpack_from(self.mm, LAST_REAP)[0] >= REAP_INTERVAL)

    # -- granting ----------------------------------------------------------------------------

    def grant_direct(self, s: int, now: float) -> int:
        """Give FREE slot ``s`` to this process; returns the new token."""
        mm = self.mm
        token = U64.unpack_from(mm, TOKEN)[0] + 1
        SLOT.pack_into(mm, self.layout.slot_rec + SLOT.size * s, token, self.reg, self.gen,
                       self.pid, now)  # fmt: skip
        mm[self.layout.slot_state + s] = HELD  # the commit
        U64.pack_into(mm, TOKEN, token)
        return int(token)

    def free_slot(self) -> int:
        lay = self.layout
        at = self.mm.find(FREE_BYTE, lay.slot_state, lay.slot_state + lay.limit)
        return at - lay.slot_state if at >= 0 else -1

    def hand_off(self) -> list[int]:
        """Give FREE slots to the oldest live waiters, in ticket order; the words to wake."""
        wake: list[int] = []
        cache: dict[int, bool] = {}
        while self.waiting():
            s = self.free_slot()
            if s < 0:
                break
            e = self._oldest_waiter(cache)
            if e < 0:
                break
            self._grant(e, s)
            wake.append(self.word_address(e))
        return wake

    def _oldest_waiter(self, cache: dict[int, bool]) -> int:
        lay, mm = self.layout, self.mm
        while True:
            best, best_ticket = -1, 0
            for e in self.positions(lay.wait_state, lay.waits, HELD_BYTE):
                ticket = WAIT.unpack_from(mm, lay.wait_rec + WAIT.size * e)[4]
                if best < 0 or ticket < best_ticket:
                    best, best_ticket = e, ticket
            if best < 0:
                U32.pack_into(mm, WAITING, 0)
                return -1
            _, _, reg, gen, _, _ = WAIT.unpack_from(mm, lay.wait_rec + WAIT.size * best)
            if self.alive(reg, gen, cache):
                return best
            mm[lay.wait_state + best] = FREE  # a dead waiter: drop it and look again
            U32.pack_into(mm, WAITING, self.waiting() - 1)

    def _grant(self, e: int, s: int) -> None:
        lay, mm = self.layout, self.mm
        _, _, reg, gen, _, pid = WAIT.unpack_from(mm, lay.wait_rec + WAIT.size * e)
        token = U64.unpack_from(mm, TOKEN)[0] + 1
        _JOURNAL.pack_into(mm, JOURNAL, _GRANT, s, e, token)
        SLOT.pack_into(mm, lay.slot_rec + SLOT.size * s, token, reg, gen, pid, time.time())
        mm[lay.slot_state + s] = HELD  # the slot's commit
        U64.pack_into(mm, TOKEN, token)
        self._mark_granted(e, s)
        _JOURNAL.pack_into(mm, JOURNAL, 0, 0, 0, 0)

    def _mark_granted(self, e: int, s: int) -> None:
        lay, mm = self.layout, self.mm
        at = lay.wait_rec + WAIT.size * e
        struct.pack_into("@i", mm, at + 4, s)
        mm[lay.wait_state + e] = GRANTED
        U32.pack_into(mm, WAITING, self.waiting() - 1)
        U32.pack_into(mm, at, 1)  # the futex word: the waiter stops sleeping

    # -- waiting -----------------------------------------------------------------------------

    def enqueue(self) -> int:
        """Add a WAITING entry for this thread; its index."""
        lay, mm = self.layout, self.mm
        at = mm.find(FREE_BYTE, lay.wait_state, lay.wait_state + lay.waits)
        if at < 0:
            raise BudgetUnavailable(f"more than {lay.waits} threads wait for this budget at once")
        e = at - lay.wait_state
        ticket = U64.unpack_from(mm, NEXT_TICKET)[0] + 1
        U64.pack_into(mm, NEXT_TICKET, ticket)
        WAIT.pack_into(mm, lay.wait_rec + WAIT.size * e, 0, -1, self.reg, self.gen, ticket,
                       self.pid)  # fmt: skip
        mm[lay.wait_state + e] = HELD
        U32.pack_into(mm, WAITING, self.waiting() + 1)
        return e

    def entry(self, e: int) -> tuple[int, int, int, int]:
        """(state, slot, reg, gen) of wait entry ``e``."""
        lay = self.layout
        _, s, reg, gen, _, _ = WAIT.unpack_from(self.mm, lay.wait_rec + WAIT.size * e)
        return self.mm[lay.wait_state + e], s, reg, gen

    def dequeue(self, e: int) -> None:
        """Drop this thread's entry (WAITING or GRANTED) after it has looked at it."""
        lay, mm = self.layout, self.mm
        state = mm[lay.wait_state + e]
        if state == FREE:
            return
        mm[lay.wait_state + e] = FREE
        if state == HELD:
            U32.pack_into(mm, WAITING, self.waiting() - 1)

    def mine(self, s: object, token: int) -> bool:
        """Whether slot ``s`` is HELD by this registration with ``token``."""
        lay = self.layout
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < lay.limit:
            return False
        if self.mm[lay.slot_state + s] != HELD:
            return False
        t, reg, gen = _OWNER.unpack_from(self.mm, lay.slot_rec + SLOT.size * s)
        return bool(t == token and reg == self.reg and gen == self.gen)

    def release_mine(self, s: int) -> None:
        self.mm[self.layout.slot_state + s] = FREE

    def release_all_mine(self) -> int:
        """Free every slot this registration holds (closing); how many."""
        count = 0
        for s in self.positions(self.layout.slot_state, self.layout.limit, HELD_BYTE):
            _, reg, gen, _, _ = self.slot(s)
            if reg == self.reg and gen == self.gen:
                self.release_mine(s)
                count += 1
        return count

    def bump_timeouts(self) -> None:
        self._bump(TIMEOUTS)

    # -- registrations -----------------------------------------------------------------------

    def register(self, pid: int, name: str) -> None:
        """Claim a registration for this process (under the mutex)."""
        lay, mm = self.layout, self.mm
        for attempt in range(2):
            for r in self.positions(lay.reg_state, lay.regs, FREE_BYTE):
                if self.segment.lock_registration(r):
                    gen = REG.unpack_from(mm, lay.reg_rec + REG.size * r)[1] + 1
                    REG.pack_into(
                        mm, lay.reg_rec + REG.size * r, pid, gen & 0xFFFFFFFF, time.time()
                    )
                    mm[lay.reg_state + r] = HELD
                    self.reg, self.gen, self.pid = r, gen & 0xFFFFFFFF, pid
                    return
            if attempt == 0:
                self._sweep_registrations(name)
        raise BudgetUnavailable(
            f"budget {name!r} is open in {lay.regs} places at once (the most one budget allows); "
            "close() budgets you no longer use"
        )

    def _sweep_registrations(self, name: str) -> None:
        """Every registration is USED: free the dead ones (and what they held)."""
        lay = self.layout
        for r in self.positions(lay.reg_state, lay.regs, HELD_BYTE):
            if r != self.reg and not self.segment.registration_alive(r):
                self.mm[lay.reg_state + r] = FREE  # what it held is no longer alive()
        self.reap(name)

    def unregister(self) -> None:
        if self.reg >= 0:
            self.mm[self.layout.reg_state + self.reg] = FREE
            self.reg = -1


def lay_out(
    limit: int, mutex_factory: Callable[[Segment], RobustMutex]
) -> Callable[[Segment], None]:
    """The ``lay_out`` callback of :meth:`Segment.open` for a fresh budget of ``limit``."""

    def run(segment: Segment) -> None:
        lay = Layout(limit)
        mm = segment.mm
        mutex_factory(segment).initialise()
        _D.pack_into(mm, CREATED, time.time())
        HEAD.pack_into(mm, 0, b"\0" * 8, VERSION, limit, lay.regs, lay.waits)
        mm[0:8] = MAGIC  # last: the segment is whole

    return run


def validator(path: str, name: str, limit: int) -> Callable[[Segment], None]:
    def run(segment: Segment) -> None:
        _magic, version, have, regs, waits = HEAD.unpack_from(segment.mm, 0)
        if version != VERSION:
            raise BudgetUnavailable(
                f"budget {name!r} ({path}) has layout version {version}; this safepool uses "
                f"{VERSION}: close every process using it, or pick another name"
            )
        if have != limit:
            raise ValueError(
                f"budget {name!r} already exists on this host with limit {have}, not {limit}: "
                f"open it with limit={have}, or unlink() it first"
            )
        if len(segment.mm) != Layout(limit, regs, waits).size:
            raise BudgetUnavailable(f"budget {name!r} ({path}) is damaged: wrong size")

    return run


def locked(table: Table, name: str, body: Callable[[], Any]) -> Any:
    """Run ``body()`` under the table's mutex (repairing first if its owner died); wake whom
    the repair or ``body`` handed permits to, after unlocking."""
    mutex = table.mutex
    wake_list: list[int] = []
    try:
        if mutex.lock():
            wake_list = table.repair(name)
        result = body()
        mutex.unlock()
    except BaseException:
        mutex.unlock_if_mine()
        wake(table, wake_list)
        raise
    wake(table, wake_list)
    return result


def wake(table: Table, addresses: list[int]) -> None:
    for address in addresses:
        table.futex.wake(address)
