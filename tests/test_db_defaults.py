"""Safe database defaults: a connection returned inside a transaction is rolled back (with a
warning naming the pool) before anyone else gets it; ``reset=None`` opts out; ``configure=``,
``dbapi.check_connection``; the max_lifetime / max_idle defaults; and the pickle hint.

Real sqlite3 files (tmp_path), a real PostgreSQL (skipped without one: see conftest.pg_dsn),
real manager servers and real process pools.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import multiprocessing
import pickle
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from helpers import (
    FORK_WARNING,
    LONG,
    SEED,
    SHORT,
    START_METHODS,
    FakeClock,
    SqliteFactory,
    seeded,
    sweep_size,
)
from interrupts import INTERRUPTIONS, Interrupter, check_pool, pick
from safepool import FactoryError, PoolManager, SafeConnectionPool, dbapi

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)

ROLLBACK_WARNING = "rolling back a returned"


@pytest.fixture
def db(tmp_path: Path) -> SqliteFactory:
    return SqliteFactory(str(tmp_path / "db.sqlite"))


def count_rows(path: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM rows").fetchone()[0])


def insert(conn: Any, who: str = "x") -> None:
    conn.execute("INSERT INTO rows (who) VALUES (?)", (who,))


# -- sqlite3 -----------------------------------------------------------------------------------


class TestSqliteRollback:
    def test_a_transaction_left_open_is_rolled_back_with_a_warning_naming_the_pool(
        self, db: SqliteFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        with SafeConnectionPool(factory=db, max_size=1, name="orders-db") as pool:
            with caplog.at_level(logging.WARNING, logger="safepool"):
                with pool.lease() as conn:
                    insert(conn)
                    assert conn.in_transaction
                with pool.lease() as again:
                    assert again is conn  # the same connection, reused
                    assert not again.in_transaction
            assert count_rows(db.path) == 0
            warnings = [r for r in caplog.records if ROLLBACK_WARNING in r.getMessage()]
            assert len(warnings) == 1
            assert "'orders-db'" in warnings[0].getMessage()
            assert "sqlite3.Connection" in warnings[0].getMessage()
            stats = pool.stats()
            assert (stats.created, stats.closed, stats.lost) == (1, 0, 0)

    def test_a_committed_connection_is_not_touched(
        self, db: SqliteFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        with SafeConnectionPool(factory=db, max_size=1) as pool:
            with caplog.at_level(logging.DEBUG, logger="safepool"):
                for _ in range(3):
                    with pool.lease() as conn:
                        insert(conn)
                        conn.commit()
            assert count_rows(db.path) == 3
            assert ROLLBACK_WARNING not in caplog.text

    def test_reset_none_opts_out_and_keeps_the_transaction(self, db: SqliteFactory) -> None:
        with SafeConnectionPool(factory=db, max_size=1, reset=None) as pool:
            with pool.lease() as conn:
                insert(conn)
            with pool.lease() as again:
                assert again is conn and again.in_transaction  # as it was released
                again.commit()
        assert count_rows(db.path) == 1

    def test_an_explicit_rollback_if_in_transaction_names_the_pool(
        self, db: SqliteFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        pool = SafeConnectionPool(
            factory=db, max_size=1, name="explicit", reset=dbapi.rollback_if_in_transaction
        )
        with caplog.at_level(logging.WARNING, logger="safepool"), pool:
            with pool.lease() as conn:
                insert(conn)
            with pool.lease() as conn:
                assert not conn.in_transaction
        assert "pool 'explicit': rolling back" in caplog.text

    def test_the_helper_on_its_own(self, db: SqliteFactory) -> None:
        conn = db()
        try:
            dbapi.rollback_if_in_transaction(conn)  # idle: nothing to do
            insert(conn)
            dbapi.rollback_if_in_transaction(conn)
            assert not conn.in_transaction
        finally:
            conn.close()
        assert count_rows(db.path) == 0

    def test_a_connection_whose_rollback_fails_is_closed_and_replaced(
        self, db: SqliteFactory
    ) -> None:
        """Its holder closed it inside a transaction: the probe and the rollback both raise."""
        with SafeConnectionPool(factory=db, max_size=1) as pool:
            with pool.lease() as conn:
                insert(conn)
                conn.close()
            with pool.lease() as fresh:
                assert fresh is not conn and not fresh.in_transaction
                insert(fresh, "after")
                fresh.commit()
            stats = pool.stats()
            assert (stats.created, stats.closed, stats.lost, stats.size) == (2, 1, 1, 1)
            check_pool(pool)

    def test_only_dbapi_connections_are_reset(self) -> None:
        """Other items take the direct path back (no reset hook at all)."""
        with SafeConnectionPool(factory=list, max_size=1) as pool:
            with pool.lease() as item:
                item.append(1)
            assert pool._probe is None
            with pool.lease() as again:
                assert again == [1]


def steady_connect(path: str) -> Any:
    """A DB-API connection from another library (DBUtils' SteadyDB wrapper around sqlite3),
    whose transaction state safepool cannot read."""
    from dbutils.steady_db import connect

    return connect(sqlite3, database=path, check_same_thread=False)


def test_a_driver_that_does_not_tell_is_always_rolled_back_quietly(
    db: SqliteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    factory = functools.partial(steady_connect, db.path)
    with SafeConnectionPool(factory=factory, max_size=1) as pool:
        probe = factory()
        assert dbapi.is_connection(probe)
        probe.close()
        with caplog.at_level(logging.WARNING, logger="safepool"):
            with pool.lease() as conn:
                conn.cursor().execute("INSERT INTO rows (who) VALUES ('forgot')")
            other_writer(db.path)  # not locked out: the transaction was rolled back
            with pool.lease() as again:
                assert again is conn
        assert ROLLBACK_WARNING not in caplog.text  # its state is unknown: no warning
        assert pool._probe is None
    assert count_rows(db.path) == 1  # the other writer's row only


class TestConfigure:
    def test_runs_once_on_each_new_connection(self, db: SqliteFactory) -> None:
        seen: list[int] = []

        def configure(conn: sqlite3.Connection) -> None:
            conn.execute("PRAGMA foreign_keys = ON")
            seen.append(id(conn))

        with SafeConnectionPool(factory=db, max_size=2, configure=configure) as pool:
            for _ in range(3):
                with pool.lease() as a, pool.lease() as b:
                    for conn in (a, b):
                        assert conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
            assert len(seen) == 2 and pool.stats().created == 2

    def test_a_failing_configure_closes_the_connection_and_loses_no_slot(
        self, db: SqliteFactory
    ) -> None:
        made: list[sqlite3.Connection] = []
        failures = iter([True, False])

        def configure(conn: sqlite3.Connection) -> None:
            made.append(conn)
            if next(failures):
                conn.execute("SELECT * FROM no_such_table")

        with SafeConnectionPool(factory=db, max_size=1, configure=configure, name="cfg") as pool:
            with pytest.raises(FactoryError, match="pool 'cfg': configure raised") as info:
                pool.acquire(timeout=SHORT)
            assert isinstance(info.value.__cause__, sqlite3.Error)
            with pytest.raises(sqlite3.ProgrammingError, match="closed"):
                made[0].execute("SELECT 1")
            assert pool.stats().size == 0
            with pool.lease(timeout=SHORT) as conn:  # the one slot is usable
                assert conn is made[1]
            check_pool(pool)

    def test_a_failing_configure_at_construction(self, db: SqliteFactory) -> None:
        made: list[sqlite3.Connection] = []

        def configure(conn: sqlite3.Connection) -> None:
            made.append(conn)
            raise ValueError("no")

        with pytest.raises(FactoryError, match="configure raised ValueError: no"):
            SafeConnectionPool(factory=db, min_size=1, configure=configure)
        with pytest.raises(sqlite3.ProgrammingError):
            made[0].execute("SELECT 1")

    def test_bad_configure_is_rejected_up_front(self, db: SqliteFactory) -> None:
        with pytest.raises(TypeError, match="configure must be callable"):
            SafeConnectionPool(factory=db, configure="PRAGMA foreign_keys = ON")  # type: ignore[arg-type]


class TestOptions:
    @pytest.mark.parametrize(
        ("option", "value", "message"),
        [
            ("reset", "rollback", "reset must be a callable, None .* or 'auto'"),
            ("max_lifetime", "forever", "max_lifetime must be a number of seconds, None"),
            ("max_idle", "never", "max_idle must be a number of seconds, None"),
            ("leak_timeout", "auto", "leak_timeout must be a number of seconds"),
        ],
    )
    def test_bad_values_are_rejected(self, option: str, value: str, message: str) -> None:
        with pytest.raises((TypeError, ValueError), match=message):
            SafeConnectionPool(factory=list, **{option: value})

    def test_a_manager_rejects_them_before_anything_is_sent(self) -> None:
        manager = PoolManager()  # never started: the options are checked in the client first
        with pytest.raises(ValueError, match="reset must be a callable"):
            manager.SafeConnectionPool(factory=list, reset="rollback")
        with pytest.raises(TypeError, match="configure must be callable"):
            manager.SafeConnectionPool(factory=list, configure=3)

    def test_auto_may_be_given_explicitly(self, db: SqliteFactory) -> None:
        pool = SafeConnectionPool(factory=db, reset="auto", max_lifetime="auto", max_idle="auto")
        with pool:
            with pool.lease() as conn:
                insert(conn)
            with pool.lease() as conn:
                assert not conn.in_transaction

    def test_sqlite_and_other_items_are_never_recycled_by_default(
        self, db: SqliteFactory, clock: FakeClock
    ) -> None:
        for factory in (db, list):
            with SafeConnectionPool(factory=factory, max_size=1, clock=clock) as pool:
                with pool.lease() as first:
                    pass
                clock.advance(10 * 24 * 3600.0)
                assert pool.maintain() == math.inf
                with pool.lease() as again:
                    assert again is first
                assert pool.stats().created == 1


class InterruptedOnce(sqlite3.Connection):
    """A real sqlite3 connection whose ``rollback`` (or ``in_transaction``, the pool's probe)
    raises ``exc`` the first time: fault injection into the default reset."""

    exc: type[BaseException] = KeyboardInterrupt
    where = "rollback"
    raised = False

    def _maybe_raise(self, where: str) -> None:
        if where == self.where and not type(self).raised:
            type(self).raised = True
            raise self.exc("injected")

    def rollback(self) -> None:
        self._maybe_raise("rollback")
        super().rollback()

    @property
    def in_transaction(self) -> bool:
        self._maybe_raise("in_transaction")
        return super().in_transaction


class TestInterrupted:
    @pytest.mark.parametrize("where", ["rollback", "in_transaction"])
    @pytest.mark.parametrize("exc", INTERRUPTIONS, ids=lambda e: e.__name__)
    def test_the_default_reset_raising(
        self, db: SqliteFactory, exc: type[BaseException], where: str
    ) -> None:
        connection_class = type(
            "Injected", (InterruptedOnce,), {"exc": exc, "where": where, "raised": False}
        )

        def factory() -> sqlite3.Connection:
            return sqlite3.connect(db.path, check_same_thread=False, factory=connection_class)

        with SafeConnectionPool(factory=factory, max_size=1) as pool:
            with pytest.raises(exc, match="injected"), pool.lease() as conn:
                insert(conn)
            assert connection_class.raised
            check_pool(pool)
            with pool.lease() as again:
                assert not again.in_transaction
            stats = pool.stats()
            assert stats.created - stats.closed == stats.size == 1, stats
        assert count_rows(db.path) == 0

    def test_interrupted_anywhere_in_the_rollback_path(self, db: SqliteFactory) -> None:
        """Each lease leaves a transaction open, so every release runs the probe and the
        rollback; a signal handler raises at swept points. Afterwards: counts add up, full
        capacity, and no holder ever gets a connection inside a transaction."""
        rng = seeded("db-defaults-rollback")
        points = sweep_size(200)
        pool = SafeConnectionPool(factory=db, max_size=2, name="swept")
        logging.getLogger("safepool.dbapi").setLevel(logging.ERROR)  # one warning per lease

        def operation() -> None:
            with pool.lease(timeout=SHORT) as conn:
                assert not conn.in_transaction, f"seed {SEED}: handed out inside a transaction"
                insert(conn)

        try:
            with Interrupter() as interrupter:
                for point in range(points):
                    exc = pick(rng)
                    caught = interrupter.run_until_interrupted(operation, rng.uniform(0, 4e-4), exc)
                    assert caught is exc, f"seed {SEED}, point {point}"
                    check_pool(pool)
            stats = pool.stats()
            assert stats.created - stats.closed == stats.size, stats
            for _ in range(2):
                with pool.lease() as conn:
                    assert not conn.in_transaction
        finally:
            logging.getLogger("safepool.dbapi").setLevel(logging.NOTSET)
            pool.close()
        assert count_rows(db.path) == 0  # nothing was ever committed


# -- PostgreSQL --------------------------------------------------------------------------------


def pg_connect(dsn: str) -> Any:
    import psycopg

    return psycopg.connect(dsn)


def terminate(dsn: str, backend_pid: int) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))


@pytest.fixture
def pg_pool(pg_dsn: str) -> Iterator[SafeConnectionPool[Any]]:
    with SafeConnectionPool(
        factory=functools.partial(pg_connect, pg_dsn), max_size=1, name="pg"
    ) as pool:
        yield pool


@pytest.mark.postgres
class TestPostgres:
    def test_intrans_and_inerror_are_rolled_back(
        self, pg_pool: SafeConnectionPool[Any], pg_table: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        from psycopg import errors
        from psycopg.pq import TransactionStatus

        with caplog.at_level(logging.WARNING, logger="safepool"):
            with pg_pool.lease() as conn:
                conn.execute(f"INSERT INTO {pg_table} (who) VALUES ('x')")
                assert conn.info.transaction_status == TransactionStatus.INTRANS
            with pg_pool.lease() as again:
                assert again is conn
                assert again.info.transaction_status == TransactionStatus.IDLE
                assert again.execute(f"SELECT count(*) FROM {pg_table}").fetchone() == (0,)
                with pytest.raises(errors.UndefinedTable):
                    again.execute("SELECT * FROM no_such_table_here")
                assert again.info.transaction_status == TransactionStatus.INERROR
            with pg_pool.lease() as third:
                assert third is conn
                assert third.info.transaction_status == TransactionStatus.IDLE
        warnings = [r.getMessage() for r in caplog.records if ROLLBACK_WARNING in r.getMessage()]
        assert len(warnings) == 2  # INTRANS, then INERROR
        assert all("pool 'pg'" in w and "psycopg.Connection" in w for w in warnings)

    def test_reset_none_keeps_the_transaction(self, pg_dsn: str, pg_table: str) -> None:
        from psycopg.pq import TransactionStatus

        factory = functools.partial(pg_connect, pg_dsn)
        with SafeConnectionPool(factory=factory, max_size=1, reset=None) as pool:
            with pool.lease() as conn:
                conn.execute(f"INSERT INTO {pg_table} (who) VALUES ('x')")
            with pool.lease() as again:
                assert again.info.transaction_status == TransactionStatus.INTRANS
                again.rollback()

    def test_a_killed_backend_inside_a_transaction_is_discarded(
        self, pg_pool: SafeConnectionPool[Any], pg_dsn: str
    ) -> None:
        from psycopg.pq import TransactionStatus

        with pg_pool.lease() as conn:
            conn.execute("SELECT 1")  # opens a transaction
            terminate(pg_dsn, conn.info.backend_pid)
        with pg_pool.lease() as fresh:
            assert fresh is not conn and conn.closed
            assert fresh.info.transaction_status == TransactionStatus.IDLE
            assert fresh.execute("SELECT 1").fetchone() == (1,)
        stats = pg_pool.stats()
        assert (stats.created, stats.closed, stats.size) == (2, 1, 1)

    def test_check_connection_replaces_a_killed_idle_connection(
        self, pg_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        from psycopg.pq import TransactionStatus

        factory = functools.partial(pg_connect, pg_dsn)
        with SafeConnectionPool(factory=factory, max_size=1, check=dbapi.check_connection) as pool:
            with pool.lease() as conn:
                pid = conn.info.backend_pid
            terminate(pg_dsn, pid)
            with caplog.at_level(logging.WARNING, logger="safepool"), pool.lease() as fresh:
                assert fresh is not conn
                assert fresh.info.backend_pid != pid
                assert fresh.info.transaction_status == TransactionStatus.IDLE
            with pool.lease() as same:  # a live connection passes, and is left idle
                assert same is fresh
                assert same.info.transaction_status == TransactionStatus.IDLE
            assert ROLLBACK_WARNING not in caplog.text
            stats = pool.stats()
            assert (stats.created, stats.closed, stats.lost) == (2, 1, 1)

    @pytest.mark.parametrize("reset", ["auto", None, dbapi.rollback], ids=["auto", "none", "own"])
    def test_server_connections_are_recycled_after_an_hour_and_ten_idle_minutes(
        self, pg_dsn: str, clock: FakeClock, reset: Any
    ) -> None:
        """Whatever the reset (the lifetimes are settled by the first connection either way)."""
        factory = functools.partial(pg_connect, pg_dsn)
        with SafeConnectionPool(
            factory=factory, max_size=2, clock=clock, background=False, reset=reset
        ) as pool:
            with pool.lease() as first:
                pass
            clock.advance(3599.0)
            with pool.lease() as again:
                assert again is first  # (used again: not idle for 10 minutes)
            clock.advance(2.0)  # 3601 s old
            with pool.lease() as second:
                assert second is not first and first.closed
            clock.advance(601.0)  # idle beyond min_size for over 10 minutes
            pool.maintain()
            assert second.closed and pool.stats().size == 0

    def test_explicit_none_means_never(self, pg_dsn: str, clock: FakeClock) -> None:
        factory = functools.partial(pg_connect, pg_dsn)
        with SafeConnectionPool(
            factory=factory, max_size=1, clock=clock, max_lifetime=None, max_idle=None
        ) as pool:
            with pool.lease() as first:
                pass
            clock.advance(10 * 3600.0)
            assert pool.maintain() == math.inf
            with pool.lease() as again:
                assert again is first


@pytest.mark.postgres
def test_a_pool_of_two_kinds_of_connection_resets_both(
    db: SqliteFactory, pg_dsn: str, pg_table: str
) -> None:
    """The release probe is sqlite3's (the first connection made); psycopg connections made
    later take the slow path on every release, and are rolled back too."""
    from psycopg.pq import TransactionStatus

    kinds = iter([db, functools.partial(pg_connect, pg_dsn)])

    def factory() -> Any:
        return next(kinds)()

    with SafeConnectionPool(factory=factory, max_size=2) as pool:
        lite, pg = pool.acquire(), pool.acquire()
        insert(lite)
        pg.execute(f"INSERT INTO {pg_table} (who) VALUES ('x')")
        pool.release(lite)
        pool.release(pg)
        pg, lite = pool.acquire(), pool.acquire()  # newest idle first
        assert isinstance(lite, sqlite3.Connection) and not lite.in_transaction
        assert pg.info.transaction_status == TransactionStatus.IDLE
        pool.release(lite)
        pool.release(pg)
        stats = pool.stats()
        assert (stats.created, stats.closed) == (2, 0)
        assert pool._lifetime == math.inf  # settled by the first connection: sqlite3's


def test_check_connection_on_sqlite(db: SqliteFactory) -> None:
    conn = db()
    dbapi.check_connection(conn)
    assert not conn.in_transaction
    conn.close()
    with pytest.raises(sqlite3.ProgrammingError):
        dbapi.check_connection(conn)


# -- hosted in a PoolManager -------------------------------------------------------------------


def other_writer(path: str) -> None:
    """A writer outside the pool, which gives up quickly if the database is locked."""
    with contextlib.closing(sqlite3.connect(path, timeout=0.2)) as conn, conn:
        insert(conn, "other")


def foreign_keys_on(conn: sqlite3.Connection) -> None:
    """A configure hook (module level: it travels to the server by name)."""
    conn.execute("PRAGMA foreign_keys = ON")


@pytest.mark.parametrize("method", START_METHODS)
def test_hosted_insert_without_commit_no_longer_blocks_other_writers(
    db: SqliteFactory, method: str
) -> None:
    with PoolManager(ctx=multiprocessing.get_context(method)) as manager:
        pool = manager.SafeConnectionPool(factory=db, max_size=2, configure=foreign_keys_on)
        assert pool.call(dbapi.fetchone, "PRAGMA foreign_keys") == (1,)
        assert pool.call(dbapi.execute, "INSERT INTO rows (who) VALUES (?)", ("forgot",)) == 1
        other_writer(db.path)
        assert pool.call(dbapi.fetchall, "SELECT who FROM rows") == [("other",)]

        kept = manager.SafeConnectionPool(factory=db, max_size=1, reset=None)
        kept.call(dbapi.execute, "INSERT INTO rows (who) VALUES (?)", ("open",))
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            other_writer(db.path)  # what the opt-out keeps: the transaction, and its lock
        kept.call(dbapi.rollback)


# -- the pickle hint ---------------------------------------------------------------------------

HINT = "cannot be pickled or sent to another process.*PoolManager"


def test_pickling_a_pool_says_what_to_do_instead() -> None:
    with SafeConnectionPool(factory=list, name="local") as pool:
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            with pytest.raises(TypeError, match=HINT):
                pickle.dumps(pool, protocol)
        with pytest.raises(TypeError, match="pool 'local'"):
            pickle.dumps({"pool": pool})


@pytest.mark.parametrize("method", START_METHODS)
def test_passing_a_pool_to_a_process_pool_executor(method: str) -> None:
    with (
        SafeConnectionPool(factory=list) as pool,
        ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as executor,
    ):
        future = executor.submit(repr, pool)
        with pytest.raises(TypeError, match=HINT):
            future.result(timeout=LONG)
        assert executor.submit(len, "ok").result(timeout=LONG) == 2  # the executor still works


@pytest.mark.parametrize("method", START_METHODS)
def test_passing_a_pool_to_a_multiprocessing_pool(method: str) -> None:
    with (
        SafeConnectionPool(factory=list) as pool,
        multiprocessing.get_context(method).Pool(1) as workers,
        pytest.raises(TypeError, match=HINT),
    ):
        workers.apply_async(repr, (pool,)).get(timeout=LONG)
