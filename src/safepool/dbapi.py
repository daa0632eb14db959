"""DB-API 2.0 helpers to run *in the server* on a hosted connection.

A hosted connection never leaves the manager server, so a client sends a function to run on
it. These are the common ones, for any DB-API connection (sqlite3, psycopg, ...)::

    rows = pool.call(dbapi.fetchall, "SELECT id, who FROM events WHERE who = %s", ("me",))
    pool.call(dbapi.execute, "INSERT INTO events (who) VALUES (%s)", ("me",), commit=True)

    with pool.lease() as conn:                       # one connection: one transaction
        conn.call(dbapi.execute, "UPDATE ...", params)
        conn.call(dbapi.execute, "INSERT ...", params)
        conn.call(dbapi.commit)

Results are plain tuples and ints, so they cross the process boundary; the placeholder style
(``?`` for sqlite3, ``%s`` for psycopg) is the driver's.

And the pool's defaults for DB-API connections (see docs/guides/databases.md):

* :func:`rollback_if_in_transaction` is the default ``reset``: a connection released inside a
  transaction is rolled back, with a warning naming the pool, before anyone else gets it.
* :func:`check_connection` is a ready-made ``check``: a cheap round trip (``SELECT 1``).
* :func:`is_connection` is how the pool recognises a DB-API connection: an object whose class
  has ``cursor``, ``commit`` and ``rollback`` methods (PEP 249).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = [
    "check_connection",
    "commit",
    "execute",
    "executemany",
    "fetchall",
    "fetchone",
    "is_connection",
    "rollback",
    "rollback_if_in_transaction",
]

logger = logging.getLogger(__name__)


def execute(conn: Any, sql: str, params: Sequence[Any] = (), *, commit: bool = False) -> int:
    """Run one statement; return its rowcount. With ``commit=True``, commit afterwards."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        count = int(cur.rowcount)
    finally:
        cur.close()
    if commit:
        conn.commit()
    return count


def executemany(
    conn: Any, sql: str, seq_of_params: Iterable[Sequence[Any]], *, commit: bool = False
) -> int:
    """Run a statement for each parameter set; return the total rowcount reported."""
    cur = conn.cursor()
    try:
        cur.executemany(sql, list(seq_of_params))
        count = int(cur.rowcount)
    finally:
        cur.close()
    if commit:
        conn.commit()
    return count


def fetchall(conn: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run a query; return all rows as tuples."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return [tuple(row) for row in cur.fetchall()]
    finally:
        cur.close()


def fetchone(conn: Any, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    """Run a query; return the first row as a tuple, or None."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        row = cur.fetchone()
        return None if row is None else tuple(row)
    finally:
        cur.close()


def commit(conn: Any) -> None:
    conn.commit()


def rollback(conn: Any) -> None:
    conn.rollback()


# -- the pool's defaults for DB-API connections --------------------------------------------------

_kinds: dict[type, bool] = {}  # class -> is it a DB-API connection class (a cache: few classes)


def is_connection(obj: object) -> bool:
    """True if ``obj`` is a synchronous DB-API 2.0 connection: its class has ``cursor``,
    ``commit`` and ``rollback`` methods (sqlite3, psycopg, psycopg2, PyMySQL, ...)."""
    cls = type(obj)
    known = _kinds.get(cls)
    if known is None:
        methods = [getattr(cls, name, None) for name in ("cursor", "commit", "rollback")]
        known = all(callable(m) for m in methods) and not any(
            inspect.iscoroutinefunction(m) for m in methods
        )
        _kinds[cls] = known
    return known


def _is_server_connection(obj: object) -> bool:
    """A DB-API connection to a database server (every one but sqlite3's): recycled by default."""
    return is_connection(obj) and not isinstance(obj, sqlite3.Connection)


def _close_inherited_sockets(items: Iterable[object]) -> None:
    """In a forked child: close this process's copies of the sockets of the parent's unused
    server connections, found through their ``fileno()`` (psycopg, psycopg2). The connections
    themselves are never used or closed here (that would end them for the parent too): the
    caller abandons them, so nothing ever touches the numbers again. A child that kept the
    sockets would keep the server sessions of a parent that dies open for as long as it lives.
    """
    for item in items:
        if not _is_server_connection(item):
            continue
        fileno = getattr(item, "fileno", None)
        try:
            fd = fileno() if callable(fileno) else None
        except Exception:  # e.g. closed already: no socket
            continue
        if isinstance(fd, int) and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


# sqlite3's probe. SafeConnectionPool.release reads the attribute itself when its probe is this
# one (a plain attribute read costs half a call to the getter; sqlite3 is the default backend).
_SQLITE_PROBE: Callable[[Any], object] = operator.attrgetter("in_transaction")


def transaction_probe(conn: object) -> Callable[[Any], object]:
    """A fast test for connections of ``conn``'s class: true if one *may* be inside a
    transaction (the pool runs it on every release: C code where the driver allows)."""
    if isinstance(conn, sqlite3.Connection):
        return _SQLITE_PROBE
    if isinstance(getattr(getattr(conn, "pgconn", None), "transaction_status", None), int):
        return operator.attrgetter("pgconn.transaction_status")  # psycopg 3 (0 is idle)
    return _maybe_in_transaction


def _maybe_in_transaction(conn: Any) -> bool:
    return _in_transaction(conn) is not False


def _in_transaction(conn: Any) -> bool | None:
    """Whether ``conn`` is inside a transaction, or in any state but idle: sqlite3's
    ``in_transaction``; psycopg's ``transaction_status`` (psycopg2's ``info.transaction_status``
    too). None when the driver does not say."""
    if isinstance(conn, sqlite3.Connection):
        return conn.in_transaction
    pgconn = getattr(conn, "pgconn", None)
    holder = pgconn if pgconn is not None else getattr(conn, "info", None)
    status = getattr(holder, "transaction_status", None)
    if isinstance(status, int):
        return status != 0  # libpq's PQTRANS_IDLE
    return None


def rollback_if_in_transaction(conn: Any) -> None:
    """Roll ``conn`` back if it is inside a transaction (with a warning: someone released it
    without committing or rolling back). A connection whose driver cannot tell is always rolled
    back, quietly; an idle one is left alone (no round trip).

    This is the pool's default ``reset`` for DB-API connections (the pool's own warning names
    the pool). As a ``reset`` hook, it raising (a lost connection, a query still running) makes
    the pool close the connection instead of reusing it.
    """
    _rollback_returned(conn, None)


def _rollback_returned(conn: Any, pool: str | None) -> None:
    state = _in_transaction(conn)
    if state is False:
        return
    if state:
        logger.warning(
            "%srolling back a returned %s that was still inside a transaction (commit or roll "
            "back before releasing it%s)",
            "" if pool is None else f"pool {pool!r}: ",
            f"{type(conn).__module__}.{type(conn).__qualname__}",
            "" if pool is None else "; reset=None hands such connections on as they are",
        )
    conn.rollback()


def check_connection(conn: Any) -> None:
    """A ready-made ``check``: one cheap round trip (``SELECT 1``) that raises if ``conn`` is
    closed or its server is gone, so the pool replaces it before anyone gets it.

    Use it as ``SafeConnectionPool(factory=..., check=dbapi.check_connection)`` (it runs on every
    reuse of an idle connection: one round trip per acquire). It leaves no transaction open.
    """
    was_open = _in_transaction(conn)
    cur = conn.cursor()
    try:
        cur.execute("SELECT 1")
        cur.fetchall()
    finally:
        cur.close()
    if was_open is False and _in_transaction(conn):
        conn.rollback()  # the SELECT opened one (a driver not in autocommit mode)
