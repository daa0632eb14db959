"""Process-bound leases: a lease belongs to the process that took it, and comes back when it dies.

Each client process opens one *session* connection to a server and never writes to it. Every
other connection the process makes to that server (one per thread, for method calls) names the
session when it is accepted, and the server records each lease under its session. When the
process dies (SIGKILL, ``os._exit``, a crash), the operating system closes the session socket;
the server sees end-of-file and returns the session's leases to their pools at once.

Why not per connection: a stdlib proxy's connection is per *thread*, and a thread that ends
closes it while its process still holds leases. Why the child closes its copy after ``fork()``:
an inherited descriptor would keep the parent's session open after the parent died. Closing a
socket descriptor sends nothing while another descriptor (the parent's) still refers to it.

The server half (:class:`SessionRegistry`) lives in the server process; the client half
(:func:`session_for`) in every client process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from multiprocessing import connection, current_process
from typing import Any

from . import _fork

__all__ = ["SessionInfo", "SessionRegistry", "current_session", "registry", "session_for"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SessionInfo:
    """Who holds a session: one client process."""

    id: str
    pid: int
    host: str
    process: str
    since: float  # wall-clock time the session opened

    def describe(self) -> str:
        opened = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} ({self.process}) on {self.host}, connected since {opened}"


# -- server side -------------------------------------------------------------------------------


class _Session:
    __slots__ = ("alive", "info", "leases")

    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.alive = True
        self.leases: dict[tuple[int, int], tuple[Any, int]] = {}  # (id(pool), token) -> ...


class SessionRegistry:
    """The server's sessions, and the leases held under each (one instance per server)."""

    # _lock guards _sessions and every _Session's alive/leases.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}

    def open(self, pid: int, host: str, process: str) -> SessionInfo:
        info = SessionInfo(os.urandom(12).hex(), int(pid), str(host), str(process), time.time())
        with self._lock:
            self._sessions[info.id] = _Session(info)
        return info

    def info(self, session_id: str | None) -> SessionInfo | None:
        with self._lock:
            session = self._sessions.get(session_id) if session_id else None
            return session.info if session else None

    def add_lease(self, session_id: str, pool: Any, token: int) -> bool:
        """Record a lease; False if the session has ended (the caller must undo the lease)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or not session.alive:
                return False
            session.leases[(id(pool), token)] = (pool, token)
            return True

    def remove_lease(self, session_id: str, pool: Any, token: int) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.leases.pop((id(pool), token), None)

    def close(self, session_id: str) -> tuple[SessionInfo | None, list[tuple[Any, int]]]:
        """End a session; return its info and the leases it still held, to reclaim."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is None:
                return None, []
            session.alive = False
            leases = list(session.leases.values())
            session.leases.clear()
            return session.info, leases


registry = SessionRegistry()

# The session of the client connection this server thread serves (set when it is accepted).
_served = threading.local()


def serve_session(session_id: str | None) -> None:
    _served.session = session_id


def current_session() -> str | None:
    return getattr(_served, "session", None)


def keep_alive(conn: Any) -> None:
    """Notice a vanished remote host (no FIN ever comes) within ~30 s on a TCP session."""
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except OSError:
        return
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
                option = getattr(socket, name, None)
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass
    finally:
        sock.close()  # the duplicate only


# -- client side -------------------------------------------------------------------------------


class _ClientSessions:
    """This process's session with each server: address -> (connection, session id)."""

    # _lock guards _open. Connections are kept only to be closed by the OS when we die.
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[Any, tuple[Any, str | None]] = {}

    def session_for(self, address: Any, authkey: bytes) -> str | None:
        """This process's session id with the server at ``address`` (opened on first use);
        None if that server does not offer sessions (not a safepool server)."""
        with self._lock:
            if address in self._open:
                held, session = self._open[address]
                if held is None or not held.poll(0):  # readable means closed: server restarted
                    return session
                held.close()
                del self._open[address]
            conn: Any = connection.Client(address, authkey=authkey)
            try:
                name = _process_name()
                conn.send((None, "open_session", (os.getpid(), socket.gethostname(), name), {}))
                kind, result = conn.recv()
            except BaseException:
                conn.close()
                raise
            if kind != "#RETURN":  # a stdlib server: no sessions, leases not process-bound
                conn.close()
                conn, result = None, None
            self._open[address] = (conn, result)
            return result  # type: ignore[no-any-return]

    def _after_fork_in_child(self) -> None:
        # Close our copies of the parent's session sockets (this sends nothing: the parent's
        # descriptors keep the sockets open), so the parent's death is seen even while we live.
        for conn, _ in self._open.values():
            if conn is not None:
                with contextlib.suppress(OSError):
                    os.close(conn.fileno())
                _fork.abandon(conn)  # its handle is closed; never let its finaliser close again
        self._lock = threading.Lock()
        self._open = {}


def _process_name() -> str:
    return current_process().name


_client_sessions = _ClientSessions()
_fork.register(_client_sessions)
session_for = _client_sessions.session_for
