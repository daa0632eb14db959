"""PoolManager and register_pool: the API, both sharing modes, errors, security, server death."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import manager_targets as targets
import safepool
from helpers import LONG, SHORT, SqliteFactory, ThreadResult, wait_until
from safepool import (
    HostedItem,
    HostedItemError,
    LeaseError,
    ManagerUnavailable,
    PoolClosed,
    PoolManager,
    PoolTimeout,
    TooManyWaiting,
    dbapi,
    register_pool,
)
from safepool._hosted import HostedPool
from safepool.manager import create_proxy

# A manager call that fails must fail within this; dead servers are detected at once.
DEATH_DETECTION = 1.0


@pytest.fixture
def manager() -> Iterator[PoolManager]:
    with PoolManager() as m:
        yield m


@pytest.fixture
def db(tmp_path: Path) -> SqliteFactory:
    return SqliteFactory(str(tmp_path / "db.sqlite"))


def test_proxy_exposes_exactly_the_hosted_methods() -> None:
    assert tuple(safepool.PoolProxy._exposed_) == HostedPool.EXPOSED


class TestHosted:
    def test_call_runs_in_the_server_and_returns_plain_data(
        self, manager: PoolManager, db: SqliteFactory
    ) -> None:
        pool = manager.SafeConnectionPool(factory=db, max_size=2, name="rows")
        assert pool.call(dbapi.execute, "INSERT INTO rows (who) VALUES (?)", ("a",), commit=True)
        assert pool.call(dbapi.fetchall, "SELECT who FROM rows") == [("a",)]
        assert pool.describe() == {
            "name": "rows",
            "share": "hosted",
            "max_size": 2,
            "fast_path": False,
            "fast_path_reason": "hosted items stay in the server: every lease is a round trip",
        }
        stats = pool.stats()
        assert (stats.name, stats.requests, stats.created, stats.leased) == ("rows", 2, 1, 0)

    def test_lease_gives_a_handle_whose_calls_share_one_connection(
        self, manager: PoolManager, db: SqliteFactory
    ) -> None:
        pool = manager.SafeConnectionPool(factory=db, max_size=2)
        with pool.lease() as conn:
            assert isinstance(conn, HostedItem)
            conn.call(dbapi.execute, "INSERT INTO rows (who) VALUES (?)", ("uncommitted",))
            # the same connection sees its own uncommitted row; another does not
            assert conn.call(dbapi.fetchone, "SELECT count(*) FROM rows") == (1,)
            assert pool.call(dbapi.fetchone, "SELECT count(*) FROM rows") == (0,)
            conn.call(dbapi.commit)
        assert pool.call(dbapi.fetchone, "SELECT count(*) FROM rows") == (1,)
        assert conn.released
        with pytest.raises(LeaseError, match="already released"):
            conn.call(dbapi.commit)

    def test_hosted_items_and_sockets_never_reach_the_client(
        self, manager: PoolManager, db: SqliteFactory
    ) -> None:
        pool = manager.SafeConnectionPool(factory=db, max_size=1)
        pool.stats()  # opens this thread's connection to the server first
        with targets.new_fds() as opened:
            for func, message in (
                (targets.return_item, "returned the hosted item itself"),
                (targets.return_item_in_list, "contains the hosted item itself"),
                (targets.make_socket, "cannot be sent to the client"),
                (targets.make_error_with_socket, "raised ValueError"),
            ):
                with pytest.raises(HostedItemError, match=message):
                    pool.call(func)
                with pool.lease() as conn, pytest.raises(HostedItemError, match=message):
                    conn.call(func)
        assert opened == set()
        assert pool.stats().leased == 0  # every failed call still returned its item

    def test_hosted_item_cannot_be_pickled(self, manager: PoolManager, db: SqliteFactory) -> None:
        import pickle

        pool = manager.SafeConnectionPool(factory=db)
        with pool.lease() as conn, pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(conn)

    def test_errors_raised_by_the_function_keep_their_type(
        self, manager: PoolManager, db: SqliteFactory
    ) -> None:
        import sqlite3

        pool = manager.SafeConnectionPool(factory=db)
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            pool.call(dbapi.fetchall, "SELECT * FROM missing")
        assert pool.stats().leased == 0


class TestByValue:
    def test_clients_get_copies_and_release_them(
        self, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = manager.SafeConnectionPool(
            factory=targets.TokenFactory(), max_size=2, share="value", fast_path=fast_path
        )
        first = pool.acquire()
        assert first == "token-1"
        with pool.lease() as second:
            assert second == "token-2"
            assert pool.stats().leased == 2
        pool.release(first)
        assert pool.stats().leased == 0

    def test_look_alike_foreign_and_double_releases_change_nothing(
        self, manager: PoolManager, fast_path: bool
    ) -> None:
        one = manager.SafeConnectionPool(
            factory=targets.TokenFactory(), share="value", fast_path=fast_path, name="one"
        )
        two = manager.SafeConnectionPool(
            factory=targets.TokenFactory(), share="value", fast_path=fast_path, name="two"
        )
        item = one.acquire()
        look_alike = "".join(["token-", "1"])  # equal, but not the object we were given
        before = one.stats()
        for bad in (look_alike, "token-99", None):
            with pytest.raises(LeaseError, match="not leased through this proxy"):
                one.release(bad)
        with pytest.raises(LeaseError):
            two.release(item)
        assert one.stats() == before
        one.release(item)
        with pytest.raises(LeaseError):
            one.release(item)
        assert one.stats().leased == 0

    def test_unpicklable_items_cannot_be_shared_by_value(
        self, manager: PoolManager, db: SqliteFactory, fast_path: bool
    ) -> None:
        pool = manager.SafeConnectionPool(factory=db, share="value", fast_path=fast_path)
        with pytest.raises(HostedItemError, match="share='hosted'"):
            pool.acquire()
        assert pool.stats().leased == 0


class TestForgedInput:
    def test_forged_tokens_are_lease_errors(self, manager: PoolManager) -> None:
        pool = manager.SafeConnectionPool(factory=targets.TokenFactory(), max_size=1)
        held = pool.acquire()
        before = pool.stats()
        for token in (12345, -1, "x", None):
            with pytest.raises(LeaseError, match="no lease"):
                pool._callmethod("release", (token, False))
        with pytest.raises(LeaseError, match="no lease"):
            pool.release(HostedItem(pool, 424242))
        assert pool.stats() == before
        pool.release(held)

    def test_hosted_item_of_another_pool_or_released_twice(self, manager: PoolManager) -> None:
        one = manager.SafeConnectionPool(factory=targets.TokenFactory())
        two = manager.SafeConnectionPool(factory=targets.TokenFactory())
        item = one.acquire()
        with pytest.raises(LeaseError, match="another pool"):
            two.release(item)
        one.release(item)
        with pytest.raises(LeaseError, match="already released"):
            one.release(item)

    @pytest.mark.parametrize("name", ["_pool", "_leases", "__init__", "#GETVALUE", "__reduce__"])
    def test_private_names_and_getvalue_are_refused(self, manager: PoolManager, name: str) -> None:
        pool = manager.SafeConnectionPool(factory=targets.TokenFactory())
        with pytest.raises(AttributeError, match="not one of its exposed methods"):
            pool._callmethod(name)
        with pytest.raises(AttributeError):
            pool._getvalue()

    def test_bad_options_fail_in_the_client_with_their_type(self, manager: PoolManager) -> None:
        with pytest.raises(ValueError, match="max_size must be >= 1, got 0"):
            manager.SafeConnectionPool(factory=targets.TokenFactory(), max_size=0)
        with pytest.raises(TypeError, match=r"unknown pool option.*'maxsize'"):
            manager.SafeConnectionPool(factory=targets.TokenFactory(), maxsize=3)
        with pytest.raises(ValueError, match="share must be 'hosted'"):
            manager.SafeConnectionPool(factory=targets.TokenFactory(), share="copy")
        with pytest.raises(TypeError, match="not lambdas or closures"):
            manager.SafeConnectionPool(factory=lambda: 1)

    def test_server_side_errors_keep_their_type_too(self, manager: PoolManager) -> None:
        # Skip the client-side checks: the server's own ValueError must arrive as a ValueError.
        with pytest.raises(ValueError, match="min_size \\(3\\) must not exceed max_size \\(1\\)"):
            create_proxy(
                manager,
                "SafeConnectionPool",
                factory=targets.TokenFactory(),
                max_size=1,
                min_size=3,
            )

    def test_safe_server_refuses_replies_holding_sockets_stdlib_does_not(self) -> None:
        with targets.SocketsManager() as plain:
            sockets = plain.Sockets()
            str(sockets)  # opens this thread's connection to the server first
            with targets.new_fds() as opened:
                leaked = sockets.make()  # the stdlib trap: the fd is duplicated into us
            assert str(leaked.fileno()) in opened
            leaked.close()
        with targets.SafeSocketsManager() as safe:
            sockets = safe.Sockets()
            str(sockets)
            with (
                targets.new_fds() as opened,
                pytest.raises(safepool.SafePoolError, match="could not be sent as is"),
            ):
                sockets.make()
            assert opened == set()


class TestErrorsAcrossTheBoundary:
    def test_timeout_keeps_its_type_and_is_never_early(self, manager: PoolManager) -> None:
        pool = manager.SafeConnectionPool(factory=targets.TokenFactory(), max_size=1)
        held = pool.acquire()
        start = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"within 0\.2s"):
            pool.acquire(timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 0.2 + SHORT
        pool.release(held)

    def test_max_waiting_closed_and_lease_errors_keep_their_type(
        self, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = manager.SafeConnectionPool(
            factory=targets.TokenFactory(),
            max_size=1,
            max_waiting=1,
            share="value",
            fast_path=fast_path,
        )
        held = pool.acquire()
        waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
        wait_until(lambda: pool.stats().waiting == 1)
        with pytest.raises(TooManyWaiting):
            pool.acquire(timeout=LONG)
        pool.close()
        with pytest.raises(PoolClosed):
            waiter.join(SHORT)
        with pytest.raises(PoolClosed):
            pool.acquire()
        pool.release(held)

    def test_factory_errors_name_the_cause_without_credentials(self, manager: PoolManager) -> None:
        pool = manager.SafeConnectionPool(
            factory=targets.PgConnect("host=127.0.0.1 port=1 password=hunter2 connect_timeout=1")
        )
        with pytest.raises(safepool.FactoryError, match="OperationalError") as info:
            pool.call(dbapi.commit)
        assert "hunter2" not in str(info.value)


class TestBlockingAcrossThreads:
    def test_a_waiting_client_never_blocks_another_clients_release(
        self, manager: PoolManager, fast_path: bool
    ) -> None:
        pool = manager.SafeConnectionPool(
            factory=targets.TokenFactory(), max_size=1, share="value", fast_path=fast_path
        )
        held = pool.acquire()
        waiter = ThreadResult(lambda: pool.acquire(timeout=LONG))
        wait_until(lambda: pool.stats().waiting == 1)
        pool.release(held)  # another connection of this process, served while the waiter waits
        got = waiter.join(SHORT)
        assert got == held
        pool.release(got)


class TestRegisterPool:
    def test_named_pool_is_one_pool_for_every_client(self, fast_path: bool) -> None:
        class Server(PoolManager):
            pass

        register_pool(
            Server,
            "tokens",
            targets.TokenFactory("named"),
            max_size=3,
            share="value",
            fast_path=fast_path,
        )
        authkey = secrets.token_bytes(32)
        with Server(address=("127.0.0.1", 0), authkey=authkey) as server:
            mine = server.tokens()
            item = mine.acquire()

            class Client(PoolManager):
                pass

            register_pool(Client, "tokens")  # the typeid only
            client = Client(address=server.address, authkey=authkey)
            client.connect()
            theirs = client.tokens()
            assert theirs.stats().leased == 1  # the same pool
            with theirs.lease() as other:
                assert other == "named-2"
            assert theirs.describe()["name"] == "tokens"
            mine.release(item)

    def test_register_pool_on_a_plain_base_manager_subclass_gets_the_safe_server(self) -> None:
        from multiprocessing.managers import BaseManager

        from safepool._server import SafeServer

        class Mine(BaseManager):
            pass

        register_pool(Mine, "db", targets.TokenFactory())
        assert Mine._Server is SafeServer  # type: ignore[attr-defined]
        with Mine() as m:
            with pytest.raises(AttributeError):
                m.db()._getvalue()
            assert m.db().stats().name == "db"

    def test_client_only_registration_against_a_server_without_the_pool(self) -> None:
        class Empty(PoolManager):
            pass

        register_pool(Empty, "missing")
        with Empty() as m, pytest.raises(LookupError, match="without a factory"):
            m.missing()

    @pytest.mark.parametrize(
        ("args", "kwargs", "exc", "message"),
        [
            ((PoolManager, "db", targets.TokenFactory()), {}, TypeError, "subclass of your own"),
            ((object, "db"), {}, TypeError, "must be a BaseManager subclass"),
            (("SUB", "2db", targets.TokenFactory()), {}, ValueError, "public Python identifier"),
            (("SUB", "_db", targets.TokenFactory()), {}, ValueError, "public Python identifier"),
            (("SUB", "start", targets.TokenFactory()), {}, ValueError, "would hide"),
            (("SUB", "db"), {"max_size": 3}, TypeError, "pool options need a factory"),
            (("SUB", "db", lambda: 1), {}, TypeError, "not lambdas or closures"),
            (("SUB", "db", targets.TokenFactory()), {"max_size": 0}, ValueError, "max_size"),
        ],
    )
    def test_bad_registrations_are_refused(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], exc: type, message: str
    ) -> None:
        class Sub(PoolManager):
            pass

        args = tuple(Sub if a == "SUB" else a for a in args)
        with pytest.raises(exc, match=message):
            register_pool(*args, **kwargs)
        assert "db" not in Sub._registry  # type: ignore[attr-defined]


class TestServerDeath:
    def test_calls_on_a_killed_server_fail_fast(self, fast_path: bool) -> None:
        m = PoolManager()
        m.start()
        pool = m.SafeConnectionPool(
            factory=targets.TokenFactory(), max_size=1, share="value", fast_path=fast_path
        )
        held = pool.acquire()
        blocked = ThreadResult(lambda: pool.acquire(timeout=LONG))
        wait_until(lambda: pool.stats().waiting == 1)
        os.kill(m._process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        m._process.join(SHORT)  # type: ignore[attr-defined]
        start = time.monotonic()
        with pytest.raises(ManagerUnavailable, match="unreachable"):
            blocked.join(SHORT)
        for call in (pool.stats, lambda: pool.release(held), pool.acquire):
            with pytest.raises(ManagerUnavailable):
                call()
        assert time.monotonic() - start < DEATH_DETECTION
        with pytest.raises(ManagerUnavailable):
            m.SafeConnectionPool(factory=targets.TokenFactory())
        m.shutdown()

    def test_sigint_does_not_stop_the_server(self, manager: PoolManager) -> None:
        pid = manager._process.pid  # type: ignore[attr-defined]
        with open(f"/proc/{pid}/status") as f:
            ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
        assert ignored & (1 << (signal.SIGINT - 1)), "the server must ignore SIGINT"
        pool = manager.SafeConnectionPool(factory=targets.TokenFactory())
        os.kill(pid, signal.SIGINT)
        assert pool.stats().size >= 0
        assert manager._process.is_alive()  # type: ignore[attr-defined]


def test_manager_accepts_the_base_manager_arguments(tmp_path: Path, fast_path: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    address = str(tmp_path / "manager.sock")
    authkey = secrets.token_bytes(32)
    with PoolManager(address=address, authkey=authkey, ctx=ctx) as m:
        assert m.address == address
        pool = m.SafeConnectionPool(
            factory=targets.TokenFactory(), share="value", fast_path=fast_path
        )
        with pool.lease() as item:
            assert item == "token-1"


def test_threads_of_one_client_share_the_pool_safely(manager: PoolManager, fast_path: bool) -> None:
    from helpers import run_threads

    pool = manager.SafeConnectionPool(
        factory=targets.TokenFactory(), max_size=3, share="value", fast_path=fast_path
    )
    held: set[str] = set()
    guard = threading.Lock()

    def work(i: int) -> None:
        for _ in range(30):
            with pool.lease(timeout=LONG) as item:
                with guard:
                    assert item not in held
                    held.add(item)
                with guard:
                    held.discard(item)

    run_threads(6, work)
    assert pool.stats().leased == 0
    assert pool.stats().created <= 3


def test_a_proxy_to_a_pool_that_is_gone_unpickles_and_fails_on_first_use(
    manager: PoolManager,
) -> None:
    import gc
    import pickle

    pool = manager.SafeConnectionPool(factory=targets.TokenFactory())
    data = pickle.dumps(pool)
    del pool
    gc.collect()  # the last proxy: the server frees the pool
    orphan = pickle.loads(data)  # must not raise (in a Pool worker that would hang the pool)
    with pytest.raises(ManagerUnavailable, match="no longer exists"):
        orphan.stats()


def test_a_client_reopens_its_session_after_the_server_restarts(
    tmp_path: Path, fast_path: bool
) -> None:
    address = str(tmp_path / "restart.sock")
    authkey = secrets.token_bytes(32)

    class Server(PoolManager):
        pass

    register_pool(Server, "tokens", targets.TokenFactory(), share="value", fast_path=fast_path)
    for _ in range(2):  # the same address, a new server: this process's session must follow
        with Server(address=address, authkey=authkey) as server:
            pool = server.tokens()
            with pool.lease(timeout=SHORT) as item:
                assert item == "token-1"
            assert pool.stats().leased == 0
