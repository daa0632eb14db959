"""The connections a manager server has accepted, and the cap on those not yet trusted.

Each accepted connection is served by one thread. A thread whose connection has ended waits a
while (:data:`IDLE_LINGER`) for the next new connection, at most :data:`MAX_IDLE` of them at
once: a client's new connection then starts its handshake without waiting for a thread to
start (~0.1 ms of a new client's first connect, on a loaded machine more).

A connection is *unauthenticated* from accept until it has authenticated and sent its request
(see :mod:`safepool._handshake`, which bounds that by one deadline). At most
``max_unauthenticated`` may be so at once: past it, a new connection is closed as soon as it is
accepted, so a flood of hostile connections costs the server a bounded number of threads and
file descriptors, while authenticated clients, whose connections are already open, keep being
served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

from . import _fork

__all__ = ["DEFAULT_MAX_UNAUTHENTICATED", "Connections", "RateLimitedLog", "check_cap"]

DEFAULT_MAX_UNAUTHENTICATED = 64

#: Threads that may wait for a new connection at once, and for how long (seconds) each does.
MAX_IDLE = 4
IDLE_LINGER = 10.0

logger = logging.getLogger(__name__)


def check_cap(value: Any) -> int:
    """``max_unauthenticated`` validated: an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"max_unauthenticated must be an int >= 1 (connections allowed in their handshake "
            f"at once), got {value!r}"
        )
    return value


class Connections:
    """The open connections of one server, by file descriptor, with the thread serving each."""

    def __init__(self) -> None:
        # _lock guards everything below. Invariants: _unauthenticated <= set(_threads); an fd is
        # in _threads from accept until just before its connection is closed, so close_all()
        # never touches an fd that was closed (and perhaps reused); once _closed, nothing is
        # admitted. Lock order: a server's _stop_lock, then this.
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread | None] = {}
        self._conns: dict[int, Any] = {}
        self._unauthenticated: set[int] = set()
        self._idle: list[_Handoff] = []  # threads waiting for a new connection, newest last
        self._closed = False
        self.admitted = 0  # connections served so far (a count for tests and benchmarks)

    def admit(self, sock: socket.socket, cap: int, serve: Callable[[Any], None]) -> Any | None:
        """Serve the new connection ``sock`` in a thread of its own; None if it was closed
        instead (the cap is reached, the server is closing, or no thread can be started)."""
        fd = sock.fileno()
        with self._lock:
            refused = self._closed or len(self._unauthenticated) >= cap
            if not refused:
                self.admitted += 1
                self._threads[fd] = None
                self._unauthenticated.add(fd)
        if refused:
            sock.close()
            return None
        conn = connection.Connection(sock.detach())
        with self._lock:
            self._conns[fd] = conn
            idle = self._idle.pop() if self._idle else None
            if idle is not None:  # handed over under the lock (see _next)
                idle.conn = conn
                self._threads[fd] = idle.thread
        if idle is not None:
            idle.event.set()
            return conn
        thread = threading.Thread(target=self._work, args=(conn, serve), name=_NAME, daemon=True)
        with self._lock:
            self._threads[fd] = thread
        try:
            thread.start()
        except RuntimeError as exc:  # can't start new thread: out of memory or of threads
            logger.warning("safepool server: closed a new connection: %s", exc)
            self.ended(conn)
            return None
        return conn

    def _work(self, conn: Any, serve: Callable[[Any], None]) -> None:
        """A serving thread: ``conn``, then the new connections handed to it, until none is."""
        while conn is not None:
            serve(conn)
            conn = self._next()

    def _next(self) -> Any:
        """Wait up to IDLE_LINGER for a new connection (None: end this thread)."""
        thread = threading.current_thread()
        thread.name = _NAME  # the last connection's request may have renamed it
        handoff = _Handoff(thread)
        with self._lock:
            if self._closed or len(self._idle) >= MAX_IDLE:
                return None
            self._idle.append(handoff)
        handoff.event.wait(IDLE_LINGER)
        with self._lock:
            if handoff in self._idle:  # nothing came
                self._idle.remove(handoff)
                return None
        return handoff.conn  # set under the lock by admit(); None if closing

    def authenticated(self, conn: Any) -> None:
        """``conn`` has finished its handshake (it may have failed): it no longer counts."""
        with self._lock:
            self._unauthenticated.discard(conn.fileno())

    def ended(self, conn: Any) -> None:
        """Forget ``conn``, then close it (its serving thread ends)."""
        with self._lock:
            fd = conn.fileno()
            self._threads.pop(fd, None)
            self._conns.pop(fd, None)
            self._unauthenticated.discard(fd)
        conn.close()

    def counts(self) -> tuple[int, int]:
        """(open connections, unauthenticated connections)."""
        with self._lock:
            return len(self._threads), len(self._unauthenticated)

    def close_all(self, deadline: float) -> None:
        """Admit no more; end every connection (its thread sees end-of-file) and join the
        threads serving them until ``deadline`` (``time.monotonic()``)."""
        with self._lock:
            self._closed = True
            for fd in self._threads:
                _shutdown(fd)
            threads = [t for t in self._threads.values() if t is not None]
            idle, self._idle = self._idle, []
        for handoff in idle:  # no connection: the thread ends
            handoff.event.set()
            threads.append(handoff.thread)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))

    def after_fork_in_child(self) -> None:
        """In a forked child: close this process's copies of the server's connections (a
        child that held them would keep clients from seeing the server end), never using the
        objects again (see safepool._fork); admit nothing."""
        for fd, conn in self._conns.items():
            with contextlib.suppress(OSError):
                os.close(fd)
            _fork.abandon(conn)  # its finaliser must not close the number again
        self._lock = threading.Lock()
        self._threads, self._conns, self._unauthenticated = {}, {}, set()
        self._idle = []  # their threads did not survive the fork
        self._closed = True


_NAME = "safepool handshake"


class _Handoff:
    """An idle serving thread, and the connection handed to it."""

    __slots__ = ("conn", "event", "thread")

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.event = threading.Event()
        self.conn: Any = None


def _shutdown(fd: int) -> None:
    """Shut a connected socket down without closing its descriptor (its owner closes it)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()


class RateLimitedLog:
    """A warning at most once per ``interval`` seconds; the next one says how many were not
    logged (a flood of hostile connections must not flood the log too)."""

    def __init__(self, log: logging.Logger, interval: float = 10.0) -> None:
        self._log = log
        self._interval = interval
        self._lock = threading.Lock()  # guards _next and _skipped
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def log(self, level: int, msg: str, *args: Any) -> None:
        if not self._log.isEnabledFor(level):
            return
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return
            skipped, self._skipped = self._skipped, 0
            self._next = now + self._interval
        if skipped:
            msg += " (and %d more like it in the %gs before, not logged)"
            args += (skipped, self._interval)
        self._log.log(level, msg, *args)
