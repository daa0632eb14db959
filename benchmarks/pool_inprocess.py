"""Lease + release per op, in one process: safepool against a bare floor and its peers.

    python benchmarks/pool_inprocess.py [--quick] [--output results.json]

Candidates, each measured in the same run on the same kind of item:

* ``floor``: a bare ``threading.Condition`` + ``deque`` pool written here: no stats, no checks,
  no release validation, no fork handling. The least a thread-safe pool can cost.
* ``safepool``: ``SafeConnectionPool.acquire`` / ``release`` (stats on, release validation on,
  fork handling on); ``safepool lease()``: the same through the ``with`` context manager.
* ``DBUtils``: ``PooledDB`` with its defaults (``connection()`` / ``close()``).
* ``psycopg_pool``: ``ConnectionPool.getconn`` / ``putconn`` (PostgreSQL connections: it pools
  nothing else); skipped with a note when PostgreSQL is not reachable.
* ``SQLAlchemy``: ``QueuePool`` with its defaults (``connect()`` / ``close()``).

Items are sqlite3 connections (psycopg connections for psycopg_pool), pre-made, so the numbers
are the pools' own overhead. 1 thread and 8 threads (sharing a pool of 4: they queue).
"""

from __future__ import annotations

import functools
import sqlite3
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safepool
from _common import (
    Summary,
    measure_rounds,
    progress,
    ratio,
    section_main,
    table,
)

POOL_SIZE = 4
PG_DSN = "host=127.0.0.1 port=5432 dbname=test user=postgres"

# Targets from the foundation issue, as (candidate, peer, threads, at most).
TARGETS = [
    ("safepool", "floor", 1, 1.0),
    ("safepool", "DBUtils", 1, 0.4),
    ("safepool", "psycopg_pool", 1, 0.25),
    ("safepool", "psycopg_pool", 8, 0.3),
]

Pair = tuple[Callable[[], Any], Callable[[Any], None], Callable[[], None]]


class FloorPool:
    """The floor: the least a correct blocking pool does."""

    def __init__(self, items: list[Any]) -> None:
        self._cond = threading.Condition()
        self._items = deque(items)

    def acquire(self) -> Any:
        with self._cond:
            while not self._items:
                self._cond.wait()
            return self._items.popleft()

    def release(self, item: Any) -> None:
        with self._cond:
            self._items.append(item)
            self._cond.notify()


def sqlite_connect(path: str) -> Callable[[], sqlite3.Connection]:
    return lambda: sqlite3.connect(path, check_same_thread=False)


def make_floor(path: str) -> Pair:
    connect = sqlite_connect(path)
    pool = FloorPool([connect() for _ in range(POOL_SIZE)])
    return pool.acquire, pool.release, lambda: None


def make_safepool(path: str) -> Pair:
    pool = safepool.SafeConnectionPool(
        factory=sqlite_connect(path), min_size=POOL_SIZE, max_size=POOL_SIZE
    )
    return pool.acquire, pool.release, pool.close


def make_safepool_lease(path: str) -> Pair:
    pool = safepool.SafeConnectionPool(
        factory=sqlite_connect(path), min_size=POOL_SIZE, max_size=POOL_SIZE
    )

    def get() -> Any:
        lease = pool.lease()
        lease.__enter__()
        return lease

    def put(lease: Any) -> None:
        lease.__exit__(None, None, None)

    return get, put, pool.close


def make_dbutils(path: str) -> Pair:
    from dbutils.pooled_db import PooledDB

    pool = PooledDB(
        sqlite3,
        mincached=POOL_SIZE,
        maxcached=POOL_SIZE,
        maxconnections=POOL_SIZE,
        blocking=True,
        database=path,
        check_same_thread=False,
    )
    return pool.connection, lambda conn: conn.close(), pool.close


def make_sqlalchemy(path: str) -> Pair:
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(sqlite_connect(path), pool_size=POOL_SIZE, max_overflow=0)
    return pool.connect, lambda conn: conn.close(), pool.dispose


def make_psycopg_pool(path: str) -> Pair:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(PG_DSN, min_size=POOL_SIZE, max_size=POOL_SIZE, open=True)
    pool.wait(timeout=10)
    return pool.getconn, pool.putconn, pool.close


