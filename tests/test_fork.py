"""Fork: a child gets an empty pool, never uses nor closes the parent's items, never deadlocks."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
from pathlib import Path

import pytest

import proc_targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, SqliteFactory, run_in_fork, wait_until
from safepool import SafeConnectionPool

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)


class Item:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_raw_fork_child_gets_an_empty_pool_and_parent_items_stay_open(tmp_path: Path) -> None:
    pool = SafeConnectionPool(factory=SqliteFactory(str(tmp_path / "db.sqlite")), max_size=2)
    parent_conn = pool.acquire()
    idle = pool.acquire()
    pool.release(idle)
    parent_ids = [id(parent_conn), id(idle)]

    def child() -> tuple[int, bool, int]:
        before = pool.stats().size
        with pool.lease() as conn:
            fresh = id(conn) not in parent_ids
            conn.execute("INSERT INTO rows (who) VALUES ('child')")
            conn.commit()
        return before, fresh, pool.stats().created

    assert run_in_fork(child) == (0, True, 1)
    # The parent's leased and idle connections still work after the child exited.
    assert parent_conn.execute("SELECT who FROM rows").fetchall() == [("child",)]
    pool.release(parent_conn)
    with pool.lease() as conn:
        assert conn is parent_conn or conn is idle
    assert pool.stats().created == 2
    pool.close()


def test_child_never_closes_inherited_items_even_on_close_and_gc() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=2)
    leased = pool.acquire()
    idle = pool.acquire()
    pool.release(idle)

    def child() -> tuple[bool, bool]:
        pool.release(leased)  # inherited lease: ignored, not an error, not closed
        pool.close()
        return leased.closed, idle.closed

    assert run_in_fork(child) == (False, False)
    assert not leased.closed and not idle.closed
    pool.release(leased)


def test_lease_block_spanning_a_fork_is_harmless_in_the_child() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=1)
    with pool.lease() as item:
        assert run_in_fork(lambda: (pool.stats().size, item.closed)) == (0, False)
    assert pool.stats().idle == 1


def test_fork_while_another_thread_holds_the_pool_lock_does_not_deadlock() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=2)
    holding = threading.Event()
    done = threading.Event()

    def hold_lock() -> None:
        with pool._lock:
            holding.set()
            done.wait(LONG)

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert holding.wait(SHORT)

        def child() -> int:
            with pool.lease():
                pass
            return pool.stats().created

        assert run_in_fork(child, timeout=SHORT * 2) == 1
    finally:
        done.set()
        holder.join(SHORT)


def test_fork_while_another_thread_waits_in_the_queue_does_not_deadlock() -> None:
    pool = SafeConnectionPool(factory=Item, max_size=1)
    held = pool.acquire()
    from helpers import ThreadResult, wait_until

    waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
    wait_until(lambda: pool.stats().waiting == 1)
    assert run_in_fork(lambda: (pool.stats().waiting, pool.acquire(timeout=SHORT).closed)) == (
        0,
        False,
    )
    pool.release(held)
    pool.release(waiter.join())


def test_multiprocessing_fork_child_gets_an_empty_pool(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    pool = SafeConnectionPool(factory=SqliteFactory(str(tmp_path / "db.sqlite")), max_size=2)
    parent_conn = pool.acquire()
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=proc_targets.use_inherited_pool_in_child, args=(pool, [id(parent_conn)], writer)
    )
    proc.start()
    writer.close()
    assert reader.poll(LONG), "child did not answer"
    result = reader.recv()
    proc.join(LONG)
    assert result == ("ok", 0, True, 1)
    assert proc.exitcode == 0
    gc.collect()
    rows = parent_conn.execute("SELECT who FROM rows").fetchall()
    assert [who for (who,) in rows] == [f"child-{proc.pid}"]
    pool.release(parent_conn)
    pool.close()


@pytest.mark.postgres
def test_parent_postgres_connections_survive_a_child_closing_the_pool(pg_dsn: str) -> None:
    """Closing a psycopg connection sends Terminate on its socket: had the child closed what it
    inherited, the server would end the parent's sessions. The child releases the inherited
    lease, closes the pool and drops it; the parent's connections must all still work."""
    import psycopg

    pool = SafeConnectionPool(factory=lambda: psycopg.connect(pg_dsn, autocommit=True), max_size=2)
    conn = pool.acquire()
    idle = pool.acquire()
    pool.release(idle)
    backends = {
        c.execute("SELECT pg_backend_pid()").fetchone()[0]
        for c in (conn, idle)  # type: ignore[index]
    }

    def child() -> int:
        nonlocal pool
        with pool.lease() as own:
            child_backend = own.execute("SELECT pg_backend_pid()").fetchone()[0]
        pool.release(conn)
        pool.close()
        del pool
        gc.collect()
        return int(child_backend)

    assert run_in_fork(child) not in backends
    for c in (conn, idle):
        assert c.execute("SELECT pg_backend_pid()").fetchone()[0] in backends  # type: ignore[index]
    pool.release(conn)
    pool.close()


@pytest.mark.postgres
def test_control_a_child_that_frees_inherited_connections_breaks_the_parent(pg_dsn: str) -> None:
    """Shows the hazard the pool prevents (so the test above can fail)."""
    import psycopg

    conn = psycopg.connect(pg_dsn, autocommit=True)
    conn.execute("SELECT 1")

    def child() -> None:
        conn.close()  # what a naive child cleanup does

    run_in_fork(child)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["pool", "process_local"])
@pytest.mark.parametrize("how", ["os.fork", *START_METHODS])
def test_a_killed_parents_idle_connections_end_while_its_child_lives_on(
    pg_dsn: str, how: str, kind: str
) -> None:
    """The parent's idle server connections (a pool's, a ``ProcessLocal`` client) are abandoned
    in a forked child, and the child's copies of their sockets closed: when the parent dies,
    PostgreSQL sees its sessions end at once, not when the last child exits (which a budget of
    connections would count on)."""
    import psycopg

    # A parent of its own (spawned: a forked one would inherit this process's forkserver, which
    # multiprocessing then cannot use there).
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=proc_targets.server_connections_then_fork, args=(pg_dsn, how, kind, writer)
    )
    proc.start()
    writer.close()
    child = 0

    def alive(backends: list[int]) -> int:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (backends,)
            ).fetchone()
        return int(row[0]) if row else 0

    try:
        assert reader.poll(LONG), "the parent did not start"
        backends, child = reader.recv()
        assert alive(backends) == len(backends) and child > 0
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join()  # (waitpid: with a timeout, join waits for a sentinel the child holds too)
        wait_until(lambda: alive(backends) == 0, 1.0, "the dead parent's sessions ended")
        assert os.path.exists(f"/proc/{child}"), "the child should still be alive"
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.join()
