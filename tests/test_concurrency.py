"""Many threads at once: capacity is never exceeded, no item is held twice, I/O never blocks."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from helpers import LONG, SHORT, SqliteFactory, ThreadResult, run_threads
from safepool import FactoryError, SafeConnectionPool


class Tracked:
    """An item that fails loudly if two leases hold it at once."""

    live = 0
    peak = 0
    guard = threading.Lock()

    def __init__(self) -> None:
        with Tracked.guard:
            Tracked.live += 1
            Tracked.peak = max(Tracked.peak, Tracked.live)
        self.holder: int | None = None

    def take(self) -> None:
        me = threading.get_ident()
        if self.holder is not None:
            raise AssertionError(f"item held by {self.holder} handed to {me}")
        self.holder = me

    def give_back(self) -> None:
        self.holder = None

    def close(self) -> None:
        with Tracked.guard:
            Tracked.live -= 1


@pytest.mark.parametrize("hooks", ["plain", "check+reset+discards"])
def test_40_threads_never_exceed_capacity_nor_share_an_item(hooks: str) -> None:
    Tracked.live = Tracked.peak = 0
    max_size = 5
    extra = {}
    if hooks != "plain":
        extra = {"check": lambda item: True, "reset": lambda item: True}
    pool = SafeConnectionPool(factory=Tracked, max_size=max_size, timeout=LONG, **extra)

    def work(i: int) -> None:
        rng = random.Random(i)
        for n in range(300):
            item = pool.acquire()
            item.take()
            stats = pool.stats()
            assert stats.size <= max_size and stats.leased <= max_size
            if rng.random() < 0.01:
                threading.Event().wait(0.0005)  # hold it a little, let others queue
            item.give_back()
            pool.release(item, discard=hooks != "plain" and n % 50 == 0)

    run_threads(40, work)
    stats = pool.stats()
    assert Tracked.peak <= max_size
    assert stats.size <= max_size and stats.leased == 0 and stats.waiting == 0
    assert stats.requests == 40 * 300
    assert stats.created - stats.closed == stats.size == Tracked.live
    pool.close()
    assert Tracked.live == 0


def test_sqlite_rows_written_by_many_threads_all_land(tmp_path: Path) -> None:
    pool = SafeConnectionPool(factory=SqliteFactory(str(tmp_path / "db.sqlite")), max_size=4)

    def write(i: int) -> None:
        for n in range(20):
            with pool.lease(timeout=LONG) as conn:
                conn.execute("INSERT INTO rows (who) VALUES (?)", (f"{i}-{n}",))
                conn.commit()

    run_threads(12, write)
    with pool.lease() as conn:
        assert conn.execute("SELECT count(*) FROM rows").fetchone() == (240,)
    assert pool.stats().created <= 4
    pool.close()


def test_slow_factory_blocks_no_other_lease_or_release() -> None:
    in_factory = threading.Event()
    finish = threading.Event()
    slow_first = [True]

    def factory() -> object:
        if slow_first[0]:
            slow_first[0] = False
            in_factory.set()
            assert finish.wait(LONG)
        return object()

    pool = SafeConnectionPool(factory=factory, max_size=3)
    slow = ThreadResult(pool.acquire, name="slow")
    assert in_factory.wait(SHORT)
    # While the factory runs: other leases are made and returned, stats answer.
    for _ in range(3):
        item = pool.acquire(timeout=SHORT)
        pool.release(item)
    assert pool.stats().pending == 1
    finish.set()
    pool.release(slow.join())


def test_failing_factory_frees_its_slot_and_chains_the_cause() -> None:
    fail = [True]

    def factory() -> object:
        if fail[0]:
            raise ConnectionRefusedError("connection refused")
        return object()

    pool = SafeConnectionPool(factory=factory, max_size=1, name="flaky")
    for _ in range(3):  # the slot is never lost: each attempt may try again
        with pytest.raises(FactoryError, match="pool 'flaky': the factory raised") as info:
            pool.acquire(timeout=0)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert pool.stats().size == 0
    fail[0] = False
    pool.release(pool.acquire(timeout=0))


def test_factory_base_exception_propagates_unwrapped_and_frees_the_slot() -> None:
    def factory() -> object:
        raise KeyboardInterrupt

    pool = SafeConnectionPool(factory=factory, max_size=1)
    with pytest.raises(KeyboardInterrupt):
        pool.acquire()
    assert pool.stats().size == 0


def test_stats_and_release_never_wait_for_a_blocked_acquire() -> None:
    pool = SafeConnectionPool(factory=object, max_size=2)
    a, b = pool.acquire(), pool.acquire()
    blocked = [ThreadResult(lambda: pool.acquire(timeout=LONG)) for _ in range(4)]
    from helpers import wait_until

    wait_until(lambda: pool.stats().waiting == 4)
    pool.release(a)
    pool.release(b)
    got = [w.join() for w in blocked[:2]]
    for item in got:
        pool.release(item)
    for w in blocked[2:]:
        pool.release(w.join())
    assert pool.stats().waiting == 0
