"""Interrupt the in-process pool anywhere: counts stay consistent, capacity stays intact.

Two kinds of fault injection, both seeded (SAFEPOOL_SEED) and sized by ``sweep_size``:

* a ``BaseException`` (KeyboardInterrupt, SystemExit, a custom one) raised by each hook and by
  the factory;
* an exception raised from a signal handler at swept delays while ``with pool.lease()`` runs in
  a loop: it lands in the bookkeeping, in hooks, in waits and hand-offs, in close().

After each interruption the pool is checked (tests/interrupts.py: ``check_pool``).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers import SEED, SHORT, seeded, sweep_size
from interrupts import INTERRUPTIONS, Interrupter, check_pool, pick, spin
from safepool import PoolClosed, SafeConnectionPool


class Item:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Raises:
    """A hook (or factory) that raises ``exc`` on its ``when``-th call, and behaves otherwise."""

    def __init__(self, exc: type[BaseException], when: int, then: Callable[..., Any]) -> None:
        self.exc = exc
        self.when = when
        self.then = then
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.when:
            raise self.exc("raised by a hook")
        return self.then(*args)


def close_item(item: Item) -> None:
    item.close()


@pytest.fixture
def interrupter() -> Iterator[Interrupter]:
    with Interrupter() as it:
        yield it


# -- BaseException from each hook and from the factory --------------------------------------


@pytest.mark.parametrize("exc", INTERRUPTIONS, ids=lambda e: e.__name__)
class TestHooksAndFactoryRaising:
    def test_factory(self, exc: type[BaseException]) -> None:
        pool = SafeConnectionPool(factory=Raises(exc, 1, Item), max_size=1)
        with pytest.raises(exc):
            pool.acquire(timeout=1)
        check_pool(pool)
        assert pool.stats().created == 1

    def test_check(self, exc: type[BaseException]) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=1, check=Raises(exc, 1, bool))
        pool.release(pool.acquire())  # the check runs on the next lease of this item
        with pytest.raises(exc):
            pool.acquire(timeout=1)
        check_pool(pool)
        stats = pool.stats()
        assert (stats.created, stats.closed) == (2, 1)  # the checked item was closed, replaced

    def test_reset(self, exc: type[BaseException]) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=1, reset=Raises(exc, 1, bool))
        item = pool.acquire()
        with pytest.raises(exc):
            pool.release(item)
        assert item.closed  # its state is unknown after an interrupted reset: closed
        check_pool(pool)
        with pytest.raises(ValueError, match="not leased"):  # it left the pool when closed
            pool.release(item)

    def test_close_on_discard(self, exc: type[BaseException]) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=1, close=Raises(exc, 1, close_item))
        with pytest.raises(exc):
            pool.release(pool.acquire(), discard=True)
        check_pool(pool)
        assert pool.stats().closed == 1

    def test_close_of_the_pool(self, exc: type[BaseException]) -> None:
        pool = SafeConnectionPool(
            factory=Item, min_size=3, max_size=3, close=Raises(exc, 2, close_item)
        )
        with pytest.raises(exc):
            pool.close()
        stats = pool.stats()
        assert pool.closed and (stats.size, stats.pending, stats.closed) == (0, 0, 3), stats
        with pytest.raises(PoolClosed):
            pool.acquire(timeout=0)

    def test_a_lease_through_every_hook(self, exc: type[BaseException]) -> None:
        """Each hook in turn raises inside `with pool.lease()`: nothing is lost, ever."""
        for when in range(1, 7):
            hooks = {
                name: Raises(exc, when, then)
                for name, then in (("check", bool), ("reset", bool), ("close", close_item))
            }
            pool = SafeConnectionPool(
                factory=Raises(exc, when, Item), max_size=2, max_lifetime=1e-4, **hooks
            )
            for _ in range(4):
                try:
                    with pool.lease(timeout=1):
                        time.sleep(2e-4)  # past max_lifetime: replaced, so closed and made
                except exc:
                    pass
            for hook in (*hooks.values(), pool._factory):
                hook.when = 0  # type: ignore[union-attr] # no more raising
            check_pool(pool)
            pool.close()


def test_a_clock_that_breaks_later_loses_no_slot() -> None:
    """Anything raising between the factory and the bookkeeping (here, the clock) gives the
    reserved slot back and closes the item just made."""
    ticks = itertools.count()
    made: list[Item] = []

    def clock() -> float:
        if next(ticks) == 2:
            raise RuntimeError("the clock broke")
        return time.monotonic()

    def factory() -> Item:
        made.append(Item())
        return made[-1]

    pool = SafeConnectionPool(factory=factory, max_size=1, clock=clock)
    with pytest.raises(RuntimeError, match="clock broke"):
        pool.acquire(timeout=1)
    assert made and made[0].closed
    check_pool(pool)


# -- signal handlers raising at swept delays ---------------------------------------------------


def _pool_for(scenario: str) -> SafeConnectionPool[Item]:
    if scenario == "hooks":
        spin_hook = lambda item: spin(2e-5) or True  # noqa: E731 - a hook that takes a moment
        return SafeConnectionPool(
            factory=lambda: spin(2e-5) or Item(),
            max_size=2,
            check=spin_hook,
            reset=spin_hook,
            close=lambda item: spin(2e-5) or item.close(),
            max_lifetime=5e-4,
        )
    return SafeConnectionPool(factory=Item, max_size=1 if scenario == "waiting" else 2)


class Contenders:
    """Threads leasing the same pool while the main thread is interrupted; they also check that
    no item is ever held twice."""

    def __init__(
        self, pool: SafeConnectionPool[Item], count: int, hold: float, interrupter: Interrupter
    ) -> None:
        self.pool = pool
        self.interrupter = interrupter
        self.hold = hold
        self.holders: dict[int, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, name=f"contender-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def hold_item(self, item: Item, who: str) -> None:
        if who != "main":
            self._register(item, who)
            time.sleep(self.hold)
            self._unregister(item, who)
            return
        # The main thread is interrupted: never halfway through the bookkeeping.
        try:
            with self.interrupter.hold_off:
                self._register(item, who)
            spin(self.hold)
        finally:
            with self.interrupter.hold_off:
                self._unregister(item, who)

    def _register(self, item: Item, who: str) -> None:
        with self.lock:
            assert id(item) not in self.holders, f"{who} got an item {self.holders[id(item)]} holds"
            self.holders[id(item)] = who

    def _unregister(self, item: Item, who: str) -> None:
        with self.lock:
            if self.holders.get(id(item)) == who:
                del self.holders[id(item)]

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.pool.lease(timeout=SHORT) as item:
                    self.hold_item(item, threading.current_thread().name)
        except BaseException as exc:
            self.errors.append(exc)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(SHORT)
        assert not any(t.is_alive() for t in self.threads)
        assert not self.errors, self.errors


@pytest.mark.parametrize("scenario", ["lease", "hooks", "contended", "waiting"])
def test_signal_handler_raising_anywhere_in_a_lease(
    scenario: str, interrupter: Interrupter
) -> None:
    rng = seeded(f"inprocess-{scenario}")
    points = sweep_size(150 if scenario in ("contended", "waiting") else 300)
    pool = _pool_for(scenario)
    contenders = None
    if scenario in ("contended", "waiting"):
        contenders = Contenders(pool, 2, hold=5e-5, interrupter=interrupter)

        def operation() -> None:
            with pool.lease(timeout=SHORT) as item:
                contenders.hold_item(item, "main")  # type: ignore[union-attr]

    else:

        def operation() -> None:
            with pool.lease(timeout=SHORT):
                pass

    try:
        for point in range(points):
            delay = rng.uniform(0, 3e-4)
            exc = pick(rng)
            caught = interrupter.run_until_interrupted(operation, delay, exc)
            assert caught is exc, f"seed {SEED}, point {point}"
            assert contenders is None or not contenders.errors, (
                f"seed {SEED}, point {point}, landed at {interrupter.landed}: {contenders.errors}"
            )
            if contenders is None:
                check_pool(pool)
    finally:
        if contenders is not None:
            contenders.join()
    check_pool(pool)
    stats = pool.stats()
    assert stats.created - stats.closed == stats.size, stats
    assert interrupter.fired - interrupter.swallowed == points


def test_signal_handler_raising_in_construction_and_close(interrupter: Interrupter) -> None:
    """Interrupted while a pool fills itself (min_size) or closes: closing again finishes the
    work, and every item made is accounted for."""
    rng = seeded("inprocess-close")
    pools: list[SafeConnectionPool[Item]] = []

    def operation() -> None:
        pool = SafeConnectionPool(
            factory=lambda: spin(1e-5) or Item(),
            min_size=3,
            max_size=4,
            close=lambda item: spin(1e-5) or item.close(),
        )
        pools.append(pool)
        with pool.lease(timeout=SHORT):
            pass
        pool.close()

    for _ in range(sweep_size(200)):
        interrupter.run_until_interrupted(operation, rng.uniform(0, 2e-4), pick(rng))
    for pool in pools:
        pool.close()
        stats = pool.stats()
        assert (stats.size, stats.leased, stats.pending, stats.waiting) == (0, 0, 0, 0), stats
        assert stats.created == stats.closed, stats
