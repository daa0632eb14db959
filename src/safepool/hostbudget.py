"""``HostBudget``: a host-wide limit that any process can share, with no server.

``HostBudget("pg", 20)`` opens (creating if needed) the budget named ``pg`` on this host: at most
20 permits at once, across every process that opens the name (forked, spawned, or unrelated).
A permit whose holder dies (SIGKILL included, at any instruction) comes back without anyone's
help. See docs/guides/host-budget.md; the shared table is described in :mod:`._hosttable`, the
kernel mechanisms in :mod:`._hostipc`.

Costs: taking and giving back a free permit makes no system call (a robust mutex in shared
memory, taken with one ``trylock``); only waiting and repairing do.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import os
import time
import weakref
from typing import Any

from . import _fork
from ._config import check_duration
from ._hostipc import SHM_DIR, Futex, RobustMutex, Segment, require_platform
from ._hosttable import (
    FREE,
    GRANTED,
    HEAD,
    HELD,
    HOT,
    MUTEX,
    RECLAIMED,
    SLOT,
    TIMEOUTS,
    TOKEN,
    U32,
    U64,
    UNLINKED,
    WAITING,
    Layout,
    Table,
    lay_out,
    validator,
)
from ._hosttable import locked as _locked
from ._hosttable import wake as _wake
from .budget import (
    BudgetStats,
    Permit,
    PermitHolder,
    PermitLease,
    check_budget_limit,
    check_budget_name,
    check_permit,
)
from .errors import BudgetTimeout, BudgetUnavailable, LeaseError

__all__ = ["HostBudget"]

logger = logging.getLogger(__name__)
_hot = HOT.unpack_from
_u32 = U32.unpack_from
_u64 = U64.unpack_from
_u64_pack = U64.pack_into
_slot_pack = SLOT.pack_into
_SLOT_SIZE = SLOT.size
_time = time.time
_EOWNERDEAD = errno.EOWNERDEAD

MAX_LIMIT = 1 << 20
_FIRST_SLICE = 0.001  # a waiter re-checks for dead holders after this, then ever less often
_MAX_SLICE = 0.010  # ... but at least this often: a dead holder's permit is back within it


def _path(name: str) -> str:
    return f"{SHM_DIR}/safepool-budget-{name}"


class _Stale(Exception):
    """The segment was unlinked but its name is still there (the unlinker died): retry."""


def _open_table(name: str, limit: int, mode: int) -> Table:
    libc = require_platform()
    path = _path(name)
    for _ in range(10):
        try:
            segment = Segment.open(
                path,
                mode=mode,
                size=Layout(limit).size,
                magic=b"SPBUDGT1",
                lay_out=lay_out(limit, lambda seg: RobustMutex(libc, seg.base + MUTEX)),
                validate=_validate(path, name, limit),
            )
        except _Stale:
            continue
        _, _, _, regs, waits = HEAD.unpack_from(segment.mm, 0)
        table = Table(
            segment,
            Layout(limit, regs, waits),
            RobustMutex(libc, segment.base + MUTEX),
            Futex(libc),
        )
        _locked(table, name, functools.partial(table.register, os.getpid(), name))
        return table
    raise BudgetUnavailable(f"budget {name!r}: {path} keeps being unlinked; cannot open it")


def _validate(path: str, name: str, limit: int) -> Any:
    check = validator(path, name, limit)

    def run(segment: Segment) -> None:
        if U32.unpack_from(segment.mm, UNLINKED)[0]:
            segment.unlink()  # unlinked, but the unlinker died before removing the name
            raise _Stale
        check(segment)

    return run


def _hand_off(table: Table, name: str) -> None:
    """Under the mutex: give free slots to the oldest waiters; wake them after unlocking."""
    _wake(table, _locked(table, name, table.hand_off))


class HostBudget:
    """At most ``limit`` permits at once across every process on this host that opens ``name``.

    ``mode`` sets the permissions of a budget this call creates (``0o600``: this user only;
    ``0o660`` to share with the group). Opening an existing budget with another ``limit``
    raises ``ValueError``. See the module and guide for the guarantees.
    """

    def __init__(self, name: str, limit: int, *, mode: int = 0o600) -> None:
        self._name = check_budget_name(name)
        self._limit = check_budget_limit(limit)
        if limit > MAX_LIMIT:
            raise ValueError(f"limit must be <= {MAX_LIMIT}, got {limit}")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValueError(f"mode must be permission bits such as 0o600, got {mode!r}")
        if mode & 0o600 != 0o600:
            raise ValueError(f"mode must let its owner read and write (0o600), got {mode:#o}")
        self._mode = mode
        self._held: dict[int, int] = {}  # token -> id(permit), for the permits of this object
        self._pid = os.getpid()
        self._hint = 0  # the slot this object released last: likely free
        self._closed = False
        self._fast: tuple[Any, ...] | None = None
        self._table: Table | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._install(_open_table(name, limit, mode))
        _fork.register(self)

    # -- the protocol ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def limit(self) -> int:
        return self._limit

    def acquire(self, timeout: float | None = None) -> Permit:
        """A permit, waiting up to ``timeout`` seconds (None: no limit; 0: do not wait).

        Raises :class:`BudgetTimeout` (never early), or :class:`BudgetUnavailable` once the
        budget was unlinked.
        """
        if timeout is not None:
            check_duration("timeout", timeout, allow_zero=True, allow_inf=True)
        fast = self._fast
        if fast is None:
            fast = self._reopen()
        mm, trylock, unlock, mutex, state, end, rec, reg, gen, pid, table = fast
        s = token = -1
        now = _time()
        try:
            # The fast path: the mutex is free, nobody waits, a slot is free. No system call.
            rc = trylock(mutex)
            if rc == 0:
                token, waiting, unlinked = _hot(mm, TOKEN)
                at = -1
                if not (waiting or unlinked):
                    at = state + self._hint  # the slot this object freed last, if still free
                    if mm[at] != FREE:
                        at = mm.find(b"\0", state, end)
                if at >= 0:
                    s = at - state
                    token += 1
                    _slot_pack(mm, rec + _SLOT_SIZE * s, token, reg, gen, pid, now)
                    mm[at] = HELD  # the commit (see _hosttable)
                    _u64_pack(mm, TOKEN, token)
                    unlock(mutex)
                    permit = Permit(self, self._name, token, s, pid=pid, since=now)
                    self._held[token] = id(permit)
                    return permit
                unlock(mutex)
            elif rc == _EOWNERDEAD:  # we hold it now, and must repair before anything else
                table.mutex.make_consistent()
                _wake(table, table.repair(self._name))
                unlock(mutex)
            return self._acquire_slow(table, timeout)
        except BaseException:
            table.mutex.unlock_if_mine()
            if s >= 0 and table.mine(s, token):  # granted, but interrupted before handed over
                self._give_back(table, s)
            raise

    def release(self, permit: Permit) -> None:
        """Give ``permit`` back. A permit of another budget, forged, or released twice raises
        :class:`LeaseError` and changes nothing; a parent's permit in a forked child, or one
        released by ``close()``, is a quiet no-op."""
        if permit.__class__ is Permit and permit._owner is self:
            # A forked child's, a released or a lost permit is not in _held. Every check (and
            # every call) comes first; then the commit is one run of stores, which nothing can
            # interrupt half-way (see safepool._poolstate): deleting our record of it is the
            # claim (two threads releasing one permit: the second's del raises KeyError), then
            # the slot is freed.
            token = permit.token
            held = self._held
            if held.get(token) == id(permit):
                fast = self._fast
                s = permit._engine_state
                if fast is not None:
                    mm = fast[0]
                    at = fast[4] + s
                    if mm[at] == HELD and _u64(mm, fast[6] + _SLOT_SIZE * s)[0] == token:
                        try:
                            del held[token]
                        except KeyError:
                            raise LeaseError(
                                f"budget {self._name!r}: permit {token} was already released"
                            ) from None
                        mm[at] = FREE  # our own HELD slot: no lock needed to let it go
                        permit._released = True
                        self._hint = s
                        if _u32(mm, WAITING)[0]:
                            _hand_off(fast[10], self._name)
                        return
                self._release_mismatch(permit)
                return
        self._release_checked(permit)

    def _release_checked(self, permit: Permit) -> None:
        """Anything but our own live permit: the shared checks decide (raise, or do nothing)."""
        if not check_permit(self, permit, self._name):
            return  # a parent's permit in a forked child, or a lost one
        if self._closed:
            permit._mark_lost("the budget object was closed, which released it")
            return
        raise LeaseError(
            f"budget {self._name!r}: permit {permit.token} is not one this budget object holds "
            "(forged, or copied)"
        )

    def _release_mismatch(self, permit: Permit) -> None:
        """The slot of a permit we issued is not HELD with its token (never expected)."""
        if self._closed:
            permit._mark_lost("the budget object was closed")
            return
        raise LeaseError(
            f"budget {self._name!r}: permit {permit.token} does not match the budget's table"
        )

    def lease(self, timeout: float | None = None) -> PermitLease:
        """``with budget.lease() as permit:`` -- released however the block exits."""
        return PermitLease(self, timeout)

    def stats(self) -> BudgetStats:
        """Counters across every process since the budget was created (dead holders reaped
        first, so ``in_use`` and ``holders()`` agree)."""
        table = self._live_table()

        def body() -> BudgetStats:
            _wake(table, table.reap(self._name))
            lay = table.layout
            return BudgetStats(
                name=self._name,
                limit=self._limit,
                in_use=len(table.positions(lay.slot_state, lay.limit, b"\x01")),
                waiting=table.waiting(),
                acquired=table.token(),
                timeouts=table.counter(TIMEOUTS),
                reclaimed=table.counter(RECLAIMED),
            )

        result: BudgetStats = _locked(table, self._name, body)
        return result

    def holders(self) -> list[PermitHolder]:
        """Who holds each permit now (pid, since, token), oldest token first."""
        table = self._live_table()

        def body() -> list[PermitHolder]:
            _wake(table, table.reap(self._name))
            lay = table.layout
            found = []
            for s in table.positions(lay.slot_state, lay.limit, b"\x01"):
                token, _, _, pid, since = table.slot(s)
                found.append(PermitHolder(pid=pid, since=since, token=token))
            return sorted(found, key=lambda h: h.token)

        result: list[PermitHolder] = _locked(table, self._name, body)
        return result

    def unlink(self) -> None:
        """Remove the budget from the host. Every open budget object of this name (in any
        process) then refuses ``acquire()`` with :class:`BudgetUnavailable`, waiters included;
        permits still held can be released (quietly). ``HostBudget(name, ...)`` afterwards
        creates a new, empty budget."""
        table = self._live_table()

        def body() -> list[int]:
            U32.pack_into(table.mm, UNLINKED, 1)
            lay = table.layout
            waiters = table.positions(lay.wait_state, lay.waits, b"\x01")
            for e in waiters:
                U32.pack_into(table.mm, lay.wait_rec + 32 * e, 1)
            return [table.word_address(e) for e in waiters]

        _wake(table, _locked(table, self._name, body))
        table.segment.unlink()

    def close(self) -> None:
        """Release what this object still holds (logged) and its registration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer is not None:
            self._finalizer()
        self._table = self._fast = None
        self._held.clear()

    def __enter__(self) -> HostBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<HostBudget {self._name!r} limit={self._limit} {state}>"

    def __reduce__(self) -> Any:
        return (_reopen_by_name, (self._name, self._limit, self._mode))

    # -- internals ---------------------------------------------------------------------------

    def _issue(self, s: int, token: int, now: float) -> Permit:
        permit = Permit(self, self._name, token, s, pid=self._pid, since=now)
        self._held[token] = id(permit)
        return permit

    def _acquire_slow(self, table: Table, timeout: float | None) -> Permit:
        """The mutex was busy, or its owner died, or nothing is free at once, or others wait."""
        s = token = -1
        try:
            if table.mutex.lock():
                _wake(table, table.repair(self._name))
            token, waiting, unlinked = _hot(table.mm, TOKEN)
            s = -1 if waiting or unlinked else table.free_slot()
            if s >= 0:
                now = time.time()
                token = table.grant_direct(s, now)
                table.mutex.unlock()
                return self._issue(s, token, now)
            entry = self._enqueue(table, timeout)  # unlocks
            if isinstance(entry, tuple):
                s, token = entry
                return self._issue(s, token, time.time())
        except BaseException:
            table.mutex.unlock_if_mine()
            if s >= 0 and table.mine(s, token):
                self._give_back(table, s)
            raise
        return self._wait(table, entry, timeout)

    def _enqueue(self, table: Table, timeout: float | None) -> int | tuple[int, int]:
        """Under the mutex (which it releases): nothing free at once. Returns a granted
        (slot, token) or the wait entry to wait on; raises on timeout=0 or unlinked."""
        name = self._name
        if table.unlinked():
            raise BudgetUnavailable(f"budget {name!r} was unlinked; open it again to use it")
        entry = table.enqueue()
        wake = table.hand_off()  # FIFO: free slots go to the oldest waiters, maybe us
        if table.entry(entry)[0] != GRANTED and (timeout == 0 or table.reap_due()):
            wake += table.reap(name)  # a dead holder's permit is as good as a free one
        state, s, _, _ = table.entry(entry)
        if state == GRANTED or timeout == 0:
            table.dequeue(entry)
            if state != GRANTED:
                table.bump_timeouts()
        table.mutex.unlock()
        _wake(table, wake)
        if state == GRANTED:
            return s, table.slot(s)[0]
        if timeout == 0:
            raise BudgetTimeout(f"budget {name!r}: no permit free (limit {self._limit})")
        return entry

    def _wait(self, table: Table, entry: int, timeout: float | None) -> Permit:
        """Outside the mutex: sleep on our entry's futex word until granted or timed out."""
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        address = table.word_address(entry)
        pause = _FIRST_SLICE
        outcome: tuple[int, int] | None = None
        try:
            while True:  # not `while cond:` (CPython issue 108214; see safepool._poolstate)
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    table.futex.wait(address, 0, min(remaining, pause))
                    pause = min(pause * 2, _MAX_SLICE)
                outcome = _locked(
                    table, self._name, lambda: self._check_wait(table, entry, deadline)
                )
                if outcome is not None:
                    break
            return self._issue(outcome[0], outcome[1], time.time())
        except BaseException as exc:
            if outcome is not None and table.mine(*outcome):
                self._give_back(table, outcome[0])  # interrupted after the grant
            elif not isinstance(exc, (BudgetTimeout, BudgetUnavailable)):
                self._abandon_wait(table, entry)
            raise

    def _check_wait(self, table: Table, entry: int, deadline: float) -> tuple[int, int] | None:
        """Under the mutex: our grant, or None to sleep again; raises on timeout/unlink."""
        state, s, _, _ = table.entry(entry)
        wake: list[int] = []
        if state != GRANTED and (time.monotonic() >= deadline or table.reap_due()):
            wake = table.reap(self._name)  # nobody else may be watching for dead holders
            state, s, _, _ = table.entry(entry)
        _wake(table, [w for w in wake if w != table.word_address(entry)])
        if state == GRANTED:
            table.dequeue(entry)
            return s, table.slot(s)[0]
        if table.unlinked():
            table.dequeue(entry)
            raise BudgetUnavailable(f"budget {self._name!r} was unlinked while waiting")
        if state != HELD:
            raise BudgetUnavailable(f"budget {self._name!r}: this waiter's entry was lost")
        if time.monotonic() >= deadline:
            table.dequeue(entry)
            table.bump_timeouts()
            raise BudgetTimeout(
                f"budget {self._name!r}: no permit came free within the timeout "
                f"(limit {self._limit}, {table.waiting()} still waiting)"
            )
        return None

    def _abandon_wait(self, table: Table, entry: int) -> None:
        """An interrupted waiter leaves the queue; a permit it was handed goes on to the next."""

        def body() -> None:
            state, s, _, _ = table.entry(entry)
            table.dequeue(entry)
            if state == GRANTED and table.mine(s, table.slot(s)[0]):
                table.release_mine(s)
                _wake(table, table.hand_off())

        _locked(table, self._name, body)

    def _give_back(self, table: Table, s: int) -> None:
        table.release_mine(s)
        if table.waiting():
            _hand_off(table, self._name)

    def _live_table(self) -> Table:
        if self._closed:
            raise BudgetUnavailable(f"budget {self._name!r}: this HostBudget object is closed")
        if self._table is None:
            self._reopen()
        assert self._table is not None
        return self._table

    def _reopen(self) -> tuple[Any, ...]:
        """In a forked child: a registration of our own (the parent's stays the parent's)."""
        if self._closed:
            raise BudgetUnavailable(f"budget {self._name!r}: this HostBudget object is closed")
        return self._install(_open_table(self._name, self._limit, self._mode))

    def _install(self, table: Table) -> tuple[Any, ...]:
        libc, lay = require_platform(), table.layout
        self._table = table
        self._finalizer = weakref.finalize(self, _close_table, table, self._name)
        self._hint = 0
        self._fast = (table.mm, libc.fast_trylock, libc.fast_unlock,
                      ctypes.c_void_p(table.segment.base + MUTEX),
                      lay.slot_state, lay.slot_state + lay.limit, lay.slot_rec, table.reg,
                      table.gen, table.pid, table)  # fmt: skip
        return self._fast

    def _after_fork_in_child(self) -> None:
        table, self._table, self._fast = self._table, None, None
        self._held = {}
        self._pid = os.getpid()
        if self._finalizer is not None:
            self._finalizer.detach()
        if table is not None:
            table.segment.forget()  # the parent's registration lock must not live on in us


def _close_table(table: Table, name: str) -> None:
    """Give back what a closed (or collected) budget object held, and its registration."""
    if table.segment.fd < 0:
        return

    def body() -> None:
        count = table.release_all_mine()
        if count:
            logger.warning("budget %r: closed while holding %d permit(s); released", name, count)
        table.unregister()
        _wake(table, table.hand_off())

    try:
        _locked(table, name, body)
    finally:
        table.segment.close()  # the mapping goes when the last reference to it does


def _reopen_by_name(name: str, limit: int, mode: int) -> HostBudget:
    return HostBudget(name, limit, mode=mode)
