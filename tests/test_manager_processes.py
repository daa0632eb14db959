"""Many processes, one pool: every start method, Pool workers, authkeys, stress, real databases."""

from __future__ import annotations

import multiprocessing
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import manager_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, SqliteFactory, run_in_fork, wait_until
from safepool import AuthkeyError, PoolManager, dbapi

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


@pytest.fixture(params=["default", "custom"])
def authkey(request: pytest.FixtureRequest) -> bytes | None:
    return None if request.param == "default" else secrets.token_bytes(32)


@pytest.fixture
def manager(ctx: Any, authkey: bytes | None) -> Iterator[PoolManager]:
    with PoolManager(ctx=ctx, authkey=authkey) as m:
        yield m


def value_pool(manager: PoolManager, fast_path: bool, max_size: int = 2) -> Any:
    return manager.SafeConnectionPool(
        factory=targets.TokenFactory(), max_size=max_size, share="value", fast_path=fast_path
    )


class TestPassingTheProxy:
    def test_as_a_process_argument(self, ctx: Any, manager: PoolManager, fast_path: bool) -> None:
        pool = value_pool(manager, fast_path)
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=targets.process_target, args=(pool, writer))
        proc.start()
        writer.close()
        assert reader.poll(LONG)
        assert reader.recv() == ("ok", "token-1")
        proc.join(LONG)
        assert proc.exitcode == 0
        assert pool.stats().leased == 0

    def test_through_the_pool_initializer(
        self, ctx: Any, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = value_pool(manager, fast_path)
        with ctx.Pool(2, initializer=targets.init_worker_pool, initargs=(pool,)) as workers:
            got = workers.map(targets.lease_from_initializer, range(8), chunksize=1)
        assert len(got) == 8 and all(item.startswith("token-") for item in got)
        assert pool.stats().leased == 0

    def test_as_a_pool_task_argument(
        self, ctx: Any, manager: PoolManager, authkey: bytes | None, fast_path: bool
    ) -> None:
        """Plain stdlib hangs here with a custom authkey (the worker dies unpickling the task)."""
        pool = value_pool(manager, fast_path)
        with ctx.Pool(2) as workers:
            result = workers.starmap_async(targets.lease_value, [(pool, i) for i in range(4)])
            if authkey is None or ctx.get_start_method() == "fork":
                # the default key is every process's; fork inherits the custom one
                assert len(result.get(LONG)) == 4
            else:
                start = time.monotonic()
                with pytest.raises(AuthkeyError, match="initializer"):
                    result.get(LONG)
                assert time.monotonic() - start < SHORT
                # the pool of workers is still usable
                assert workers.apply_async(targets.read_key_length, (b"abc",)).get(LONG) == 3
        assert pool.stats().leased == 0

    def test_task_arguments_work_once_the_initializer_taught_the_key(
        self, ctx: Any, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = value_pool(manager, fast_path)
        with ctx.Pool(2, initializer=targets.init_worker_pool, initargs=(pool,)) as workers:
            got = workers.starmap(targets.lease_value, [(pool, i) for i in range(6)], chunksize=1)
        assert len(got) == 6
        assert pool.stats().leased == 0


class TestHostedDatabases:
    def test_workers_write_and_read_rows_through_hosted_sqlite(
        self, ctx: Any, manager: PoolManager, tmp_path: Path
    ) -> None:
        pool = manager.SafeConnectionPool(factory=SqliteFactory(str(tmp_path / "db.sqlite")))
        # The initializer carries the authkey (even a custom one) to the workers.
        with ctx.Pool(3, initializer=targets.init_worker_pool, initargs=(pool,)) as workers:
            jobs = [(pool, f"w{i}", 5, "?", "rows") for i in range(6)]
            pids = workers.starmap(targets.write_rows, jobs, chunksize=1)
        assert len(set(pids)) >= 1
        assert targets.read_count(pool, "rows") == 6 * 6
        rows = pool.call(dbapi.fetchall, "SELECT who FROM rows WHERE who LIKE '%-tx'")
        assert sorted(rows) == sorted((f"w{i}-tx",) for i in range(6))

    @pytest.mark.postgres
    def test_workers_write_and_read_rows_through_hosted_postgres(
        self, ctx: Any, manager: PoolManager, pg_dsn: str, pg_table: str
    ) -> None:
        pool = manager.SafeConnectionPool(
            factory=targets.PgConnect(pg_dsn),
            max_size=3,
            reset=dbapi.rollback,  # a lease never leaks an open transaction to the next holder
        )
        with ctx.Pool(3, initializer=targets.init_worker_pool, initargs=(pool,)) as workers:
            jobs = [(pool, f"w{i}", 5, "%s", pg_table) for i in range(6)]
            workers.starmap(targets.write_rows, jobs, chunksize=1)
        assert targets.read_count(pool, pg_table) == 36
        assert pool.stats().created <= 3


class TestAcrossProcesses:
    def test_a_waiting_process_gets_the_item_another_releases(
        self, ctx: Any, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = value_pool(manager, fast_path, max_size=1)
        held = pool.acquire()
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=targets.wait_for_item, args=(pool, writer, LONG))
        proc.start()
        writer.close()
        wait_until(lambda: pool.stats().waiting == 1, LONG, "the child waits in the server")
        pool.release(held)  # served while the child's acquire blocks in the server
        assert reader.poll(SHORT)
        assert reader.recv() == ("got", held)
        proc.join(LONG)

    def test_timeouts_keep_their_type_in_a_child(
        self, ctx: Any, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = value_pool(manager, fast_path, max_size=1)
        held = pool.acquire()
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=targets.wait_for_item, args=(pool, writer, 0.2))
        proc.start()
        writer.close()
        assert reader.poll(LONG)
        kind, name, message = reader.recv()
        assert (kind, name) == ("error", "PoolTimeout")
        assert "within 0.2s" in message
        proc.join(LONG)
        pool.release(held)


@pytest.mark.parametrize("start_method", START_METHODS)
def test_stress_8_processes_x_4_threads_no_duplicates_no_lost_capacity(
    start_method: str, fast_path: bool
) -> None:
    ctx = multiprocessing.get_context(start_method)
    max_size = 3
    with PoolManager(ctx=ctx) as m:
        pool = m.SafeConnectionPool(
            factory=targets.TokenFactory(),
            max_size=max_size,
            check=targets.slow_check,  # a random delay inside the lease path
            share="value",
            fast_path=fast_path,
            timeout=LONG,
        )
        intervals, errors = run_stress(ctx, pool, processes=8, threads=4, cycles=25)
        assert errors == []
        assert len(intervals) == 8 * 4 * 25
        assert targets.overlaps(intervals) == 0
        stats = pool.stats()
        assert (stats.leased, stats.waiting, stats.pending) == (0, 0, 0)
        assert stats.size <= max_size
        # no capacity lost: every slot can be leased at once
        items = [pool.acquire(timeout=0) for _ in range(max_size)]
        assert len(set(items)) == max_size
        for item in items:
            pool.release(item)


def test_stress_harness_catches_the_naive_pool_of_seed_000() -> None:
    """The same harness against the BaseManager write-up's unlocked pool finds duplicates."""
    ctx = multiprocessing.get_context("fork")
    with targets.NaiveManager(ctx=ctx) as m:
        naive = m.NaivePool(3)
        intervals, _ = run_stress(ctx, naive, processes=8, threads=4, cycles=25)
    assert targets.overlaps(intervals) > 0


def run_stress(
    ctx: Any, pool: Any, *, processes: int, threads: int, cycles: int
) -> tuple[list[Any], list[str]]:
    pipes = []
    procs = []
    for n in range(processes):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=targets.stress_worker, args=(pool, threads, cycles, n, writer))
        proc.start()
        writer.close()
        pipes.append(reader)
        procs.append(proc)
    intervals: list[Any] = []
    errors: list[str] = []
    for reader in pipes:
        assert reader.poll(LONG * 2), "a stress worker did not report"
        got, errs = reader.recv()
        intervals += got
        errors += errs
    for proc in procs:
        proc.join(LONG)
        assert proc.exitcode == 0
    return intervals, errors


def test_raw_fork_child_uses_its_own_connection_and_never_releases_the_parents_lease(
    fast_path: bool,
) -> None:
    with PoolManager() as m:
        pool = m.SafeConnectionPool(
            factory=targets.TokenFactory(), max_size=2, share="value", fast_path=fast_path
        )
        held = pool.acquire()  # also opens this thread's connection, which the child inherits

        def child() -> tuple[str, int]:
            pool.release(held)  # the parent's lease: a no-op here
            with pool.lease(timeout=SHORT) as mine:
                leased_meanwhile = pool.stats().leased
            return mine, leased_meanwhile

        mine, leased_meanwhile = run_in_fork(child)
        assert mine == "token-2" and leased_meanwhile == 2
        # the parent's connection was not disturbed, and its lease is still its own
        assert pool.stats().leased == 1
        pool.release(held)
        assert pool.stats().leased == 0


def test_control_stdlib_proxy_task_argument_with_custom_authkey_hangs_the_pool() -> None:
    """What PoolProxy prevents: the worker dies unpickling the task, and map() never returns."""
    from multiprocessing.managers import SyncManager

    ctx = multiprocessing.get_context("spawn")
    with SyncManager(ctx=ctx, authkey=secrets.token_bytes(32)) as m:
        shared = m.dict()
        workers = ctx.Pool(1)
        try:
            result = workers.starmap_async(targets.touch_dict, [(shared, 1)])
            with pytest.raises(multiprocessing.TimeoutError):
                result.get(HANG_BOUND)
        finally:
            workers.terminate()
            workers.join()


# How long a call that never returns is given before the test calls it a hang.
HANG_BOUND = 5.0
