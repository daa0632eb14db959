"""Waiting for an item: strict FIFO, direct hand-off, timeouts, max_waiting, close, interrupts."""

from __future__ import annotations

import gc
import random
import threading
import time

import pytest

from helpers import LONG, SHORT, ThreadResult, wait_until
from safepool import PoolClosed, PoolTimeout, SafeConnectionPool, TooManyWaiting

# A timeout may end late on a loaded machine, never early.
LATE_TOLERANCE = 1.0


def waiting(pool: SafeConnectionPool[object], count: int) -> None:
    wait_until(lambda: pool.stats().waiting == count, what=f"{count} waiters")


def test_waiters_are_served_first_come_first_served() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    order: list[int] = []
    waiters = []
    for i in range(8):

        def wait_then_pass(i: int = i) -> None:
            item = pool.acquire(timeout=LONG)
            order.append(i)
            pool.release(item)

        waiters.append(ThreadResult(wait_then_pass, name=f"waiter-{i}"))
        waiting(pool, i + 1)  # enqueue one at a time, so arrival order is known
    pool.release(held)
    for w in waiters:
        w.join(LONG)
    assert order == list(range(8))
    assert pool.stats().waits == 8


def test_released_item_goes_straight_to_the_oldest_waiter() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
    waiting(pool, 1)
    pool.release(held)
    # Handed over under the lock: a newcomer cannot barge in between.
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0)
    assert waiter.join() is held


@pytest.mark.parametrize("timeout", [0.05, 0.2])
def test_timeout_is_never_early(timeout: float) -> None:
    pool = SafeConnectionPool(factory=object, max_size=1, timeout=timeout)
    held = pool.acquire()
    for per_call in (None, timeout):
        start = time.monotonic()
        with pytest.raises(PoolTimeout, match=f"within {timeout:g}s"):
            pool.acquire(timeout=per_call)
        elapsed = time.monotonic() - start
        assert timeout <= elapsed < timeout + LATE_TOLERANCE
    stats = pool.stats()
    assert (stats.timeouts, stats.waiting) == (2, 0)
    assert stats.wait_time >= 2 * timeout
    pool.release(held)


def test_zero_timeout_fails_at_once_but_may_still_create() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    item = pool.acquire(timeout=0)  # capacity left: made at once
    start = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0)
    assert time.monotonic() - start < LATE_TOLERANCE
    pool.release(item)


def test_max_waiting_refuses_at_once_and_changes_no_waiter() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1, max_waiting=2)
    held = pool.acquire()
    waiters = [ThreadResult(lambda: pool.acquire(timeout=LONG)) for _ in range(2)]
    waiting(pool, 2)
    start = time.monotonic()
    with pytest.raises(TooManyWaiting, match=r"2 callers are already waiting \(max_waiting=2\)"):
        pool.acquire(timeout=LONG)
    assert time.monotonic() - start < LATE_TOLERANCE
    assert pool.stats().waiting == 2
    pool.release(held)
    first = waiters[0].join()
    pool.release(first)
    pool.release(waiters[1].join())


def test_close_wakes_every_waiter_with_pool_closed() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    waiters = [ThreadResult(lambda: pool.acquire(timeout=LONG)) for _ in range(5)]
    waiting(pool, 5)
    start = time.monotonic()
    pool.close()
    for w in waiters:
        with pytest.raises(PoolClosed, match="closed while waiting"):
            w.join(SHORT)
    assert time.monotonic() - start < SHORT
    pool.release(held)


def test_timed_out_waiter_never_loses_a_handed_item() -> None:
    """Release right around a waiter's deadline, many times: whichever way each race goes, the
    item is either the waiter's or back in the pool; nothing is ever lost."""
    TIMEOUT = 0.02
    pool = SafeConnectionPool(factory=object, max_size=1)
    rng = random.Random(1234)
    outcomes = {"got it": 0, "timed out": 0}
    for _ in range(60):
        held = pool.acquire()
        result = ThreadResult(lambda: pool.acquire(timeout=TIMEOUT))
        # Waiting, or (on a loaded machine) already timed out before this thread looked.
        wait_until(
            lambda result=result: pool.stats().waiting == 1 or not result.is_alive(),
            what="a waiter",
        )
        # Release a little before or after the waiter's deadline.
        deadline = time.monotonic() + TIMEOUT + rng.uniform(-0.01, 0.01)
        while time.monotonic() < deadline:
            pass
        pool.release(held)
        try:
            item = result.join(SHORT)
        except PoolTimeout:
            outcomes["timed out"] += 1
            stats = pool.stats()
            assert (stats.idle, stats.leased, stats.waiting) == (1, 0, 0)
        else:
            outcomes["got it"] += 1
            assert item is held
            pool.release(item)
        assert pool.stats().size == 1
    assert pool.stats().created == 1
    assert sum(outcomes.values()) == 60


def test_interrupted_waiter_leaves_the_queue_and_loses_nothing() -> None:
    """A waiter interrupted by an exception (here raised from a close hook of another item is not
    possible, so we use a KeyboardInterrupt injected into the waiting thread)."""
    import ctypes

    pool = SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    ident: list[int] = []

    def wait() -> object:
        ident.append(threading.get_ident())
        return pool.acquire(timeout=LONG)

    # The exception lands wherever the waiter runs bytecode next: no garbage collection may
    # run there meanwhile (a finaliser of an earlier test's object would take it instead).
    gc.collect()
    gc.disable()
    try:
        waiter = ThreadResult(wait)
        waiting(pool, 1)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(
            ctypes.c_ulong(ident[0]), ctypes.py_object(KeyboardInterrupt)
        )
        # The async exception is delivered when the waiter next runs bytecode: wake it.
        pool.release(held)
        try:
            item = waiter.join(SHORT)
        except KeyboardInterrupt:
            pass
        else:  # the item arrived before the interrupt: fine, as long as it is returned
            pool.release(item)
    finally:
        gc.enable()
    wait_until(lambda: pool.stats().idle == 1, what="item back in the pool")
    stats = pool.stats()
    assert (stats.size, stats.waiting, stats.leased) == (1, 0, 0)


def test_waiter_gets_a_fresh_slot_when_a_leased_item_is_discarded() -> None:
    pool = SafeConnectionPool(factory=object, max_size=1)
    held = pool.acquire()
    waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
    waiting(pool, 1)
    pool.release(held, discard=True)
    fresh = waiter.join()
    assert fresh is not held
    assert (pool.stats().created, pool.stats().size) == (2, 1)
    pool.release(fresh)


def test_waiter_gets_the_slot_of_a_failed_factory() -> None:
    attempts = 0
    go = threading.Event()
    entered = threading.Event()

    def factory() -> object:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            entered.set()
            assert go.wait(SHORT)
            raise ConnectionRefusedError("db down")
        return object()

    pool = SafeConnectionPool(factory=factory, max_size=1)
    from safepool import FactoryError

    first = ThreadResult(pool.acquire)
    assert entered.wait(SHORT)
    second = ThreadResult(lambda: pool.acquire(timeout=LONG))
    waiting(pool, 1)
    go.set()
    with pytest.raises(FactoryError) as info:
        first.join()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert second.join() is not None
    assert pool.stats().size == 1
