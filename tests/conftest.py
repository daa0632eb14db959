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
    parser.addoption(
        "--start-methods",
        default=os.environ.get("SAFEPOOL_START_METHODS", ""),
        help="comma-separated start methods to run the tests parametrized by one under "
        "(default: all of fork, spawn, forkserver; same as SAFEPOOL_START_METHODS). CI runs "
        "all three on Python 3.11 and one on each other version, to stay under 15 minutes.",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--long"):
        os.environ["SAFEPOOL_LONG"] = "1"  # inherited by xdist workers and child processes


def pytest_report_header(config: pytest.Config) -> str:
    from helpers import SEED, long_run

    methods = ",".join(sorted(_start_methods(config)))
    return (
        f"safepool sweeps: seed {SEED} (SAFEPOOL_SEED), long={long_run()} (--long); "
        f"start methods: {methods} (--start-methods)"
    )


def _start_methods(config: pytest.Config) -> set[str]:
    """The start methods chosen with --start-methods (all three unless it says otherwise)."""
    from helpers import START_METHODS

    text = config.getoption("--start-methods").strip()
    if not text:
        return set(START_METHODS)
    chosen = {m.strip() for m in text.split(",") if m.strip()}
    unknown = chosen - set(START_METHODS)
    if unknown or not chosen:
        raise pytest.UsageError(
            f"--start-methods / SAFEPOOL_START_METHODS: {text!r} is not a comma-separated list "
            f"of {', '.join(START_METHODS)} (unknown: {', '.join(sorted(unknown)) or 'none'})"
        )
    return chosen


_UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)  # after pytest-xdist has added the group to the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _check_groups(config, items)
    _deselect_start_methods(config, items)


def _check_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup``, an ``xdist_group`` mark must have reached the node id (that
    is how pytest-xdist tells its scheduler); if it did not, such tests fail, saying why."""
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[_UNGROUPED] = True


def _deselect_start_methods(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the tests parametrized by a start method that was not chosen."""
    from helpers import START_METHODS

    chosen = _start_methods(config)
    if chosen == set(START_METHODS):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        methods = {v for v in params.values() if isinstance(v, str) and v in START_METHODS}
        (drop if methods - chosen else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.stash.get(_UNGROUPED, False):
        pytest.fail(
            "its xdist_group mark is not honoured by this pytest and pytest-xdist pair (pytest "
            "9.2 with pytest-xdist 3.8, see pytest-xdist issue #1386), so its group would not "
            "share one worker; install the test extra's pins: pip install -e '.[test]'",
            pytrace=False,
        )


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
