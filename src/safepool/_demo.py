"""``python -m safepool demo``: the BaseManager race and its fix, on an embedded sqlite3 database.

1. Threads in one process share a :class:`SafeConnectionPool`.
2. The trap: a plain pool object registered on a ``BaseManager`` is served by one thread per
   client, so processes race in its ``get()`` and lease the same connection at once.
3. The fix: a ``SafeConnectionPool`` hosted in a ``PoolManager``; worker processes write rows
   through leased sqlite3 connections that never leave the server.

Duplicate leases are counted the same way in 2 and 3: every lease records when it started and
ended (inside the lease), and two overlapping leases of one connection are a duplicate.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import sqlite3
import tempfile
import threading
import time
from multiprocessing.managers import BaseManager
from pathlib import Path
from typing import Any, TextIO

from . import dbapi
from .manager import PoolManager
from .pool import SafeConnectionPool

__all__ = ["SqliteConnector", "run_demo"]

# (connection id, start, end) of one lease.
Interval = tuple[int, float, float]


class SqliteConnector:
    """A picklable factory of sqlite3 connections to one database file.

    The schema (and WAL mode) is set up once, here, not in every new connection: changing the
    journal mode while other connections write fails with "database is locked".
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:  # commit, then close
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS events "
                "(id INTEGER PRIMARY KEY, who TEXT, conn_id INTEGER)"
            )
        conn.close()

    def __call__(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, check_same_thread=False)

    def __repr__(self) -> str:
        return f"SqliteConnector({Path(self.path).name!r})"


def _n(count: int, one: str, many: str | None = None) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{count} {one if count == 1 else (many or one + 's')}"


def run_threads_demo(path: str, *, threads: int, rows: int, max_size: int, out: TextIO) -> None:
    pool = SafeConnectionPool(factory=SqliteConnector(path), max_size=max_size, name="demo")
    holders: dict[int, int] = {}
    overlap = 0
    guard = threading.Lock()
    barrier = threading.Barrier(threads)

    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            write(n)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    def write(n: int) -> None:
        nonlocal overlap
        barrier.wait()
        for _ in range(rows):
            with pool.lease() as conn:
                key = id(conn)
                with guard:
                    if key in holders:
                        overlap += 1
                    holders[key] = n
                conn.execute(
                    "INSERT INTO events (who, conn_id) VALUES (?, ?)", (f"thread-{n}", key)
                )
                conn.commit()
                with guard:
                    del holders[key]

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        pool.close()
        raise errors[0]
    elapsed = time.perf_counter() - start
    with pool.lease() as conn:
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
        (distinct,) = conn.execute("SELECT count(DISTINCT conn_id) FROM events").fetchone()
    stats = pool.stats()
    pool.close()
    print(
        f"  {_n(threads, 'thread')} x {_n(rows, 'row')} through a pool of at most "
        f"{_n(max_size, 'sqlite3 connection')}: {_n(count, 'row')} in {elapsed:.2f}s",
        file=out,
    )
    print(
        f"  connections used: {distinct} (made {stats.created}); "
        f"a connection held by two threads at once: {overlap} times",
        file=out,
    )
    print(
        f"  stats: requests={stats.requests} waits={stats.waits} timeouts={stats.timeouts} "
        f"mean wait={1e3 * stats.wait_time / max(stats.waits, 1):.2f}ms "
        f"mean lease={1e3 * stats.lease_time / max(stats.requests, 1):.2f}ms",
        file=out,
    )
    if overlap or count != threads * rows or stats.created > max_size:
        raise SystemExit("demo failed: the pool shared a connection or lost rows")


def duplicates(intervals: list[Interval]) -> int:
    """Leases that began while another lease of the same connection was still held."""
    by_conn: dict[int, list[tuple[float, float]]] = {}
    for conn_id, start, end in intervals:
        by_conn.setdefault(conn_id, []).append((start, end))
    count = 0
    for spans in by_conn.values():
        spans.sort()
        held_until = float("-inf")
        for start, end in spans:
            count += start < held_until
            held_until = max(held_until, end)
    return count


# -- 2. the trap ---------------------------------------------------------------------------------


class UnlockedPool:
    """Seed 000's DatabaseConnectionPool: no lock, and get() takes a moment (as any real one
    does) between reading the last connection and removing it."""

    def __init__(self, size: int) -> None:
        self.ready = list(range(size))

    def get(self) -> int:
        if not self.ready:
            raise RuntimeError("no connections available")
        conn = self.ready[-1]
        time.sleep(random.random() * 0.002)
        self.ready.pop()
        return conn

    def put(self, conn: int) -> None:
        self.ready.append(conn)


