from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers import PG_DSN, REDIS_URL, FakeClock

REQUIRE_SERVICES = os.environ.get("SAFEPOOL_REQUIRE_SERVICES") == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run the long fault-injection sweeps and stress runs (same as SAFEPOOL_LONG=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        os.environ["SAFEPOOL_LONG"] = "1"  # inherited by xdist workers and child processes


def pytest_report_header(config: pytest.Config) -> str:
    from helpers import SEED, long_run

    return f"safepool sweeps: seed {SEED} (SAFEPOOL_SEED), long={long_run()} (--long)"


def _unavailable(service: str, exc: BaseException) -> None:
    reason = f"{service} is not reachable ({type(exc).__name__}: {exc})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}; SAFEPOOL_REQUIRE_SERVICES=1 makes this a failure")
    pytest.skip(f"{reason}; start it or set SAFEPOOL_TEST_DSN / SAFEPOOL_TEST_REDIS")


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """A DSN of a reachable PostgreSQL, or skip (fail under SAFEPOOL_REQUIRE_SERVICES=1)."""
    try:
        import psycopg
    except ImportError as exc:
        _unavailable("PostgreSQL (psycopg not installed)", exc)
    try:
        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        _unavailable("PostgreSQL", exc)
    return PG_DSN


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A URL of a reachable Redis, or skip (fail under SAFEPOOL_REQUIRE_SERVICES=1)."""
    try:
        import redis
    except ImportError as exc:
        _unavailable("Redis (redis-py not installed)", exc)
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        _unavailable("Redis", exc)
    return REDIS_URL


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pg_table(pg_dsn: str) -> Iterator[str]:
    """A fresh table (unique per test, xdist-safe) with columns (id serial, who text)."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, who text)")
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture(params=[True, False], ids=["fast", "slow"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """By-value pools in the cross-process suite run on both paths: the same-host fast path
    (the pool's shared table) and the round-trip path."""
    return bool(request.param)
