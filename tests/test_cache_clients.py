"""The README's ProcessLocal recipes, on real clients and real sockets: requests over HTTP and
TLS, psycopg, redis-py, sqlite3 and SQLAlchemy, under raw os.fork(), fork, forkserver and spawn.

Each hazard has a control test without the cache (a shared socket, a child that closes what it
inherited), so the tests with the cache could fail.
"""

from __future__ import annotations

import functools
import gc
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import requests

import cache_targets
from cache_targets import FORKED, METHODS, Child
from helpers import FORK_WARNING, LONG, wait_until
from httpserver import EchoServer
from safepool.cache import ProcessLocal

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)

REQUESTS = 50


# -- requests.Session over HTTP and HTTPS -------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("method", METHODS)
def test_requests_sessions_are_per_process_and_traffic_never_mixes(
    tmp_path: Path, method: str, tls: bool
) -> None:
    with EchoServer(tmp_path, tls=tls) as server:
        sessions = ProcessLocal(requests.Session, name="sessions")
        session = sessions.get()
        session.get(server.url, params={"id": "parent-pre"}, verify=server.ca_path, timeout=LONG)
        parent_port = server.port_of("parent-pre")

        children = [
            Child(method, cache_targets.http_requests, sessions, server.url, f"child{i}", REQUESTS,
                  verify=server.ca_path, clear=True)
            for i in range(2)
        ]  # fmt: skip
        # Each child picks its connection while the parent's sits idle in its session (where a
        # child that inherited the session would take it), then all three run at once.
        wait_until(
            lambda: all(server.ports(f"child{i}-0") for i in range(2)), LONG, "first requests"
        )
        mismatched, ports = cache_targets.http_requests(
            sessions, server.url, "parent", REQUESTS, verify=server.ca_path, clear=False
        )
        results = [child.result() for child in children]
        gc.collect()
        session.get(server.url, params={"id": "parent-post"}, verify=server.ca_path, timeout=LONG)

        assert (mismatched, ports) == (0, [parent_port])
        assert server.port_of("parent-post") == parent_port  # still the same connection
        assert sessions.get() is session
        child_ports = []
        for i, (child_mismatched, child_port) in enumerate(results):
            assert child_mismatched == 0
            assert len(child_port) == 1  # one session per child, reused for all its requests
            assert server.ports(f"child{i}-") == child_port * REQUESTS
            child_ports += child_port
        assert parent_port not in child_ports
        assert len(set(child_ports)) == 2
        assert server.errors == []
        sessions.clear()


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("method", FORKED)
def test_control_a_session_shared_across_fork_sends_the_childs_request_on_the_parents_socket(
    tmp_path: Path, method: str, tls: bool
) -> None:
    """The seed-002 bug without the cache: the child's request leaves from the parent's port."""
    with EchoServer(tmp_path, tls=tls) as server, requests.Session() as session:
        session.get(server.url, params={"id": "parent"}, verify=server.ca_path, timeout=LONG)
        parent_port = server.port_of("parent")
        child_port = Child(
            method, cache_targets.naive_request, session, server.url, "child", server.ca_path
        ).result()
        assert child_port == parent_port == server.port_of("child")
        if tls:
            # The child advanced the server's side of the TLS stream: the parent's next record is
            # out of sequence, the server rejects it, and the parent's request fails.
            with pytest.raises(requests.exceptions.ConnectionError):
                session.get(server.url, params={"id": "parent-2"}, verify=server.ca_path,
                            timeout=LONG)  # fmt: skip
            wait_until(lambda: server.errors != [], what="the server rejected the stream")
            assert "SSL" in server.errors[0]


# -- psycopg ------------------------------------------------------------------------------------


def backend_pid(conn: Any) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])


