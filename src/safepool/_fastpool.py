"""The server's side of the same-host fast path: a by-value pool whose state is a shared table.

:class:`TablePool` takes the place of a :class:`~safepool.SafeConnectionPool` inside a
``HostedPool`` created with ``share="value"`` (when it qualifies: no ``check``/``reset`` hook,
the default clock, Linux). The table (:mod:`._fasttable`) is the one source of truth: same-host
clients lease and return items in it directly (:mod:`._fastlease`); remote clients lease through
the server, which leases from the same table with its own registration, in the same FIFO queue.
Only the server makes and closes items: clients ask it with ``fill`` (a round trip) when there is
room for a new item, and hand it expired items and discards (``release_slot``).

The server keeps each slot's item object (``_items``), to close it, to run ``call()`` on it, and
to send it to a client whose table slot cannot hold its pickled bytes (``value``).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from . import _housekeeper, _sessions
from ._config import AUTO, DEFAULT_TIMEOUT, redact
from ._fastlease import TableLeaser, create_table
from ._fasttable import IDLE_BYTE, LEASED_BYTE, MAKING_BYTE, PoolTable
from ._hostipc import SHM_DIR, require_platform
from ._hosttable import RECLAIMED, TIMEOUTS, locked, wake
from .errors import BudgetUnavailable, FactoryError, HostedItemError, LeaseError, PoolClosed
from .pool import close_item
from .stats import PoolStats

__all__ = ["ITEM_BYTES", "TablePool", "eligible"]

logger = logging.getLogger(__name__)

ITEM_BYTES = 1024  # pickled bytes an item may have to travel in the table (larger: a round trip)
_numbers = itertools.count(1)


def describe_pid(pid: int) -> str:
    """A holder process named as its session names it (pid, process name, host, since)."""
    for info in _sessions.registry.sessions():
        if info.pid == pid:
            return info.describe()
    return f"pid {pid}"


def eligible(options: dict[str, Any]) -> str | None:
    """Why a by-value pool with these options cannot use the fast path (None: it can)."""
    if options.get("check") is not None or options.get("reset") not in (None, AUTO):
        return "its check/reset hooks must run in the server on every lease"
    if options.get("configure") is not None:
        return "its configure hook runs in the server's own pool (or configure in the factory)"
    clock = options.get("clock")
    if clock is not None and clock is not time.monotonic:
        return "it has its own clock (the table uses the host's monotonic clock)"
    try:
        require_platform()
    except BudgetUnavailable as exc:
        return str(exc)
    return None


class _Claim:
    __slots__ = ("lease",)

    def __init__(self) -> None:
        self.lease: list[Any] = []  # [(slot, token)] once leased


class TablePool:
    """A by-value pool in a shared table; the server's side (see the module docstring)."""

    def __init__(
        self,
        *,
        factory: Callable[[], Any],
        max_size: int = 10,
        min_size: int = 0,
        timeout: float = DEFAULT_TIMEOUT,
        max_waiting: int = 0,
        close: Callable[[Any], object] | None = None,
        max_lifetime: float | Literal["auto"] | None = None,
        max_idle: float | Literal["auto"] | None = None,
        leak_timeout: float | None = None,
        name: str | None = None,
        budget: Any = None,
        **_ignored: Any,
    ) -> None:
        # By-value items are plain data, never DB-API connections: "auto" limits mean never.
        max_lifetime = None if max_lifetime == AUTO else max_lifetime
        max_idle = None if max_idle == AUTO else max_idle
        self.name = name if name is not None else f"pool-{next(_numbers)}"
        self._factory = factory
        self._close_item = close if close is not None else close_item
        self._max_size, self._min_size = max_size, min_size
        self._lifetime = math.inf if max_lifetime is None else float(max_lifetime)
        self._max_idle = max_idle
        self._leak_timeout = leak_timeout
        self._budget = budget
        self.path = f"{SHM_DIR}/safepool-pool-{os.getpid()}-{os.urandom(6).hex()}"
        self._table: PoolTable = create_table(self.path, max_size, ITEM_BYTES, max_waiting)
        self._table.describe_pid = describe_pid
        self._leaser = TableLeaser(self._table, self.name, float(timeout))
        self._timeout = float(timeout)
        # _lock guards _items, _permits, _held, _reported and the counters. A leaf: never held
        # while taking the table's mutex, nor the reverse.
        self._lock = threading.Lock()
        self._items: list[Any] = [None] * max_size
        self._permits: list[Any] = [None] * max_size
        self._held: dict[int, tuple[int, int]] = {}  # id(item) -> (slot, token), server leases
        self._reported: set[int] = set()  # tokens already reported as leaks
        self._created = 0
        self._closed_count = 0
        self._leaks = 0
        self._revoked = 0  # leases an operator took back (HostedPool.revoke)
        self._observer: Any = None
        self._closed = False
        for _made in range(min_size):
            self._make_into_empty()
        if max_idle is not None or leak_timeout is not None or max_lifetime is not None:
            _housekeeper.register(self)

    # -- what clients of the fast path ask for ----------------------------------------------------

    def descriptor(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "nonce": self._table.nonce(),
            "timeout": self._timeout,
            "name": self.name,
            "server": (self._table.reg, self._table.gen),
        }

    def fill(self, reg: int, gen: int, pid: int) -> tuple[int, int] | None:
        """A new item (or one that came free meanwhile), leased to registration (reg, gen) of
        process ``pid``: (slot, token); None if there is no room for one now."""
        table = self._table
        wakes: list[int] = []

        def take() -> tuple[str, int, int]:
            if table.closed():
                raise PoolClosed(f"pool {self.name!r} is closed")
            if not table.waiting():
                s = table.free_slot()
                if s >= 0:
                    return "leased", s, self._grant(s, reg, gen, pid)
            s = table.reserve()
            return ("make", s, 0) if s >= 0 else ("none", -1, 0)

        step, s, token = locked(table, self.name, take)
        if step == "leased":
            return s, token
        if step == "none":
            return None
        self._make_item(s)  # gives the reservation back if it fails

        def lease_or_idle() -> int:
            if not table.closed() and table.alive(reg, gen, {}):
                return table.grant_made(s, reg, gen, pid, time.time())
            wakes.extend(table.set_idle(s))
            return 0

        token = locked(table, self.name, lease_or_idle)
        wake(table, wakes)
        return (s, token) if token else None

    def release_slot(self, s: int, token: int, discard: bool) -> None:
        """A fast lease comes back through the server: closed pool, expired item, or discard."""
        table = self._table

        def take() -> None:
            if not self._owned_by_anyone(s, token):
                raise LeaseError(f"pool {self.name!r}: no lease {token} in slot {s}")
            table.add_time(32, max(0.0, time.time() - table.slot(s)[4]))  # its lease time
            table.mm[table.layout.slot_state + s] = 4  # MAKING: the server's now

        locked(table, self.name, take)
        self._replace(s, close=True)

    def value(self, s: int, token: int) -> bytes:
        """The pickled item of a lease whose bytes the table could not hold."""
        if not self._owned_by_anyone(s, token):
            raise LeaseError(f"pool {self.name!r}: no lease {token} in slot {s}")
        with self._lock:
            item = self._items[s]
        return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)

    def take_back(self, s: int, token: int) -> None:
        """A lease whose reply its client never took (see TableGrant): back in the pool."""
        table = self._table
        wakes: list[int] = []

        def body() -> None:
            if self._owned_by_anyone(s, token):
                table.returned(s)
                wakes.extend(table.hand_off())

        locked(table, self.name, body)
        wake(table, wakes)

    def reap(self) -> None:
        """Give back the leases and waits of processes that died (a session ended). A closed
        pool has nothing to give back to: its table is being removed, its descriptor closed."""
        if self._closed:
            return
        table = self._table
        try:
            wake(table, locked(table, self.name, lambda: table.reap(self.name)))
        except (OSError, ValueError):  # the server closed the table meanwhile (stopping)
            if not self._closed:
                raise

    # -- the pool API the HostedPool uses (server-side leases, for remote clients) -----------------

    def _new_claim(self) -> _Claim:
        return _Claim()

    def _acquire_into(self, claim: _Claim, timeout: float | None, hook: Any = None) -> Any:
        started = time.monotonic()
        self._leaser.lease_into(claim.lease, timeout, self._fill_local, hook)
        s, token = claim.lease[-1]
        if self._table.item(s)[0] <= time.monotonic():  # expired: a new item, same lease
            locked(self._table, self.name, lambda: self._set_making(s))
            self._replace(s, close=True, keep_for=token)
        with self._lock:
            item = self._items[s]
            self._held[id(item)] = (s, token)
        observer = self._observer
        if observer is not None:
            observer.waited(self.name, time.monotonic() - started)
        return item

    def _settle(self, claim: _Claim) -> None:
        if claim.lease:
            s, token = claim.lease[-1]
            if self._leaser.holds(s, token):
                with self._lock:
                    self._held.pop(id(self._items[s]), None)
                if not self._leaser.give_back(s, token):
                    self.release_slot(s, token, False)

    def release(self, item: Any, *, discard: bool = False) -> None:
        with self._lock:
            held = self._held.pop(id(item), None)
        if held is None or self._items[held[0]] is not item:
            raise LeaseError(f"pool {self.name!r}: this {type(item).__name__} is not leased")
        s, token = held
        if discard or not self._leaser.give_back(s, token):
            self.release_slot(s, token, discard)

    def close(self) -> None:
        """Close the pool: waiters get PoolClosed, idle items are closed now, leased ones when
        they come back."""
        table = self._table
        idle: list[int] = []

        def shut() -> list[int]:
            wakes = table.set_closed()
            for s in table.positions(table.layout.slot_state, table.layout.limit, IDLE_BYTE):
                self._set_making(s)
                idle.append(s)
            return wakes

        wake(table, locked(table, self.name, shut))
        self._closed = True
        for s in idle:
            self._replace(s, close=True)

    @property
    def closed(self) -> bool:
        return self._closed

    def stats(self) -> PoolStats:
        table = self._table

        def read() -> tuple[Any, ...]:
            wake(table, table.reap(self.name))
            return (table.count(IDLE_BYTE), table.count(LEASED_BYTE), table.count(MAKING_BYTE),
                    table.waiting(), table.counter(TIMEOUTS), table.counter(RECLAIMED))  # fmt: skip

        idle, leased, making, waiting, timeouts, reclaimed = locked(table, self.name, read)
        # Totals, read without the mutex (each field is one aligned word, written whole).
        requests, waits, lease_time, wait_time = (table.pool_counter(o) for o in (16, 24, 32, 40))
        with self._lock:
            created, closed, leaks = self._created, self._closed_count, self._leaks
            revoked = self._revoked
        return PoolStats(
            name=self.name, size=idle + leased + making, idle=idle, leased=leased,
            pending=making, waiting=waiting, max_size=self._max_size, min_size=self._min_size,
            created=created, closed=closed, requests=int(requests), waits=int(waits),
            timeouts=timeouts, lost=0, leaks=leaks, reclaimed=reclaimed, wait_time=wait_time,
            lease_time=lease_time, revoked=revoked,
        )  # fmt: skip

    def holders(self) -> list[tuple[int, float, int, bool]]:
        """(pid, since, token, by the server) for every lease in the table."""
        table = self._table

        def read() -> list[tuple[int, float, int, bool]]:
            wake(table, table.reap(self.name))
            out = []
            for s in table.positions(table.layout.slot_state, table.layout.limit, LEASED_BYTE):
                token, reg, gen, pid, since = table.slot(s)
                out.append((pid, since, token, (reg, gen) == (table.reg, table.gen)))
            return out

        result: list[tuple[int, float, int, bool]] = locked(table, self.name, read)
        return result

    def maintain(self) -> float:
        """Close idle items past max_idle (beyond min_size) or max_lifetime; report leaks."""
        if self._closed:
            return math.inf
        table, now = self._table, time.monotonic()
        stale: list[int] = []

        def pick() -> None:
            lay = table.layout
            keep = table.count(IDLE_BYTE) + table.count(LEASED_BYTE) - self._min_size
            for s in table.positions(lay.slot_state, lay.limit, IDLE_BYTE):
                expires, last_used, _, _ = table.item(s)
                idle_too_long = self._max_idle is not None and now - last_used >= self._max_idle
                if now >= expires or (idle_too_long and keep > len(stale)):
                    self._set_making(s)
                    stale.append(s)

        locked(table, self.name, pick)
        for s in stale:
            self._replace(s, close=True)
        self._report_leaks()
        return 0.05 if self._max_idle is not None or self._lifetime < math.inf else 1.0

    def _count_reclaimed(self) -> None:
        table = self._table
        locked(table, self.name, lambda: table._bump(RECLAIMED))

    def _count_revoked(self) -> None:
        with self._lock:
            self._revoked += 1

    def _set_holder(self, item: Any, holder: str) -> None:
        pass  # holders are named from the table (pid) and the server's sessions

    def dispose(self) -> None:
        """The pool is gone (its last proxy, or the server): close it and remove the table."""
        if not self._closed:
            self.close()
        self._table.segment.unlink()

    # -- internals ------------------------------------------------------------------------------

    def _fill_local(self, reg: int, gen: int, pid: int) -> tuple[int, int] | None:
        return self.fill(reg, gen, pid)

    def _grant(self, s: int, reg: int, gen: int, pid: int) -> int:
        """Under the mutex: IDLE slot ``s`` becomes LEASED to (reg, gen, pid)."""
        table = self._table
        table.mm[table.layout.slot_state + s] = 4  # MAKING, for grant_made's commit
        return table.grant_made(s, reg, gen, pid, time.time())

    def _set_making(self, s: int) -> None:
        self._table.mm[self._table.layout.slot_state + s] = 4

    def _owned_by_anyone(self, s: int, token: int) -> bool:
        table = self._table
        if not 0 <= s < table.layout.limit or table.mm[table.layout.slot_state + s] != 1:
            return False
        return int(table.slot(s)[0]) == token

    def _make_into_empty(self) -> None:
        table = self._table
        s = locked(table, self.name, table.reserve)
        if s < 0:
            return
        self._make_item(s)
        wake(table, locked(table, self.name, lambda: table.set_idle(s)))

    def _make_item(self, s: int) -> None:
        """Make a new item into MAKING slot ``s`` (the slot stays MAKING). On failure the slot
        goes back EMPTY (waiters look again), and the error propagates."""
        table = self._table
        permit = None
        started = time.monotonic()
        try:
            if self._budget is not None:
                permit = self._budget.acquire(self._timeout)
            try:
                item = self._factory()
            except Exception as exc:
                raise FactoryError(
                    f"pool {self.name!r}: the factory raised {type(exc).__name__}: "
                    f"{redact(str(exc))}"
                ) from exc
            data = self._dump(item)
        except BaseException:
            if permit is not None:
                self._budget.release(permit)
            wake(table, locked(table, self.name, lambda: table.set_empty(s)))
            raise
        now = time.monotonic()
        with self._lock:
            self._items[s] = item
            self._permits[s] = permit
            self._created += 1
        locked(table, self.name, lambda: table.install(
            s, data if data is not None and len(data) <= ITEM_BYTES else None,
            now + self._lifetime, now))  # fmt: skip
        observer = self._observer
        if observer is not None:
            observer.created(self.name, now - started)

    def _dump(self, item: Any) -> bytes | None:
        try:
            return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise HostedItemError(
                f"pool {self.name!r} shares items by value, but a {type(item).__name__} cannot "
                f"be copied to a client ({type(exc).__name__}: {exc}); create the pool with "
                "share='hosted' to keep items in the server"
            ) from None

    def _replace(self, s: int, *, close: bool, keep_for: int = 0) -> None:
        """Slot ``s`` is MAKING (the server's): close its item; then make a new one if someone
        waits (or ``keep_for``: the lease with that token stays, on the new item), else EMPTY."""
        table = self._table
        if close:
            self._close_slot_item(s)
        if keep_for:
            self._make_item(s)

            def relet() -> None:
                table.mm[table.layout.slot_state + s] = 1  # LEASED again, same record

            locked(table, self.name, relet)
            return
        if not self._closed and locked(table, self.name, table.waiting):
            try:
                self._make_item(s)
            except Exception:
                logger.exception("pool %r: making an item for a waiter failed", self.name)
                return
            wake(table, locked(table, self.name, lambda: table.set_idle(s)))
            return
        wake(table, locked(table, self.name, lambda: table.set_empty(s)))

    def _close_slot_item(self, s: int) -> None:
        with self._lock:
            item, self._items[s] = self._items[s], None
            permit, self._permits[s] = self._permits[s], None
            self._closed_count += item is not None
        try:
            if item is not None:
                self._close_item(item)
        except Exception as exc:
            logger.warning("pool %r: close of a %s failed: %s: %s", self.name,
                           type(item).__name__, type(exc).__name__, exc)  # fmt: skip
        finally:
            if permit is not None:
                try:
                    self._budget.release(permit)
                except Exception:
                    logger.warning("pool %r: giving back a budget permit failed", self.name)

    def _report_leaks(self) -> None:
        if self._leak_timeout is None:
            return
        now = time.time()
        for pid, since, token, _ in self.holders():
            if now - since >= self._leak_timeout and token not in self._reported:
                with self._lock:
                    self._reported.add(token)
                    self._leaks += 1
                logger.warning(
                    "pool %r: a lease has been held for %.3fs (leak_timeout=%ss) by %s",
                    self.name,
                    now - since,
                    self._leak_timeout,
                    describe_pid(pid),
                )

    def __repr__(self) -> str:
        return f"<TablePool {self.name!r} at {self.path}>"
