"""Process targets for the pool + budget tests (importable under spawn and forkserver)."""

from __future__ import annotations

import os
import random
import select
import threading
import time
from typing import Any

import safepool
from helpers import LONG


class PgConnect:
    """psycopg connections named for one test, so pg_stat_activity can count exactly them."""

    def __init__(self, dsn: str, application_name: str) -> None:
        self.dsn = dsn
        self.application_name = application_name

    def __call__(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, application_name=self.application_name, autocommit=True)


def close_and_wait(conn: Any) -> None:
    """Close a psycopg connection and wait until its server process is gone.

    PostgreSQL lists a backend in pg_stat_activity (and counts it against max_connections) for
    up to a few ms after the client closed the connection. The server closes its end of the
    socket only as the backend exits, after leaving pg_stat_activity: so a copy of the socket
    becomes readable (end of file) exactly when the connection is gone for the server too. A
    pool that closes items with this gives their budget permits back only then.
    """
    fd = os.dup(conn.pgconn.socket)
    try:
        conn.close()
        select.select([fd], [], [], LONG)
    finally:
        os.close(fd)


def use_own_pool(budget: Any, connect: PgConnect, seconds: float, seed: int, out: Any) -> None:
    """One process, its own pool of up to 3 connections, on a budget shared with the others.
    Short lived items (max_lifetime) so connections are made and closed all the time, and a
    max_idle: an idle item keeps its permit, so without one, pools whose threads are done would
    hold permits that the other processes wait for (until those pools are closed)."""
    rng = random.Random(seed)
    pool = safepool.SafeConnectionPool(
        factory=connect,
        close=close_and_wait,
        max_size=3,
        budget=budget,
        max_lifetime=0.05,
        max_idle=0.05,
        timeout=LONG,
    )
    errors = []

    def work() -> None:
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                with pool.lease() as conn:
                    conn.execute("SELECT 1")
                    time.sleep(rng.uniform(0, 0.01))
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    stats = pool.stats()
    pool.close()
    out.send((os.getpid(), errors, stats.created, stats.closed))