@pytest.mark.postgres
@pytest.mark.parametrize("method", METHODS)
def test_psycopg_parent_connection_survives_children_that_clear_the_cache(
    pg_dsn: str, method: str
) -> None:
    import psycopg

    cache = ProcessLocal(functools.partial(psycopg.connect, pg_dsn, autocommit=True), name="pg")
    conn = cache.get()
    backend = backend_pid(conn)
    children = [Child(method, cache_targets.pg_child, cache) for _ in range(2)]
    results = [child.result() for child in children]
    gc.collect()
    child_backends = {child_backend for child_backend, _, _ in results}
    assert backend not in child_backends and len(child_backends) == 2
    assert all(closed == 1 and not built for _, closed, built in results)
    assert cache.get() is conn and backend_pid(conn) == backend  # the same, live session
    assert cache.clear() == 1 and conn.closed


@pytest.mark.postgres
@pytest.mark.parametrize("method", FORKED)
def test_control_a_psycopg_connection_used_across_fork_is_the_parents_session(
    pg_dsn: str, method: str
) -> None:
    import psycopg

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        backend = backend_pid(conn)
        assert Child(method, backend_pid, conn).result() == backend


@pytest.mark.postgres
@pytest.mark.parametrize("method", FORKED)
def test_control_a_child_closing_an_inherited_psycopg_connection_breaks_the_parent(
    pg_dsn: str, method: str
) -> None:
    import psycopg

    conn = psycopg.connect(pg_dsn, autocommit=True)
    backend_pid(conn)
    Child(method, conn.close).result()  # sends Terminate on the shared socket
    with pytest.raises(psycopg.OperationalError):
        backend_pid(conn)
    conn.close()


# -- redis-py -----------------------------------------------------------------------------------


def redis_factory(url: str, single: bool) -> Any:
    import redis

    return functools.partial(redis.Redis.from_url, url, single_connection_client=single)


@pytest.mark.redis
@pytest.mark.parametrize("single", [False, True], ids=["pooled", "single-connection"])
@pytest.mark.parametrize("method", METHODS)
def test_redis_clients_are_per_process_and_a_hard_close_in_a_child_spares_the_parent(
    redis_url: str, method: str, single: bool
) -> None:
    """The close hook shuts the socket down, which would end the parent's connection had the
    child run it on the client it inherited."""
    cache = ProcessLocal(redis_factory(redis_url, single), close=cache_targets.shutdown_redis)
    client = cache.get()
    client_id = client.client_id()
    results = [Child(method, cache_targets.redis_child, cache).result() for _ in range(2)]
    gc.collect()
    child_ids = {child_id for child_id, _ in results}
    assert client_id not in child_ids and len(child_ids) == 2
    assert all(closed == 1 for _, closed in results)
    assert cache.get() is client and client.client_id() == client_id  # same live connection
    cache.clear()


@pytest.mark.redis
@pytest.mark.parametrize("method", FORKED)
def test_control_a_redis_client_shared_across_fork_shares_the_connection(
    redis_url: str, method: str
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, single_connection_client=True)
    client_id = client.client_id()
    assert Child(method, client.client_id).result() == client_id
    client.close()


@pytest.mark.redis
@pytest.mark.parametrize("method", FORKED)
def test_control_a_hard_close_of_an_inherited_redis_client_breaks_the_parent(
    redis_url: str, method: str
) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, single_connection_client=True)
    client_id = client.client_id()
    Child(method, cache_targets.shutdown_redis, client).result()
    try:
        after = client.client_id()  # redis-py may reconnect: then it is a new connection
    except redis.ConnectionError:
        after = None
    assert after != client_id
    client.close()


# -- sqlite3, one connection per thread ---------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_sqlite3_connections_per_thread_and_per_process(tmp_path: Path, method: str) -> None:
    path = str(tmp_path / "db.sqlite")
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, who TEXT)")
    setup.close()
    cache = ProcessLocal(functools.partial(sqlite3.connect, path, timeout=LONG), per_thread=True)
    conn = cache.get()  # this thread's; check_same_thread stays on
    results = [Child(method, cache_targets.sqlite_child, cache, 4).result() for _ in range(2)]
    assert [distinct for _, _, distinct in results] == [4, 4]
    assert cache.get() is conn
    rows = conn.execute("SELECT who FROM rows").fetchall()
    assert len(rows) == 8 and {who.split("-")[0] for (who,) in rows} == {
        str(pid) for pid, _, _ in results
    }
    assert cache.clear() == 1


