"""Module-level functions that child processes run (importable under spawn and forkserver)."""

from __future__ import annotations

import gc
import os
from typing import Any


def use_inherited_pool_in_child(pool: Any, parent_ids: list[int], conn_out: Any) -> None:
    """In a multiprocessing child: the inherited pool is empty and makes its own items."""
    try:
        stats = pool.stats()
        with pool.lease() as conn:
            fresh = id(conn) not in parent_ids
            conn.execute("INSERT INTO rows (who) VALUES (?)", (f"child-{os.getpid()}",))
            conn.commit()
        after = pool.stats()
        del pool
        gc.collect()  # no finaliser may close the parent's connections
        conn_out.send(("ok", stats.size, fresh, after.created))
    except BaseException as exc:
        conn_out.send(("error", repr(exc)))


def server_connections_then_fork(dsn: str, how: str, kind: str, ready: Any) -> None:
    """Keep idle PostgreSQL connections (two in a pool, or one ``ProcessLocal`` client), start
    a child that outlives us, send (the connections' server pids, the child's pid), then wait
    to be killed."""
    import time

    import psycopg

    from helpers import LONG, start_lingering_child
    from safepool import ProcessLocal, SafeConnectionPool

    def connect() -> Any:
        return psycopg.connect(dsn, autocommit=True)

    if kind == "pool":
        pool = SafeConnectionPool(factory=connect, max_size=2)
        conns = [pool.acquire(), pool.acquire()]
        backends = [c.info.backend_pid for c in conns]
        for conn in conns:
            pool.release(conn)
    else:
        client = ProcessLocal(connect)
        backends = [client.get().info.backend_pid]
    ready.send((backends, start_lingering_child(how)))
    time.sleep(LONG)
    os._exit(3)
