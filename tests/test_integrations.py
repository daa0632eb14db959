"""The pool with real PostgreSQL (psycopg) and Redis (redis-py) connections."""

from __future__ import annotations

from typing import Any

import pytest

from helpers import LONG, run_threads
from safepool import SafeConnectionPool


@pytest.mark.postgres
def test_postgres_pool_with_check_and_reset(pg_dsn: str, pg_table: str) -> None:
    import psycopg

    def check(conn: Any) -> None:
        conn.execute("SELECT 1")

    def reset(conn: Any) -> bool:
        conn.rollback()
        return not conn.closed

    pool = SafeConnectionPool(
        factory=lambda: psycopg.connect(pg_dsn),
        max_size=3,
        check=check,
        reset=reset,
        name="pg",
    )

    def write(i: int) -> None:
        for n in range(10):
            with pool.lease(timeout=LONG) as conn:
                conn.execute(f"INSERT INTO {pg_table} (who) VALUES (%s)", (f"{i}-{n}",))
                conn.commit()

    run_threads(6, write)
    with pool.lease() as conn:
        assert conn.execute(f"SELECT count(*) FROM {pg_table}").fetchone() == (60,)
        conn.execute(f"INSERT INTO {pg_table} (who) VALUES ('uncommitted')")
    # reset rolled the uncommitted row back
    with pool.lease() as conn:
        assert conn.execute(f"SELECT count(*) FROM {pg_table}").fetchone() == (60,)
    assert pool.stats().created <= 3
    pool.close()


@pytest.mark.postgres
def test_postgres_dead_connection_is_replaced_by_check(pg_dsn: str) -> None:
    import psycopg

    pool = SafeConnectionPool(
        factory=lambda: psycopg.connect(pg_dsn, autocommit=True),
        max_size=1,
        check=lambda conn: conn.execute("SELECT 1"),
    )
    with pool.lease() as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
    with pool.lease() as conn:  # the check notices the dead session and replaces it
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != backend
    assert pool.stats().lost == 1
    pool.close()


@pytest.mark.redis
def test_redis_clients_are_pooled(redis_url: str) -> None:
    import uuid

    import redis

    key = f"safepool-test-{uuid.uuid4().hex}"
    pool = SafeConnectionPool(
        factory=lambda: redis.Redis.from_url(redis_url, single_connection_client=True),
        max_size=2,
        check=lambda client: client.ping(),
    )

    def incr(i: int) -> None:
        for _ in range(25):
            with pool.lease(timeout=LONG) as client:
                client.incr(key)

    run_threads(8, incr)
    with pool.lease() as client:
        assert int(client.get(key)) == 200
        client.delete(key)
    assert pool.stats().created <= 2
    pool.close()
