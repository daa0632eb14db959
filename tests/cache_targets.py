"""Child-process machinery and targets for the ProcessLocal tests.

Targets are module-level so that spawn and forkserver children can import them. A target returns
a picklable value; :class:`Child` runs it under a raw ``os.fork()`` or a multiprocessing start
method and hands back that value (or the child's error).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from helpers import LONG, run_threads, wait_until
from safepool.cache import ProcessLocal, per_process

METHODS = ("raw", "fork", "forkserver", "spawn")  # raw: os.fork() with no multiprocessing
FORKED = ("raw", "fork")  # the methods where a child inherits the parent's memory


def _send(
    conn: Any, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    try:
        payload = ("ok", target(*args, **kwargs))
    except BaseException as exc:
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    conn.send(payload)
    conn.close()


class Child:
    """One child process running ``target(*args, **kwargs)``; :meth:`result` returns what it
    returned (or raises AssertionError with the child's traceback)."""

    def __init__(self, method: str, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.method = method
        if method == "raw":
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:  # child: report, then leave at once (no atexit, no finalisers)
                os.close(rfd)
                code = 0
                try:
                    payload = pickle.dumps(("ok", target(*args, **kwargs)))
                except BaseException as exc:
                    code = 1
                    payload = pickle.dumps(("error", f"{exc!r}\n{traceback.format_exc()}"))
                try:
                    with os.fdopen(wfd, "wb") as w:
                        w.write(payload)
                finally:
                    os._exit(code)
            os.close(wfd)
            self.pid = pid
            self._rfd = rfd
        else:
            ctx = multiprocessing.get_context(method)
            self._reader, writer = ctx.Pipe(duplex=False)
            self._proc = ctx.Process(target=_send, args=(writer, target, args, kwargs))
            self._proc.start()
            writer.close()
            assert self._proc.pid is not None
            self.pid = self._proc.pid

    def result(self, timeout: float = LONG) -> Any:
        if self.method == "raw":
            kind, value = self._read_raw(timeout)
        else:
            try:
                if not self._reader.poll(timeout):
                    self._proc.kill()
                    raise TimeoutError(f"{self.method} child did not answer within {timeout}s")
                kind, value = self._reader.recv()
            finally:
                self._reader.close()
                self._proc.join(timeout)
        if kind == "error":
            raise AssertionError(f"{self.method} child failed: {value}")
        return value

    def _read_raw(self, timeout: float) -> tuple[str, Any]:
        chunks = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                ready, _, _ = select.select(
                    [self._rfd], [], [], max(0.0, deadline - time.monotonic())
                )
                if not ready:
                    raise TimeoutError(f"forked child {self.pid} did not finish within {timeout}s")
                chunk = os.read(self._rfd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except BaseException:
            os.kill(self.pid, signal.SIGKILL)
            raise
        finally:
            os.close(self._rfd)
            os.waitpid(self.pid, 0)
        result: tuple[str, Any] = pickle.loads(b"".join(chunks))
        return result


# -- items that record what happens to them ----------------------------------------------------


class Item:
    """A client stand-in: knows the process that made it, and whether (and where) it was closed."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.closed_in: int | None = None

    def close(self) -> None:
        if self.closed_in is not None:
            raise AssertionError("closed twice")
        self.closed_in = os.getpid()


def identity(cache: ProcessLocal[Any]) -> tuple[int, int, int]:
    """In a child: (pid, id of this process's client, pid recorded by the client)."""
    item = cache.get()
    return os.getpid(), id(item), item.pid


# -- HTTP ---------------------------------------------------------------------------------------


def http_requests(
    cache: ProcessLocal[Any], url: str, who: str, count: int, *, verify: str | bool, clear: bool
) -> tuple[int, list[int]]:
    """``count`` GETs through this process's session: (mismatched answers, source ports seen)."""
    mismatched = 0
    ports = []
    for i in range(count):
        request_id = f"{who}-{i}"
        answer = cache.get().get(url, params={"id": request_id}, verify=verify, timeout=LONG)
        answer.raise_for_status()
        echoed, port = answer.text.split()
        mismatched += echoed != request_id
        ports.append(int(port))
    if clear:
        cache.clear()  # closes this process's session only
    return mismatched, sorted(set(ports))


def naive_request(session: Any, url: str, who: str, verify: str | bool) -> int:
    """In a forked child: one GET through the *inherited* session object (the seed-002 bug)."""
    answer = session.get(url, params={"id": who}, verify=verify, timeout=LONG)
    return int(answer.text.split()[1])


# -- databases ----------------------------------------------------------------------------------


def pg_child(cache: ProcessLocal[Any]) -> tuple[int, int, bool]:
    """Use this process's psycopg connection, clear it, collect garbage; report."""
    conn = cache.get()
    backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    closed = cache.clear()
    del conn
    gc.collect()  # no finaliser may close the parent's connection
    return int(backend), closed, cache.built


def redis_child(cache: ProcessLocal[Any]) -> tuple[int, int]:
    """Use this process's redis client, clear it (with the cache's close hook), collect."""
    client = cache.get()
    client_id = client.client_id()
    client.set(f"safepool-child-{os.getpid()}", "1", ex=60)
    closed = cache.clear()
    del client
    gc.collect()
    return int(client_id), closed


def shutdown_redis(client: Any) -> None:
    """A close hook that ends the TCP connection for *every* process sharing the socket (as a
    ``socket.shutdown()`` does), unlike redis-py's own pid-aware ``close()``."""
    conn = client.connection
    if conn is not None and conn._sock is not None:
        conn._sock.shutdown(socket.SHUT_RDWR)
    client.close()


def sqlite_child(cache: ProcessLocal[Any], threads: int) -> tuple[int, list[int], int]:
    """Per-thread sqlite3 connections in ``threads`` threads; each inserts one row."""
    alive = threading.Barrier(threads)

    def work(i: int) -> int:
        conn = cache.get()
        assert cache.get() is conn
        conn.execute("INSERT INTO rows (who) VALUES (?)", (f"{os.getpid()}-{i}",))
        conn.commit()
        alive.wait(LONG)  # all connections exist at once, so their ids are distinct
        return id(conn)

    ids = run_threads(threads, work)
    return os.getpid(), ids, len(set(ids))


def engine_child(cache: ProcessLocal[Any], query: str | None) -> tuple[bool, Any]:
    """This process's SQLAlchemy engine: (whether it is the inherited object, the query's result
    or, with no query, the id of the DBAPI connection it used)."""
    import sqlalchemy

    engine = cache.get()
    with engine.connect() as conn:
        if query is None:
            value = id(conn.connection.dbapi_connection)
        else:
            value = conn.execute(sqlalchemy.text(query)).scalar()
    return engine is INHERITED.get("engine"), value


def session_child(cache: ProcessLocal[Any], query: str) -> tuple[bool, Any]:
    """After the child's first get(), a sessionmaker bound in the parent is safe to use."""
    import sqlalchemy

    engine = cache.get()
    with INHERITED["sessionmaker"]() as session:
        value = session.execute(sqlalchemy.text(query)).scalar()
    return engine is INHERITED.get("engine"), value


INHERITED: dict[str, Any] = {}  # objects a test sets before forking, to compare in the child


def reuse_engine(engine: Any) -> Any:
    """after_fork for SQLAlchemy: keep the Engine, drop its parent's pool without closing it."""
    engine.dispose(close=False)
    return engine


# -- racing threads -----------------------------------------------------------------------------


class _Race:
    threads = 8
    active = False
    entered: list[int] = []  # noqa: RUF012 - module state for one child at a time
    calls: dict[int, int] = {}  # noqa: RUF012 - pid -> factory calls in that process


def race_factory() -> Item:
    """Counts its calls per process; in a race, waits until every thread has entered get()."""
    _Race.calls[os.getpid()] = _Race.calls.get(os.getpid(), 0) + 1
    if _Race.active:
        wait_until(lambda: len(_Race.entered) >= _Race.threads, LONG, "all threads in get()")
    return Item()


race_cache: ProcessLocal[Item] = ProcessLocal(race_factory, name="race")


@per_process
def race_item() -> Item:
    """A module-level decorated cache: spawn children import their own."""
    return race_factory()


def race(cache: ProcessLocal[Any], threads: int = 8) -> tuple[int, int, bool]:
    """``threads`` threads call ``cache.get()`` at once: (factory calls in this process,
    distinct clients they got, whether all were made in this process)."""
    _Race.threads, _Race.entered, _Race.active = threads, [], True
    before = _Race.calls.get(os.getpid(), 0)
    together = threading.Barrier(threads)

    def call(i: int) -> tuple[int, int]:
        _Race.entered.append(i)
        item = cache.get()
        together.wait(LONG)  # every client is alive at once, so distinct ids = distinct clients
        return id(item), item.pid

    try:
        got = run_threads(threads, call)
    finally:
        _Race.active = False
    calls = _Race.calls.get(os.getpid(), 0) - before
    return calls, len({i for i, _ in got}), all(pid == os.getpid() for _, pid in got)


def blocked_get(cache: ProcessLocal[Any], started: threading.Event) -> Any:
    """Used in the parent: a thread that calls get() and sits in the factory."""
    started.set()
    return cache.get()
