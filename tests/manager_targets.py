"""Module-level factories, tasks and process targets for the manager tests.

Everything here must be importable by name in a manager server or worker started with spawn or
forkserver, so nothing is a lambda or closure.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from multiprocessing.managers import BaseManager
from typing import Any

import safepool
from helpers import LONG
from safepool import dbapi


class TokenFactory:
    """By-value items: distinct strings, made in the server."""

    def __init__(self, prefix: str = "token") -> None:
        self.prefix = prefix
        self._made = 0  # an int, not itertools.count: pickling itertools is deprecated (3.12)

    def __call__(self) -> str:
        self._made += 1
        return f"{self.prefix}-{self._made}"


class PgConnect:
    """A picklable psycopg connection factory."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def __call__(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn)

    def __repr__(self) -> str:
        return "PgConnect(...)"  # never the DSN


def slow_check(item: object) -> bool:
    """A check that takes a random moment: a delay injected into the lease path."""
    time.sleep(random.random() * 0.001)
    return True


def make_socket(conn: object) -> socket.socket:
    """A 'query' that returns a socket: must never reach the client."""
    return socket.socket()


def make_error_with_socket(conn: object) -> None:
    raise ValueError("carrying a socket", socket.socket())


def return_item(conn: object) -> object:
    return conn


def return_item_in_list(conn: object) -> object:
    return ["result", {"conn": conn}]


class Sockets:
    """A shared object with a method that returns a socket (the stdlib trap)."""

    def make(self) -> socket.socket:
        return socket.socket()


class SocketsManager(BaseManager):
    pass


SocketsManager.register("Sockets", Sockets, exposed=("make",))


class SafeSocketsManager(safepool.PoolManager):
    pass


SafeSocketsManager.register("Sockets", Sockets, exposed=("make",))


def open_fds() -> set[str]:
    """This process's open file descriptors."""
    return set(os.listdir("/proc/self/fd"))


@contextlib.contextmanager
def new_fds() -> Iterator[set[str]]:
    """The descriptors opened inside the block (filled in when it ends).

    The garbage collector is off meanwhile, so no finaliser of an earlier test closes (and frees
    for reuse) a descriptor while we compare.
    """
    gc.collect()
    gc.disable()
    try:
        before = open_fds()
        opened: set[str] = set()
        yield opened
        opened |= open_fds() - before
    finally:
        gc.enable()


# -- worker-side functions ----------------------------------------------------------------------


def write_rows(pool: Any, who: str, count: int, placeholder: str, table: str) -> int:
    """Write rows through the hosted pool: one-shot calls and a multi-call transaction."""
    sql = f"INSERT INTO {table} (who) VALUES ({placeholder})"
    for _ in range(count):
        pool.call(dbapi.execute, sql, (who,), commit=True)
    with pool.lease(timeout=LONG) as conn:
        conn.call(dbapi.execute, sql, (f"{who}-tx",))
        conn.call(dbapi.commit)
    return os.getpid()


def read_count(pool: Any, table: str) -> int:
    (count,) = pool.call(dbapi.fetchone, f"SELECT count(*) FROM {table}")
    return int(count)


def lease_value(pool: Any, _: int = 0) -> str:
    with pool.lease(timeout=LONG) as item:
        return str(item)


_worker_pool: Any = None


def init_worker_pool(pool: Any) -> None:
    global _worker_pool
    _worker_pool = pool


def lease_from_initializer(_: int) -> str:
    return lease_value(_worker_pool)


def process_target(pool: Any, conn: Any) -> None:
    try:
        conn.send(("ok", lease_value(pool)))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def wait_for_item(pool: Any, conn: Any, timeout: float) -> None:
    """Block in acquire (across processes) and report what happened."""
    try:
        item = pool.acquire(timeout=timeout)
        conn.send(("got", item))
        pool.release(item)
    except BaseException as exc:
        conn.send(("error", type(exc).__name__, str(exc)))


# -- the stress harness ---------------------------------------------------------------------------


def stress_worker(pool: Any, threads: int, cycles: int, seed: int, out: Any) -> None:
    """Lease from ``threads`` threads with random holds; report (item, start, end) intervals.

    Intervals are taken *inside* each lease (after acquire returned, before release is sent),
    so two overlapping intervals on one item prove that two holders had it at once.
    """
    intervals: list[tuple[str, float, float]] = []
    errors: list[str] = []
    guard = threading.Lock()
    barrier = threading.Barrier(threads)

    def run(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        mine = []
        try:
            barrier.wait(LONG)
            for _ in range(cycles):
                item = pool.acquire(timeout=LONG)
                start = time.monotonic()
                time.sleep(rng.random() * 0.002)
                end = time.monotonic()
                pool.release(item)
                mine.append((str(item), start, end))
        except BaseException as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        with guard:
            intervals.extend(mine)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(LONG)
    out.send((intervals, errors))


def overlaps(intervals: list[tuple[str, float, float]]) -> int:
    """How many leases began while another lease of the same item was still held."""
    by_item: dict[str, list[tuple[float, float]]] = {}
    for item, start, end in intervals:
        by_item.setdefault(item, []).append((start, end))
    count = 0
    for spans in by_item.values():
        spans.sort()
        latest_end = float("-inf")
        for start, end in spans:
            if start < latest_end:
                count += 1
            latest_end = max(latest_end, end)
    return count


class NaivePool:
    """Seed 000's pool: no lock, and a moment between reading and taking an item."""

    def __init__(self, size: int) -> None:
        self.ready = [f"conn-{i}" for i in range(size)]

    def acquire(self, timeout: float | None = None) -> str:
        deadline = time.monotonic() + (timeout or LONG)
        while not self.ready:
            if time.monotonic() > deadline:
                raise TimeoutError("no connection")
            time.sleep(0.0005)
        conn = self.ready[-1]
        time.sleep(random.random() * 0.001)  # the injected delay
        # If another client took it meanwhile, the duplicate lease has already happened.
        with contextlib.suppress(ValueError):
            self.ready.remove(conn)
        return conn

    def release(self, conn: str) -> None:
        if conn not in self.ready:
            self.ready.append(conn)


class NaiveManager(BaseManager):
    pass


NaiveManager.register("NaivePool", NaivePool, exposed=("acquire", "release"))


def read_key_length(key: bytes) -> int:
    """A trivial task: proves a pool of workers still works."""
    return len(key)


def touch_dict(shared: Any, key: int) -> int:
    shared[key] = key
    return key


# Module-level factories, for `python -m safepool serve --factory manager_targets:tokens`.
tokens = TokenFactory()
