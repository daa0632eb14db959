"""Leasing and returning items: hooks, lifetimes, idle shrinking, leaks, stats, close."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

import pytest

from helpers import SHORT, FakeClock, SqliteFactory
from safepool import FactoryError, LeaseError, PoolClosed, SafeConnectionPool


class Item:
    """A connection-like item that records what happened to it."""

    made = 0

    def __init__(self) -> None:
        Item.made += 1
        self.number = Item.made
        self.closed = False
        self.healthy = True
        self.dirty = False

    def close(self) -> None:
        assert not self.closed, "closed twice"
        self.closed = True


def test_sqlite_connections_are_reused_and_work(tmp_path: Path) -> None:
    pool = SafeConnectionPool(factory=SqliteFactory(str(tmp_path / "db.sqlite")), max_size=2)
    with pool.lease() as conn:
        conn.execute("INSERT INTO rows (who) VALUES ('a')")
        conn.commit()
        first = conn
    with pool.lease() as conn:
        assert conn is first  # reused, not remade
        assert conn.execute("SELECT who FROM rows").fetchall() == [("a",)]
    stats = pool.stats()
    assert (stats.created, stats.requests, stats.idle, stats.leased) == (1, 2, 1, 0)
    pool.close()
    with pytest.raises(sqlite3.ProgrammingError):
        first.execute("SELECT 1")  # the pool closed it


def test_lease_returns_the_item_when_the_body_raises_any_base_exception() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=1)
    for exc in (ValueError("boom"), KeyboardInterrupt(), SystemExit(3)):
        with pytest.raises(type(exc)), pool.lease():
            raise exc
        assert pool.stats().idle == 1
    assert pool.stats().created == 1


def test_per_call_timeout_overrides_the_default() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=1, timeout=LONG_DEFAULT)
    held = pool.acquire()
    import time

    start = time.monotonic()
    from safepool import PoolTimeout

    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)
    assert time.monotonic() - start < LONG_DEFAULT / 2
    pool.release(held)


LONG_DEFAULT = 30.0


def test_lifo_reuse_keeps_the_most_recent_item_hot() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=3)
    a, b = pool.acquire(), pool.acquire()
    pool.release(a)
    pool.release(b)
    assert pool.acquire() is b


class TestForgedReleases:
    def test_unknown_object(self) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=2)
        with pool.lease():
            before = pool.stats()
            with pytest.raises(LeaseError, match="was not leased from this pool"):
                pool.release(Item())
            assert pool.stats() == before

    def test_item_of_another_pool(self) -> None:
        one = SafeConnectionPool(factory=Item, name="one")
        two = SafeConnectionPool(factory=Item, name="two")
        item = one.acquire()
        before = two.stats()
        with pytest.raises(LeaseError, match="pool 'two'"):
            two.release(item)
        assert two.stats() == before
        one.release(item)  # still releasable where it belongs

    def test_double_release(self) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=2)
        item = pool.acquire()
        pool.release(item)
        before = pool.stats()
        with pytest.raises(LeaseError, match="already released"):
            pool.release(item)
        assert pool.stats() == before
        assert not item.closed

    def test_release_while_its_first_release_is_still_resetting_it(self) -> None:
        resetting, finish = threading.Event(), threading.Event()

        def reset(item: Item) -> None:
            resetting.set()
            assert finish.wait(10)

        pool = SafeConnectionPool(factory=Item, max_size=1, reset=reset)
        item = pool.acquire()
        first = threading.Thread(target=pool.release, args=(item,))
        first.start()
        try:
            assert resetting.wait(10)
            with pytest.raises(LeaseError, match="is being returned already"):
                pool.release(item)
        finally:
            finish.set()
            first.join(10)
        assert pool.stats().idle == 1
        assert pool.acquire(timeout=0) is item

    def test_equal_but_not_identical_object(self) -> None:
        pool = SafeConnectionPool(factory=lambda: [1, 2], max_size=1)
        item = pool.acquire()
        with pytest.raises(LeaseError):
            pool.release([1, 2])
        pool.release(item)

    def test_factory_returning_the_same_object_twice_is_refused(self) -> None:
        shared = Item()
        pool = SafeConnectionPool(factory=lambda: shared, max_size=2)
        first = pool.acquire()
        with pytest.raises(FactoryError, match="already in the pool"):
            pool.acquire()
        assert not shared.closed
        stats = pool.stats()
        assert (stats.size, stats.leased) == (1, 1)
        pool.release(first)


class TestCheck:
    def test_check_runs_on_reuse_never_on_a_new_item(self) -> None:
        checked: list[Item] = []
        pool = SafeConnectionPool(factory=Item, check=checked.append, max_size=1)
        item = pool.acquire()
        assert checked == []
        pool.release(item)
        assert pool.acquire() is item
        assert checked == [item]

    @pytest.mark.parametrize("failure", ["raises", "returns False"])
    def test_failed_check_closes_and_silently_replaces(self, failure: str) -> None:
        def check(item: Item) -> bool:
            if not item.healthy and failure == "raises":
                raise ConnectionError("server went away")
            return item.healthy

        pool = SafeConnectionPool(factory=Item, check=check, max_size=1)
        item = pool.acquire()
        item.healthy = False
        pool.release(item)
        replacement = pool.acquire()
        assert replacement is not item and item.closed and not replacement.closed
        stats = pool.stats()
        assert (stats.lost, stats.closed, stats.created, stats.size) == (1, 1, 2, 1)

    def test_check_is_run_outside_the_lock(self) -> None:
        inside = threading.Event()
        proceed = threading.Event()

        def slow_check(item: Item) -> None:
            inside.set()
            assert proceed.wait(SHORT)

        pool = SafeConnectionPool(factory=Item, check=slow_check, max_size=2)
        item = pool.acquire()
        pool.release(item)
        from helpers import ThreadResult

        checking = ThreadResult(pool.acquire)
        assert inside.wait(SHORT)
        # While the check runs, the pool serves others and answers stats().
        other = pool.acquire(timeout=SHORT)
        assert pool.stats().pending == 1
        pool.release(other)
        proceed.set()
        assert checking.join() is item


class TestReset:
    def test_reset_runs_on_every_return(self) -> None:
        resets: list[Item] = []
        pool = SafeConnectionPool(factory=Item, reset=resets.append, max_size=1)
        item = pool.acquire()
        pool.release(item)
        assert resets == [item]
        assert pool.acquire() is item

    def test_failed_reset_discards(self, caplog: pytest.LogCaptureFixture) -> None:
        def reset(item: Item) -> None:
            if item.dirty:
                raise RuntimeError("rollback failed")

        pool = SafeConnectionPool(factory=Item, reset=reset, max_size=1, name="resetting")
        item = pool.acquire()
        item.dirty = True
        with caplog.at_level(logging.WARNING, logger="safepool"):
            pool.release(item)
        assert item.closed
        assert "pool 'resetting': reset of a Item failed: RuntimeError: rollback failed" in (
            caplog.text
        )
        stats = pool.stats()
        assert (stats.lost, stats.size, stats.idle) == (1, 0, 0)
        assert pool.acquire() is not item

    def test_discard_closes_without_reset(self) -> None:
        resets: list[Item] = []
        pool = SafeConnectionPool(factory=Item, reset=resets.append, max_size=1)
        item = pool.acquire()
        pool.release(item, discard=True)
        assert item.closed and resets == []
        assert pool.stats().lost == 0  # a deliberate discard is not a loss


class TestClose:
    def test_custom_close_hook(self) -> None:
        closed: list[object] = []
        pool = SafeConnectionPool(factory=object, close=closed.append, max_size=2)
        item = pool.acquire()
        pool.release(item, discard=True)
        assert closed == [item]

    def test_items_without_close_are_just_dropped(self) -> None:
        pool = SafeConnectionPool(factory=lambda: 42.5, max_size=1)
        pool.release(pool.acquire(), discard=True)
        assert pool.stats().closed == 1

    def test_failing_close_hook_is_logged_not_raised(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        def bad_close(item: object) -> None:
            raise OSError("socket already gone")

        pool = SafeConnectionPool(factory=object, close=bad_close, name="p")
        with caplog.at_level(logging.WARNING, logger="safepool"):
            pool.release(pool.acquire(), discard=True)
        assert "pool 'p': close of a object failed: OSError: socket already gone" in caplog.text
        assert pool.stats().size == 0

    def test_close_closes_idle_now_and_leased_on_return(self) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=3)
        idle, leased = pool.acquire(), pool.acquire()
        pool.release(idle)
        pool.close()
        assert idle.closed and not leased.closed
        pool.release(leased)
        assert leased.closed
        with pytest.raises(PoolClosed, match="is closed"):
            pool.acquire()
        pool.close()  # harmless
        assert pool.closed and pool.stats().size == 0

    def test_pool_is_a_context_manager(self) -> None:
        with SafeConnectionPool(factory=Item) as pool:
            item = pool.acquire()
            pool.release(item)
        assert pool.closed and item.closed

    def test_item_made_while_closing_is_closed(self) -> None:
        making = threading.Event()
        proceed = threading.Event()
        made: list[Item] = []

        def factory() -> Item:
            making.set()
            assert proceed.wait(SHORT)
            made.append(Item())
            return made[-1]

        pool = SafeConnectionPool(factory=factory)
        from helpers import ThreadResult

        result = ThreadResult(pool.acquire)
        assert making.wait(SHORT)
        pool.close()
        proceed.set()
        with pytest.raises(PoolClosed):
            result.join()
        assert made[0].closed
        assert pool.stats().size == 0


class TestLifetime:
    def test_expired_idle_item_is_replaced_not_handed_out(self, clock: FakeClock) -> None:
        pool = SafeConnectionPool(factory=Item, max_lifetime=60, clock=clock, max_size=1)
        old = pool.acquire()
        pool.release(old)
        clock.advance(59)
        assert pool.acquire() is old  # not yet
        pool.release(old)
        clock.advance(1)
        new = pool.acquire()
        assert new is not old and old.closed
        assert pool.stats().closed == 1

    def test_expired_item_is_closed_on_release(self, clock: FakeClock) -> None:
        pool = SafeConnectionPool(factory=Item, max_lifetime=10, clock=clock, max_size=1)
        item = pool.acquire()
        clock.advance(11)
        pool.release(item)
        assert item.closed
        assert (pool.stats().size, pool.stats().lost) == (0, 0)

    def test_maintain_closes_expired_idle_items(self, clock: FakeClock) -> None:
        pool = SafeConnectionPool(factory=Item, max_lifetime=10, clock=clock, min_size=2)
        clock.advance(10)
        pool.maintain()
        assert pool.stats().size == 0


class TestIdle:
    def test_idle_items_shrink_to_min_size(self, clock: FakeClock) -> None:
        pool = SafeConnectionPool(factory=Item, min_size=2, max_size=5, max_idle=30, clock=clock)
        items = [pool.acquire() for _ in range(5)]
        for item in items:
            pool.release(item)
        clock.advance(29)
        pool.maintain()
        assert pool.stats().idle == 5
        clock.advance(1)
        pool.maintain()
        stats = pool.stats()
        assert (stats.size, stats.idle, stats.closed) == (2, 2, 3)
        # The longest-idle items went; the most recently used stayed.
        assert [i.closed for i in items] == [True, True, True, False, False]

    def test_recently_used_items_are_kept(self, clock: FakeClock) -> None:
        pool = SafeConnectionPool(factory=Item, max_size=3, max_idle=30, clock=clock)
        a, b = pool.acquire(), pool.acquire()
        pool.release(a)
        clock.advance(20)
        pool.release(b)
        clock.advance(15)
        pool.maintain()
        assert a.closed and not b.closed

    def test_no_thread_without_background(self, clock: FakeClock) -> None:
        before = {t.name for t in threading.enumerate()}
        pool = SafeConnectionPool(
            factory=Item, max_idle=1, leak_timeout=1, background=False, clock=clock
        )
        pool.release(pool.acquire())
        assert {t.name for t in threading.enumerate()} == before
        clock.advance(2)
        pool.maintain()
        assert pool.stats().size == 0

    def test_background_thread_shrinks_idle_items(self) -> None:
        closed = threading.Event()
        pool = SafeConnectionPool(
            factory=object, close=lambda item: closed.set(), max_idle=0.05, max_size=2
        )
        pool.release(pool.acquire())
        assert closed.wait(SHORT), "the housekeeper never closed the idle item"
        assert pool.stats().size == 0


class TestLeaks:
    def test_leak_is_reported_with_the_acquiring_stack_and_counted(
        self, clock: FakeClock, caplog: pytest.LogCaptureFixture
    ) -> None:
        pool = SafeConnectionPool(factory=Item, leak_timeout=5, clock=clock, name="leaky")

        def forgetful_caller() -> Item:
            return pool.acquire()

        item = forgetful_caller()
        clock.advance(4)
        pool.maintain()
        assert pool.stats().leaks == 0
        clock.advance(1)
        with caplog.at_level(logging.WARNING, logger="safepool"):
            pool.maintain()
            pool.maintain()  # reported once, not on every pass
        assert pool.stats().leaks == 1
        [record] = [r for r in caplog.records if "lease has been held" in r.getMessage()]
        message = record.getMessage()
        assert "pool 'leaky'" in message
        assert f"thread {threading.current_thread().name!r}" in message
        assert "forgetful_caller" in message
        pool.release(item)
        assert pool.stats().leaks == 1

    def test_background_thread_reports_leaks(self) -> None:
        reported = threading.Event()

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "lease has been held" in record.getMessage():
                    reported.set()

        handler = Handler()
        logging.getLogger("safepool").addHandler(handler)
        try:
            pool = SafeConnectionPool(factory=Item, leak_timeout=0.05)
            item = pool.acquire()
            assert reported.wait(SHORT), "the housekeeper never reported the leak"
            assert pool.stats().leaks == 1
            pool.release(item)
        finally:
            logging.getLogger("safepool").removeHandler(handler)


def test_stats_count_everything(clock: FakeClock) -> None:
    pool = SafeConnectionPool(factory=Item, max_size=2, clock=clock)
    a = pool.acquire()
    clock.advance(2)
    b = pool.acquire()
    clock.advance(3)
    pool.release(a)
    pool.release(b)
    stats = pool.stats()
    assert stats.lease_time == pytest.approx(8.0)
    assert (stats.requests, stats.created, stats.size, stats.max_size) == (2, 2, 2, 2)
    assert stats.as_dict()["lease_time"] == pytest.approx(8.0)


def test_repr_never_shows_the_factory() -> None:
    class Factory:
        def __repr__(self) -> str:
            return "Factory(password='s3cret')"

        def __call__(self) -> object:
            return object()

    pool = SafeConnectionPool(factory=Factory(), name="db")
    assert "s3cret" not in repr(pool) and "'db'" in repr(pool)