def psycopg_pool_available() -> str | None:
    """None if psycopg_pool can run here, else why not."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc.name}); pip install -e '.[bench]'"
    try:
        psycopg.connect(PG_DSN, connect_timeout=3).close()
    except Exception as exc:
        return f"PostgreSQL not reachable at {PG_DSN!r} ({type(exc).__name__})"
    return None


def module_available(name: str) -> str | None:
    try:
        __import__(name)
    except ImportError:
        return f"not installed; pip install -e '.[bench]' ({name})"
    return None


def lease_release_ns(
    get: Callable[[], Any], put: Callable[[Any], None], threads: int, ops: int
) -> float:
    """Mean ns per lease+release across ``threads`` threads doing ``ops`` each."""
    if threads == 1:
        start = time.perf_counter()
        for _ in range(ops):
            put(get())
        return (time.perf_counter() - start) / ops * 1e9
    barrier = threading.Barrier(threads + 1)

    def work() -> None:
        barrier.wait()
        for _ in range(ops):
            put(get())

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return (time.perf_counter() - start) / (threads * ops) * 1e9


FACTORIES: dict[str, tuple[Callable[[str], Pair], Callable[[], str | None]]] = {
    "floor": (make_floor, lambda: None),
    "safepool": (make_safepool, lambda: None),
    "safepool lease()": (make_safepool_lease, lambda: None),
    "DBUtils": (make_dbutils, lambda: module_available("dbutils")),
    "psycopg_pool": (make_psycopg_pool, psycopg_pool_available),
    "SQLAlchemy": (make_sqlalchemy, lambda: module_available("sqlalchemy")),
}


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """``smoke``: one short round, for tests (timings meaningless); overrides ``quick``."""
    repeats = 1 if smoke else 3 if quick else 9
    ops = 800 if smoke else 5_000 if quick else 40_000
    skipped = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.sqlite")
        sqlite3.connect(path).close()
        pools: dict[str, Pair] = {}
        for name, (make, available) in FACTORIES.items():
            why = available()
            if why is not None:
                skipped[name] = why
                progress(f"  skipping {name}: {why}")
                continue
            pools[name] = make(path)
        results: dict[str, Any] = {}
        try:
            for threads in (1, 8):
                progress(f"pool_inprocess: {threads} thread(s), {repeats} rounds")
                per_thread = ops if threads == 1 else ops // threads
                candidates = {
                    name: functools.partial(lease_release_ns, g, p, threads, per_thread)
                    for name, (g, p, _) in pools.items()
                }
                values = measure_rounds(candidates, repeats=repeats)
                results[str(threads)] = {
                    "ns_per_op": {n: Summary.of(v).as_dict() for n, v in values.items()},
                    "safepool_ratio": {
                        peer: ratio(values, "safepool", peer).as_dict()
                        for peer in values
                        if peer != "safepool"
                    },
                }
        finally:
            for _, _, close in pools.values():
                close()
    return {
        "benchmark": "pool_inprocess",
        "pool_size": POOL_SIZE,
        "ops_per_round": ops,
        "repeats": repeats,
        "skipped": skipped,
        "threads": results,
        "targets": check_targets(results),
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for candidate, peer, threads, limit in TARGETS:
        ratios = results.get(str(threads), {}).get("safepool_ratio", {})
        if peer not in ratios:
            out.append({"target": f"{candidate} <= {limit}x {peer} @{threads}t", "met": None})
            continue
        median = ratios[peer]["median"]
        out.append(
            {
                "target": f"{candidate} <= {limit}x {peer} @{threads}t",
                "ratio": median,
                "met": median <= limit,
            }
        )
    return out


def report(data: dict[str, Any]) -> str:
    lines = [
        f"In-process lease+release, pool of {data['pool_size']} (median, min-max of "
        f"{data['repeats']} rounds)"
    ]
    for threads, result in data["threads"].items():
        rows = []
        for name, ns in result["ns_per_op"].items():
            r = result["safepool_ratio"].get(name)
            vs = "-" if r is None else Summary(r["median"], r["min"], r["max"]).fmt(digits=2)
            rows.append([name, Summary(ns["median"], ns["min"], ns["max"]).fmt(1e-3, 2), vs])
        lines += [
            "",
            f"{threads} thread(s):",
            table(["pool", "us per lease+release", "safepool / this"], rows),
        ]
    for name, why in data["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    lines.append("")
    for t in data["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        shown = f" (measured {t['ratio']:.2f}x)" if "ratio" in t else ""
        lines.append(f"target {t['target']}: {state}{shown}")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """The results as a Markdown table (for the README)."""
    names = list(data["threads"]["1"]["ns_per_op"])
    lines = [
        "| pool | 1 thread: us/op | safepool / this | 8 threads: us/op | safepool / this |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        cells = [name]
        for threads in ("1", "8"):
            ns = data["threads"][threads]["ns_per_op"][name]
            cells.append(Summary(ns["median"], ns["min"], ns["max"]).fmt(1e-3, 2))
            r = data["threads"][threads]["safepool_ratio"].get(name)
            cells.append("-" if r is None else Summary(r["median"], r["min"], r["max"]).fmt())
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