class PlainManager(BaseManager):
    pass


PlainManager.register("UnlockedPool", UnlockedPool, exposed=("get", "put"))


def _unlocked_worker(pool: Any, leases: int, seed: int) -> list[Interval]:
    rng = random.Random(seed)
    intervals = []
    for _ in range(leases):
        try:
            conn = pool.get()
        except Exception:  # the unlocked pool ran dry: an honest pool would have waited
            continue
        start = time.monotonic()
        time.sleep(rng.random() * 0.002)  # use the connection
        intervals.append((conn, start, time.monotonic()))
        pool.put(conn)
    return intervals


# -- 3. the fix ------------------------------------------------------------------------------------

_pool: Any = None  # the PoolManager proxy, in each worker process


def _init_worker(pool: Any) -> None:
    global _pool
    _pool = pool


def _record(conn: sqlite3.Connection, who: str, hold: float) -> Interval:
    """Runs in the server, on a leased connection: write one row, and time the lease."""
    start = time.monotonic()
    conn.execute("INSERT INTO events (who, conn_id) VALUES (?, ?)", (who, id(conn)))
    conn.commit()
    time.sleep(hold)
    return (id(conn), start, time.monotonic())


def _safe_worker(leases: int, seed: int) -> list[Interval]:
    rng = random.Random(seed)
    who = f"process-{os.getpid()}"
    intervals = []
    for _ in range(leases):
        with _pool.lease() as conn:
            intervals.append(conn.call(_record, who, rng.random() * 0.002))
    return intervals


def run_processes_demo(
    path: str, *, processes: int, leases: int, max_size: int, method: str | None, out: TextIO
) -> None:
    ctx = multiprocessing.get_context(method)
    jobs = [(leases, seed) for seed in range(processes)]
    print(
        f"\n2. The trap: a plain pool object registered on a BaseManager\n"
        f"  {_n(processes, 'worker process', 'worker processes')} ({ctx.get_start_method()}) x "
        f"{_n(leases, 'lease')} from an unlocked pool of {_n(max_size, 'connection')}",
        file=out,
    )
    with PlainManager(ctx=ctx) as plain:
        unlocked = plain.UnlockedPool(max_size)  # type: ignore[attr-defined]
        with ctx.Pool(processes) as workers:
            results = workers.starmap(_unlocked_worker, [(unlocked, *job) for job in jobs])
    trap = duplicates([i for r in results for i in r])
    print(f"  duplicate leases: {trap} (two processes held one connection at once)", file=out)

    print(
        f"\n3. The fix: SafeConnectionPool hosted in a PoolManager\n"
        f"  {_n(processes, 'worker process', 'worker processes')} x {_n(leases, 'lease')} "
        f"through at most {_n(max_size, 'sqlite3 connection')} that stay in the server",
        file=out,
    )
    with PoolManager(ctx=ctx) as manager:
        pool = manager.SafeConnectionPool(
            factory=SqliteConnector(path), max_size=max_size, name="demo-shared"
        )
        with ctx.Pool(processes, initializer=_init_worker, initargs=(pool,)) as workers:
            results = workers.starmap(_safe_worker, jobs)
        row = pool.call(dbapi.fetchone, "SELECT count(*) FROM events WHERE who LIKE 'process-%'")
        rows = 0 if row is None else row[0]
        stats = pool.stats()
    fixed = duplicates([i for r in results for i in r])
    print(f"  rows written: {rows}; duplicate leases: {fixed}", file=out)
    print(
        f"  stats: size={stats.size}/{stats.max_size} created={stats.created} "
        f"requests={stats.requests} waits={stats.waits} timeouts={stats.timeouts} "
        f"leased now={stats.leased}",
        file=out,
    )
    if fixed or rows != processes * leases or stats.leased:
        raise SystemExit("demo failed: the shared pool leased a connection twice or lost rows")


def run_demo(
    *,
    threads: int,
    rows: int,
    max_size: int,
    processes: int,
    leases: int,
    start_method: str | None,
    db: str | None,
    out: TextIO,
) -> None:
    with tempfile.TemporaryDirectory(prefix="safepool-demo-") as tmp:
        path = db or str(Path(tmp) / "demo.sqlite")
        print(f"safepool demo on sqlite3 ({path})", file=out)
        print("\n1. Threads in one process share a SafeConnectionPool", file=out)
        run_threads_demo(path, threads=threads, rows=rows, max_size=max_size, out=out)
        run_processes_demo(
            path,
            processes=processes,
            leases=leases,
            max_size=max_size,
            method=start_method,
            out=out,
        )
