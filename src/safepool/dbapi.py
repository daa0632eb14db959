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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["commit", "execute", "executemany", "fetchall", "fetchone", "rollback"]


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