# -- SQLAlchemy: the engine survives the fork, its pool does not --------------------------------


def pg_engine_factory(pg_dsn: str) -> Any:
    import psycopg
    import sqlalchemy

    creator = functools.partial(psycopg.connect, pg_dsn)
    return functools.partial(sqlalchemy.create_engine, "postgresql+psycopg://", creator=creator)


@pytest.mark.postgres
@pytest.mark.parametrize("method", METHODS)
def test_sqlalchemy_engine_is_disposed_without_closing_in_a_forked_child(
    pg_dsn: str, method: str
) -> None:
    pytest.importorskip("sqlalchemy")
    import sqlalchemy
    from sqlalchemy.orm import sessionmaker

    cache = ProcessLocal(
        pg_engine_factory(pg_dsn),
        after_fork=cache_targets.reuse_engine,
        close=sqlalchemy.engine.Engine.dispose,
        name="engine",
    )
    engine = cache.get()
    query = "SELECT pg_backend_pid()"
    with engine.connect() as conn:  # back in the pool, idle, when the children fork
        backend = conn.execute(sqlalchemy.text(query)).scalar()
    cache_targets.INHERITED["engine"] = engine
    cache_targets.INHERITED["sessionmaker"] = sessionmaker(bind=engine)
    try:
        results = [Child(method, cache_targets.engine_child, cache, query).result()]
        if method in FORKED:
            # A sessionmaker made in the parent is bound to the very engine object: it is safe
            # in the child because the engine was disposed there (close=False).
            results.append(Child(method, cache_targets.session_child, cache, query).result())
    finally:
        cache_targets.INHERITED.clear()
    for same_engine, child_backend in results:
        assert same_engine == (method in FORKED)  # adopted under fork; spawn builds its own
        assert child_backend != backend
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text(query)).scalar() == backend  # same pooled session
    assert cache.clear() == 1


@pytest.mark.postgres
@pytest.mark.parametrize("method", FORKED)
def test_control_an_engine_used_across_fork_hands_the_child_the_parents_session(
    pg_dsn: str, method: str
) -> None:
    pytest.importorskip("sqlalchemy")
    import sqlalchemy

    engine = pg_engine_factory(pg_dsn)()
    query = "SELECT pg_backend_pid()"
    with engine.connect() as conn:
        backend = conn.execute(sqlalchemy.text(query)).scalar()

    def child() -> Any:
        with engine.connect() as conn:
            return conn.execute(sqlalchemy.text(query)).scalar()

    assert Child(method, child).result() == backend
    engine.dispose()


@pytest.mark.parametrize("method", METHODS)
def test_sqlalchemy_sqlite_engine_recipe(tmp_path: Path, method: str) -> None:
    """The recipe without PostgreSQL: a forked child keeps the Engine object with a fresh pool;
    a spawned one builds its own engine."""
    pytest.importorskip("sqlalchemy")
    import sqlalchemy

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cache = ProcessLocal(
        functools.partial(sqlalchemy.create_engine, url),
        after_fork=cache_targets.reuse_engine,
        close=sqlalchemy.engine.Engine.dispose,
    )
    engine = cache.get()
    with engine.connect() as conn:
        parent_dbapi = id(conn.connection.dbapi_connection)
    cache_targets.INHERITED["engine"] = engine
    try:
        same, child_dbapi = Child(method, cache_targets.engine_child, cache, None).result()
    finally:
        cache_targets.INHERITED.clear()
    assert same == (method in FORKED)
    if method in FORKED:  # ids compare only within one address-space lineage
        assert child_dbapi != parent_dbapi
    with engine.connect() as conn:
        assert id(conn.connection.dbapi_connection) == parent_dbapi
    assert cache.clear() == 1
