"""Leasing from a pool table: the same-host fast path, for client processes and the server.

A :class:`TableLeaser` is one registration in one pool table (:mod:`._fasttable`). Clients
attach once per process (:func:`attach`); the server has its own, to lease for remote clients.

``lease_into()`` takes an IDLE item under the table's mutex with no system call when one is
free and nobody waits; asks the server for a new item (``fill``: one round trip) when there is
room for one; or queues (FIFO, with ``max_waiting``) and sleeps on a futex until an item is
handed over.
``give_back()`` marks the holder's own slot IDLE and hands it to the oldest waiter. Every
state change follows the rules of :mod:`._poolstate` and :mod:`._hosttable`: computed first,
committed by one state byte, and recorded (in ``got``) where an interruption's handler finds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable, Collection
from typing import Any

from . import _fork
from ._fasttable import (
    COUNTERS,
    IDLE,
    ITEM,
    REGS,
    PoolLayout,
    PoolTable,
    lay_out,
    open_table,
    validator,
)
from ._hostipc import SHM_DIR, Futex, RobustMutex, Segment, has_live_registration, require_platform
from ._hosttable import (
    GRANTED,
    HELD,
    HOT,
    MUTEX,
    SLOT,
    TOKEN,
    WAITING,
    locked,
    wake,
)
from .errors import (
    BudgetUnavailable,
    ManagerUnavailable,
    PoolClosed,
    PoolTimeout,
    TooManyWaiting,
)

__all__ = ["Fill", "TableLeaser", "attach", "create_table", "detach_finished", "sweep_stale_tables"]

logger = logging.getLogger(__name__)

#: The server's fill(reg, gen, pid): (slot, token) of a new item leased to that registration,
#: or None when there is no room for one right now.
Fill = Callable[[int, int, int], "tuple[int, int] | None"]

_hot = HOT.unpack_from
_slot_pack = SLOT.pack_into
_owner = struct.Struct("@QII").unpack_from  # a slot record's token, registration, generation
_SLOT_SIZE = SLOT.size
_SLOT_DOUBLES, _ITEM_DOUBLES = SLOT.size // 8, ITEM.size // 8  # a record's slots in a "d" view
_EOWNERDEAD = errno.EOWNERDEAD
_FIRST_SLICE, _MAX_SLICE = 0.001, 0.010  # waiters re-check (dead holders, deadlines) this often
_SERVER_CHECK = 0.005  # seconds a fast lease or release trusts the last check that the server lives


def _view(mm: Any, start: int, size: int, fmt: str) -> Any:
    """``size`` bytes of the table from ``start``, as an array of ``fmt`` (one struct code):
    a memoryview whose items are ints or floats (typed Any: typeshed's are bytes-like)."""
    area: Any = memoryview(mm)[start : start + size]
    return area.cast(fmt)


class _Cancelled:
    """A wait the server cancels because the remote client it waits for went away."""

    __slots__ = ("address", "reason")

    def __init__(self) -> None:
        self.reason: BaseException | None = None
        self.address = 0


class TableLeaser:
    """Leases items of one pool table as one registration of this process."""

    def __init__(
        self, table: PoolTable, name: str, timeout: float, server: tuple[int, int] | None = None
    ) -> None:
        self.table = table
        self.name = name
        self.timeout = timeout
        self._server = server  # the server's (registration, generation); None: we are it
        self._checked = 0.0  # when the server was last seen alive
        self._dead: ManagerUnavailable | None = None  # once seen dead, always dead
        libc = require_platform()
        lay = table.layout
        mm = table.mm
        # Typed views of the records the hot paths touch: a subscript load or store makes no
        # call, so a run of them is never interrupted by a signal handler, nor entered by
        # another thread of this process (the GIL changes hands only where a handler could
        # run). This registration's counters are written by this process only: requests under
        # the table's mutex, the seconds its leases lasted by give_back()'s run of stores.
        counters = lay.reg_counters + COUNTERS.size * table.reg
        self._requests = _view(mm, counters, 8, "Q")  # [0]: this registration's requests
        self._held_for = _view(mm, counters + 8, 8, "d")  # [0]: its leases' seconds, summed
        self._flags = _view(mm, WAITING, 8, "I")  # [0]: waiters, [1]: closed (unlinked)
        self._tokens = _view(mm, TOKEN, 8, "Q")  # [0]: the last token granted
        #: Where a leased item's record and pickled bytes are (mm, item records, payloads, bytes
        #: per payload): a client reads its copy from there (safepool._fastclient).
        self.copies = (mm, lay.item_rec, lay.payload, lay.item_bytes)
        self._me = (table.reg, table.gen, table.pid)  # what a lease's slot record names
        since = _view(mm, lay.slot_rec, SLOT.size * lay.limit, "d")  # [4s + 3]: slot s leased at
        items = _view(mm, lay.item_rec, ITEM.size * lay.limit, "d")  # [3s]: expires, [3s + 1]: used
        self._back = (mm, lay.slot_state, lay.slot_rec, table.reg, table.gen, since, items)
        self._fast = (mm, libc.fast_trylock, libc.fast_unlock,
                      ctypes.c_void_p(table.segment.base + MUTEX), lay.slot_state,
                      lay.slot_state + lay.limit, lay.slot_rec, *self._me)  # fmt: skip

    # -- leasing --------------------------------------------------------------------------------

    def lease_into(
        self, out: list[Any], timeout: float | None, fill: Fill, hook: Any = None
    ) -> None:
        """Append to ``out`` the (slot, token) of an item now LEASED to this registration,
        waiting up to ``timeout`` seconds (None: the pool's). Raises PoolTimeout,
        TooManyWaiting, PoolClosed. An interruption before this returns gives the item back;
        once it has returned, the lease is in ``out`` (appended by C code) for the caller's
        handlers."""
        mm, trylock, unlock, mutex, state, end, rec, reg, gen, pid = self._fast
        if self._server is not None and (
            time.monotonic() - self._checked >= _SERVER_CHECK or self._dead is not None
        ):
            self.check_server()
        s = token = -1
        try:
            rc = trylock(mutex)
            if rc == 0:
                token, waiting, closed = _hot(mm, TOKEN)
                if not (waiting or closed):
                    at = mm.find(b"\0", state, end)  # an IDLE item
                    if at >= 0:
                        s = at - state
                        token += 1
                        _slot_pack(mm, rec + _SLOT_SIZE * s, token, reg, gen, pid, time.time())
                        self._tokens[0] = token
                        mm[at] = HELD  # the commit
                        self._requests[0] += 1  # under the mutex: no other thread counts
                        out.append((s, token))
                        unlock(mutex)
                        return
                unlock(mutex)
            elif rc == _EOWNERDEAD:
                self.table.mutex.make_consistent()
                wake(self.table, self.table.repair(self.name))
                unlock(mutex)
            out.extend(map(self._lease_slow, (timeout,), (fill,), (hook,)))
        except BaseException:
            self.table.mutex.unlock_if_mine()
            if s >= 0 and self.table.mine(s, token):  # leased, interrupted before returning
                self._return(s)
            raise

    def _lease_slow(self, timeout: float | None, fill: Fill, hook: Any) -> tuple[int, int]:
        budget = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        got: list[Any] = []  # (slot, token) once leased: the handlers below look here
        entry: list[int] = []  # our wait entry, while we wait
        counted: list[bool] = []  # the request is counted once, however many rounds it takes
        try:
            while True:
                step = locked(
                    self.table, self.name, lambda: self._take(got, entry, budget, counted)
                )
                if got and got[-1] is not None:
                    return got[-1]  # type: ignore[no-any-return]
                if step == "fill":
                    got.extend(map(fill, (self.table.reg,), (self.table.gen,), (self.table.pid,)))
                    if got[-1] is not None:
                        return got[-1]  # type: ignore[no-any-return]
                    continue  # no room after all: queue
                if self._wait(entry, deadline, budget, got, hook):
                    return got[-1]  # type: ignore[no-any-return]
        except BaseException:
            self._abandon(got, entry)
            raise

    def _take(self, got: list[Any], entry: list[int], budget: float, counted: list[bool]) -> str:
        """Under the mutex: lease an IDLE item (when nobody waits), or say "fill" (there is room
        for a new one), or queue (appending our wait entry to ``entry``)."""
        table = self.table
        if table.closed():
            raise PoolClosed(f"pool {self.name!r} is closed")
        if not counted:
            counted.append(True)
            table.count_request()
        if not table.waiting():
            s = table.free_slot()
            if s >= 0:
                token = table.token() + 1
                got.append((s, token))
                table.grant_direct(s, time.time())
                return "leased"
        if table.empty_slot() >= 0:
            return "fill"
        most = table.max_waiting()
        if most and table.waiting() >= most:
            raise TooManyWaiting(
                f"pool {self.name!r}: {table.waiting()} callers are already waiting "
                f"(max_waiting={most})"
            )
        if budget == 0:
            table.bump_timeouts()
            raise PoolTimeout(f"pool {self.name!r}: no item available within 0s (all leased)")
        e = table.enqueue()
        entry.append(e)
        table.count_wait()
        return "wait"

    def _wait(
        self, entry: list[int], deadline: float, budget: float, got: list[Any], hook: Any
    ) -> bool:
        """Sleep until our entry is granted (True), or there may be room for a new item again
        (False: the caller tries again); raises on timeout, close, or cancellation."""
        table, e = self.table, entry[-1]
        address = table.word_address(e)
        cancelled = _Cancelled()
        cancelled.address = address
        if hook is not None:
            hook.waiting(lambda reason: self._cancel(cancelled, reason))
        started = time.monotonic()
        pause = _FIRST_SLICE
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining > 0 and cancelled.reason is None:
                    table.futex.wait(address, 0, min(remaining, pause))
                    pause = min(pause * 2, _MAX_SLICE)
                outcome = locked(
                    table, self.name, lambda: self._check(entry, deadline, budget, got, cancelled)
                )
                if outcome is not None:
                    return bool(outcome)
        finally:
            if hook is not None:
                hook.done_waiting()
            locked(table, self.name, lambda: table.add_time(40, time.monotonic() - started))

    def _check(
        self,
        entry: list[int],
        deadline: float,
        budget: float,
        got: list[Any],
        cancelled: _Cancelled,
    ) -> bool | None:
        """Under the mutex: what became of our wait entry."""
        table, e = self.table, entry[-1]
        state, s, _, _ = table.entry(e)
        if state != GRANTED and table.free_slot() >= 0:  # an item came back without a hand-off
            wake(table, [w for w in table.hand_off() if w != table.word_address(e)])
            state, s, _, _ = table.entry(e)
        if self._server is not None:
            self.check_server(always=True)
        if state != GRANTED and table.reap_due():
            wake(table, [w for w in table.reap(self.name) if w != table.word_address(e)])
            state, s, _, _ = table.entry(e)
        if state == GRANTED:
            got.append((s, table.slot(s)[0]))
            table.dequeue(e)
            entry.clear()
            return True
        if table.closed():
            table.dequeue(e)
            entry.clear()
            raise PoolClosed(f"pool {self.name!r} was closed while waiting")
        if cancelled.reason is not None:
            table.dequeue(e)
            entry.clear()
            raise cancelled.reason
        if state != HELD:
            raise BudgetUnavailable(f"pool {self.name!r}: this waiter's entry was lost")
        if table.empty_slot() >= 0:
            table.dequeue(e)  # room for a new item: ask the server again
            entry.clear()
            return False
        if time.monotonic() >= deadline:
            table.dequeue(e)
            entry.clear()
            table.bump_timeouts()
            raise PoolTimeout(
                f"pool {self.name!r}: no item available within {budget:g}s (all leased, "
                f"{table.waiting()} still waiting)"
            )
        return None

    def _cancel(self, cancelled: _Cancelled, reason: BaseException) -> None:
        """From another thread: end a wait (the server's, for a client that went away)."""
        cancelled.reason = reason
        table = self.table
        with contextlib.suppress(Exception):
            ctypes.c_uint32.from_address(cancelled.address).value = 1
            table.futex.wake(cancelled.address)

    def _abandon(self, got: list[Any], entry: list[int]) -> None:
        """Cut short: leave the queue, and give back what was leased meanwhile."""
        table = self.table

        def body() -> None:
            if entry:
                state, s, _, _ = table.entry(entry[-1])
                table.dequeue(entry[-1])
                entry.clear()
                if state == GRANTED and table.mine(s, table.slot(s)[0]):
                    got.append((s, table.slot(s)[0]))
            lease = got[-1] if got else None
            if lease is not None and table.mine(*lease):
                table.returned(lease[0])
                wakes.extend(table.hand_off())

        wakes: list[int] = []
        locked(table, self.name, body)
        wake(table, wakes)

    # -- giving back ----------------------------------------------------------------------------

    def holds(self, s: int, token: int) -> bool:
        return self.table.mine(s, token)

    def expired(self, s: int) -> bool:
        return self.table.item(s)[0] <= time.monotonic()

    def finished(self) -> bool:
        """The pool was closed (its table unlinked) and this registration holds none of its
        items: nothing can be leased or given back through it any more."""
        table = self.table
        return table.closed() and not table.leased_by(table.reg, table.gen)

    def check_server(self, *, always: bool = False) -> None:
        """Raise ManagerUnavailable if the server that owns the table has died (its
        registration's kernel lock is gone); the orphaned table is removed from the host."""
        if self._dead is not None:
            raise self._dead
        now = time.monotonic()
        if self._server is None or (not always and now - self._checked < _SERVER_CHECK):
            return
        reg, gen = self._server
        if self.table.alive(reg, gen, {}):
            self._checked = now
            return
        with contextlib.suppress(OSError):
            self.table.segment.unlink()
        self._dead = ManagerUnavailable(
            f"the manager server of pool {self.name!r} is unreachable: it died (its pool table "
            "is orphaned)"
        )
        raise self._dead

    def give_back(self, s: int, token: int) -> bool:
        """Return our leased slot ``s`` (IDLE, or to the oldest waiter). False if it must go
        through the server instead: it is not ours (the caller then gets the server's
        LeaseError), the pool is closed, or the item expired.

        No mutex: the slot is ours alone while LEASED (as a budget's permit is its holder's).
        Every check and call comes first; then the lease time is counted, the item's last use
        set and the slot marked IDLE (the commit) by plain subscript stores, a run that nothing
        interrupts and no other thread of this process enters (the GIL changes hands only where
        a signal handler could run). Waiters are handed to under the mutex.
        """
        now = time.monotonic()
        if self._server is not None and (now - self._checked >= _SERVER_CHECK or self._dead):
            self.check_server()
        mm, state, rec, reg, gen, since, items = self._back
        at = state + s
        if mm[at] != HELD or _owner(mm, rec + _SLOT_SIZE * s) != (token, reg, gen):
            return False
        flags = self._flags
        if flags[1] or items[_ITEM_DOUBLES * s] <= now:  # closed, or the item expired
            return False
        held = time.time() - since[_SLOT_DOUBLES * s + 3]  # since the lease began (wall clock)
        held = max(held, 0.0)
        self._held_for[0] += held
        items[_ITEM_DOUBLES * s + 1] = now  # last used
        mm[at] = IDLE  # the commit
        if flags[0]:  # someone waits: hand the item over
            wakes = locked(self.table, self.name, self.table.hand_off)
            wake(self.table, wakes)
        return True

    def _return(self, s: int) -> None:
        table = self.table
        wakes: list[int] = []

        def body() -> None:
            table.returned(s)
            wakes.extend(table.hand_off())

        locked(table, self.name, body)
        wake(table, wakes)


# -- tables: made by the server, attached by clients -------------------------------------------


_STALE_AFTER = 10.0  # seconds: a table younger than this may not be registered yet


def sweep_stale_tables(
    directory: str = SHM_DIR, *, min_age: float = _STALE_AFTER, only: Collection[str] = ()
) -> int:
    """Remove pool tables that no live process is registered in (their server was killed
    before it could remove them); how many. Tables younger than ``min_age`` seconds are left
    alone (one may not be registered yet); ``only``: look at these names alone."""
    removed = 0
    now = time.time()
    for name in only or os.listdir(directory):
        if not name.startswith("safepool-pool-"):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.stat(path).st_mtime < min_age:
                continue
        except OSError:
            continue
        if has_live_registration(path, REGS) is False:
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed += 1
    return removed


def create_table(path: str, limit: int, item_bytes: int, max_waiting: int) -> PoolTable:
    """The server's new table at ``path`` (a fresh name), registered for the server."""
    libc = require_platform()
    try:
        removed = sweep_stale_tables()
    except OSError:  # pragma: no cover - /dev/shm unreadable: nothing to sweep
        removed = 0
    if removed:
        logger.info("removed %d pool table(s) left behind by servers that were killed", removed)
    nonce = os.urandom(16)
    segment = Segment.open(
        path,
        mode=0o600,
        size=_layout_size(limit, item_bytes),
        magic=b"SPPOOLT1",
        lay_out=lay_out(
            limit, item_bytes, nonce, max_waiting, lambda seg: RobustMutex(libc, seg.base + MUTEX)
        ),
        validate=_refuse_existing,
    )
    table = open_table(segment, RobustMutex(libc, segment.base + MUTEX), Futex(libc))
    locked(table, path, lambda: table.register(os.getpid(), path))
    return table


def _layout_size(limit: int, item_bytes: int) -> int:
    return PoolLayout(limit, item_bytes).size


def _refuse_existing(segment: Segment) -> None:
    raise BudgetUnavailable(f"{segment.path} exists already")


class _Attached:
    """This process's registrations, one per table (shared by all proxies to that pool).

    A registration lives as long as the process, or until its pool is closed and it holds no
    lease (then :meth:`detach_finished`, run on every new attachment and after a proxy's
    ``close()``, closes its descriptor: a process that makes and closes pools keeps none open).
    """

    # _lock guards _tables. A fork gives the child none (it registers anew on first use).
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, TableLeaser] = {}

    def get(
        self, path: str, nonce: bytes, name: str, timeout: float, server: tuple[int, int]
    ) -> TableLeaser:
        self.detach_finished()
        with self._lock:
            leaser = self._tables.get(path)
            if leaser is None:
                libc = require_platform()
                segment = Segment.open(
                    path, mode=0o600, size=0, magic=b"SPPOOLT1", lay_out=_refuse_existing,
                    validate=validator(nonce), create=False,
                )  # fmt: skip
                table = open_table(segment, RobustMutex(libc, segment.base + MUTEX), Futex(libc))
                locked(table, name, lambda: table.register(os.getpid(), name))
                leaser = self._tables[path] = TableLeaser(table, name, timeout, server)
                weakref.finalize(leaser, segment.close)
            return leaser

    def drop(self, path: str) -> None:
        """Close this process's registration of the table at ``path`` (if any), whatever its
        state."""
        with self._lock:
            leaser = self._tables.pop(path, None)
        if leaser is not None:
            leaser.table.segment.close()

    def detach_finished(self) -> None:
        """Close the registrations of closed pools that hold no lease. Each descriptor is closed
        (ending the registration); the mapping stays until the last proxy holding the leaser
        goes, so a thread still inside an operation never touches unmapped memory."""
        with self._lock:
            done = [path for path, leaser in self._tables.items() if leaser.finished()]
            leasers = [self._tables.pop(path) for path in done]
        for leaser in leasers:
            leaser.table.segment.close()

    def _after_fork_in_child(self) -> None:
        for leaser in self._tables.values():
            leaser.table.segment.forget()  # the parent's registration lock is the parent's
        self._lock = threading.Lock()
        self._tables = {}


_attached = _Attached()
_fork.register(_attached)


def detach_finished() -> None:
    """Close this process's registrations of closed pools that hold no lease."""
    _attached.detach_finished()


def attach(descriptor: dict[str, Any], name: str) -> TableLeaser | None:
    """This process's leaser for the table the server described; None if it cannot be used
    here (another host: no such segment, or another's under that name)."""
    try:
        reg, gen = descriptor["server"]
        server = (int(reg), int(gen))
        return _attached.get(
            descriptor["path"], descriptor["nonce"], name, float(descriptor["timeout"]), server
        )
    except (BudgetUnavailable, OSError):
        return None
