"""``python -m safepool demo``: the pool at work on an embedded sqlite3 database."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import TextIO

from .pool import SafeConnectionPool

__all__ = ["SqliteConnector", "run_demo"]


class SqliteConnector:
    """A picklable factory of sqlite3 connections to one database file.

    The schema (and WAL mode) is set up once, here, not in every new connection: changing the
    journal mode while other connections write fails with "database is locked".
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with sqlite3.connect(path) as conn:
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
        f"  {threads} threads x {rows} rows through a pool of at most {max_size} sqlite3 "
        f"connections: {count} rows in {elapsed:.2f}s",
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


def run_demo(*, threads: int, rows: int, max_size: int, db: str | None, out: TextIO) -> None:
    with tempfile.TemporaryDirectory(prefix="safepool-demo-") as tmp:
        path = db or str(Path(tmp) / "demo.sqlite")
        print(f"safepool demo on sqlite3 ({path})", file=out)
        print("\n1. Threads in one process share a SafeConnectionPool", file=out)
        run_threads_demo(path, threads=threads, rows=rows, max_size=max_size, out=out)
