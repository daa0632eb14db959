"""Types of PoolManager.SafeConnectionPool, PoolProxy and HostedItem, checked by mypy --strict.

tests/test_typing.py type-checks this file (``assert_type`` must hold; every ``# type: ignore``
must silence exactly the error named, or ``warn_unused_ignores`` fails the run) and runs it:
``python check_pools.py DIR [START_METHOD]`` makes the same calls against a real manager
server, so what the types claim is what happens at run time.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import sqlite3
import sys
from pathlib import Path
from typing import Any

from typing_extensions import assert_type

from safepool import HostedItem, PoolManager, PoolProxy, SafeConnectionPool, dbapi
from safepool._lease import Lease


class Connect:
    """A picklable factory of sqlite3 connections to one database file, with a table."""

    def __init__(self, path: str) -> None:
        self.path = path
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS rows (who TEXT)")
        conn.close()

    def __call__(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False)


@dataclasses.dataclass(frozen=True)
class Token:
    value: str


def make_token() -> Token:
    return Token("t")


def count_rows(conn: sqlite3.Connection, who: str) -> int:
    row = conn.execute("SELECT count(*) FROM rows WHERE who = ?", (who,)).fetchone()
    return int(row[0])


def insert(conn: sqlite3.Connection, who: str, *, commit: bool = False) -> None:
    conn.execute("INSERT INTO rows (who) VALUES (?)", (who,))
    if commit:
        conn.commit()


def token_value(token: Token, suffix: str = "") -> str:
    return token.value + suffix


def in_process(path: str) -> None:
    """The in-process pool, for comparison: its leases are the items themselves."""
    with SafeConnectionPool(factory=Connect(path), max_size=1) as pool:
        assert_type(pool, SafeConnectionPool[sqlite3.Connection])
        with pool.lease() as conn:
            assert_type(conn, sqlite3.Connection).execute("SELECT 1")


def hosted(manager: PoolManager, path: str) -> None:
    pool = manager.SafeConnectionPool(factory=Connect(path), max_size=2)
    assert_type(pool, PoolProxy[HostedItem[sqlite3.Connection]])
    explicit = manager.SafeConnectionPool(factory=Connect(path), share="hosted")
    assert_type(explicit, PoolProxy[HostedItem[sqlite3.Connection]])

    # pool.call: typed from the function, which receives the connection itself
    assert_type(pool.call(insert, "a", commit=True), None)
    assert assert_type(pool.call(count_rows, "a"), int) == 1
    assert assert_type(pool.call(count_rows, "a", timeout=5), int) == 1
    rows = assert_type(pool.call(dbapi.fetchall, "SELECT who FROM rows"), list[tuple[Any, ...]])
    assert rows == [("a",)]

    # acquire / release / lease give HostedItem handles, whose call is typed the same way
    item = assert_type(pool.acquire(), HostedItem[sqlite3.Connection])
    assert isinstance(item, HostedItem)
    assert assert_type(item.call(count_rows, "a"), int) == 1
    pool.release(item)
    lease = assert_type(pool.lease(timeout=5), Lease[HostedItem[sqlite3.Connection]])
    with lease as conn:
        assert_type(conn, HostedItem[sqlite3.Connection])
        assert isinstance(conn, HostedItem)
        conn.call(insert, "b")
        assert assert_type(conn.call(count_rows, "b"), int) == 1
        conn.call(dbapi.commit)


def by_value(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(factory=make_token, share="value", max_size=2)
    assert_type(pool, PoolProxy[Token])
    assert assert_type(pool.call(token_value, "!"), str) == "t!"
    assert assert_type(pool.call(token_value, timeout=5), str) == "t"
    token = assert_type(pool.acquire(), Token)
    assert token == Token("t")
    pool.release(token)
    with pool.lease() as leased:
        assert assert_type(leased, Token).value == "t"


def untyped(manager: PoolManager, share: str) -> None:
    """A ``share`` known only at run time: the proxy's item type is not known either."""
    pool = manager.SafeConnectionPool(factory=make_token, share=share)
    assert_type(pool, PoolProxy[Any])
    # the result type still comes from the function
    assert assert_type(pool.call(token_value, "?"), str) == "t?"


# -- what must not type-check (never run: each line would fail at run time too) ------------------


def hosted_errors(pool: PoolProxy[HostedItem[sqlite3.Connection]], manager: PoolManager) -> None:
    with pool.lease() as conn:
        conn.execute("SELECT 1")  # type: ignore[attr-defined]
        conn.call(count_rows, 1)  # type: ignore[arg-type]
        conn.call(token_value)  # type: ignore[arg-type]
        wrong: str = conn.call(count_rows, "a")  # type: ignore[assignment]
    wrong_result: str = pool.call(count_rows, "a")  # type: ignore[assignment]
    pool.call(count_rows)  # type: ignore[call-overload]
    pool.call(count_rows, "a", "extra")  # type: ignore[call-overload]
    pool.call(insert, "a", comit=True)  # type: ignore[call-arg]
    pool.call(token_value)  # type: ignore[call-overload]
    pool.call(token_value, timeout=1)  # type: ignore[arg-type]
    pool.acquire().execute("SELECT 1")  # type: ignore[attr-defined]
    # the annotation the issue reported: a hosted pool is not a pool of connections
    bad: PoolProxy[sqlite3.Connection] = manager.SafeConnectionPool(  # type: ignore[assignment]
        factory=Connect("x")
    )
    del bad, wrong, wrong_result


def value_errors(pool: PoolProxy[Token], manager: PoolManager) -> None:
    pool.call(count_rows, "a")  # type: ignore[call-overload]
    wrong: int = pool.call(token_value)  # type: ignore[assignment]
    pool.acquire().call(token_value)  # type: ignore[attr-defined]
    pool.release(Token("t").value)  # type: ignore[arg-type]
    manager.SafeConnectionPool(max_size=2)  # type: ignore[call-overload]
    del wrong


def main(workdir: str, start_method: str | None) -> None:
    path = str(Path(workdir) / "check_pools.sqlite")
    in_process(path)
    with PoolManager(ctx=multiprocessing.get_context(start_method)) as manager:
        hosted(manager, path)
        by_value(manager)
        untyped(manager, "hosted")
        untyped(manager, "value")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print("ok")
