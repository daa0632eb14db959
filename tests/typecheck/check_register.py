"""Types of register_pool's accessors, checked by mypy --strict and run (see check_pools.py)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sqlite3
import sys
from typing import Any

from typing_extensions import assert_type

from safepool import HostedItem, PoolAccessor, PoolManager, PoolProxy, register_pool


def connect() -> sqlite3.Connection:
    # The server's working directory is the script's (see main): a relative path is fine here.
    return sqlite3.connect("check_register.sqlite", check_same_thread=False)


@dataclasses.dataclass(frozen=True)
class Token:
    value: str


def make_token() -> Token:
    return Token("t")


def one(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT 1").fetchone()[0])


def token_value(token: Token) -> str:
    return token.value


class Server(PoolManager):
    pass


# In the server's code: typed from the factory.
server_db = register_pool(Server, "db", connect, max_size=2)
server_tokens = register_pool(Server, "tokens", make_token, share="value", max_size=2)
assert_type(server_db, PoolAccessor[HostedItem[sqlite3.Connection]])
assert_type(server_tokens, PoolAccessor[Token])


class Client(PoolManager):
    pass


# In a client's code: the typeid only, so the client states the type.
get_db: PoolAccessor[HostedItem[sqlite3.Connection]] = register_pool(Client, "db")
get_tokens: PoolAccessor[Token] = register_pool(Client, "tokens")
assert_type(register_pool(Client, "untyped"), PoolAccessor[Any])


def use(client: Client) -> None:
    db = assert_type(get_db(client), PoolProxy[HostedItem[sqlite3.Connection]])
    assert assert_type(db.call(one), int) == 1
    with db.lease() as conn:
        assert isinstance(assert_type(conn, HostedItem[sqlite3.Connection]), HostedItem)
        assert assert_type(conn.call(one), int) == 1
    tokens = assert_type(get_tokens(client), PoolProxy[Token])
    assert assert_type(tokens.acquire(), Token) == Token("t")  # released when the proxy goes
    assert assert_type(tokens.call(token_value), str) == "t"
    # the dynamic method still works, untyped
    assert client.db().call(one) == 1  # type: ignore[attr-defined]


def errors(client: Client, server: Server) -> None:
    """What must not type-check (never run)."""
    get_db(client).acquire().execute("SELECT 1")  # type: ignore[attr-defined]
    wrong: str = get_db(client).call(one)  # type: ignore[assignment]
    get_tokens(client).call(one)  # type: ignore[call-overload]
    get_db("client")  # type: ignore[arg-type]
    bad: PoolAccessor[sqlite3.Connection] = register_pool(  # type: ignore[assignment]
        Server, "other", connect
    )
    del wrong, bad


def main(workdir: str, start_method: str | None) -> None:
    os.chdir(workdir)
    authkey = os.urandom(32)
    with Server(authkey=authkey, ctx=multiprocessing.get_context(start_method)) as server:
        assert server_db(server).call(one) == 1
        client = Client(address=server.address, authkey=authkey)
        client.connect()
        use(client)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    print("ok")
