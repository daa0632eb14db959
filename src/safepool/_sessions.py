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
import pickle
import select
import socket
import struct
import threading
import time
from multiprocessing import current_process
from typing import Any

from . import _fork, _handshake, _transport

__all__ = ["EndedSession", "SessionInfo", "SessionRegistry", "registry", "session_for"]

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
    __slots__ = ("channels", "info", "leases", "refs")

    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.leases: set[Any] = set()  # LeaseRecords held by this process
        self.channels: set[Any] = set()  # ServerChannels of its threads' connections
        self.refs: dict[str, int] = {}  # hosted object id -> references its proxies hold


@dataclasses.dataclass
class EndedSession:
    """What a session held when it ended: to reclaim, cancel and dereference."""

    info: SessionInfo
    leases: list[Any]
    channels: list[Any]
    refs: dict[str, int]


class SessionRegistry:
    """The server's sessions, and what each holds (one instance per server process).

    _lock guards _sessions and every _Session's contents. It is a leaf lock: nothing else is
    taken while it is held (see safepool._records for the lock order).
    """

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

    def exists(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def add_lease(self, record: Any) -> bool:
        """Record a lease under its session; False if the session has ended (the caller must
        give the item back)."""
        with self._lock:
            session = self._sessions.get(record.session)
            if session is None:
                return False
            session.leases.add(record)
            return True

    def remove_lease(self, record: Any) -> None:
        with self._lock:
            session = self._sessions.get(record.session)
            if session is not None:
                session.leases.discard(record)

    def add_channel(self, channel: Any) -> bool:
        with self._lock:
            session = self._sessions.get(channel.session)
            if session is None:
                return False
            session.channels.add(channel)
            return True

    def remove_channel(self, channel: Any) -> None:
        with self._lock:
            session = self._sessions.get(channel.session)
            if session is not None:
                session.channels.discard(channel)

    def add_ref(self, session_id: str, ident: str) -> bool:
        """One more reference to hosted object ``ident`` from the session's proxies."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            session.refs[ident] = session.refs.get(ident, 0) + 1
            return True

    def remove_ref(self, session_id: str, ident: str) -> bool:
        """One reference fewer; False if the session does not hold one (it ended, and its
        references were dropped with it)."""
        with self._lock:
            session = self._sessions.get(session_id)
            count = session.refs.get(ident, 0) if session is not None else 0
            if count <= 0:
                return False
            if count == 1:
                del session.refs[ident]  # type: ignore[union-attr]
            else:
                session.refs[ident] = count - 1  # type: ignore[union-attr]
            return True

    def close(self, session_id: str) -> EndedSession | None:
        """End a session; return what it still held, for the caller to reclaim."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            return None
        return EndedSession(
            session.info, list(session.leases), list(session.channels), dict(session.refs)
        )

    def sessions(self) -> list[SessionInfo]:
        with self._lock:
            return [session.info for session in self._sessions.values()]


registry = SessionRegistry()


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
                if held is None or not _readable(held):  # the server closed it: restarted
                    return session
                held.close()
                del self._open[address]
            conn: Any = _transport.open_connection(address)
            try:
                message = _open_session_request()  # made while the server starts its side
                _handshake.client_handshake(conn, authkey, message)
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


def _readable(conn: Any) -> bool:
    """``conn.poll(0)`` at a fraction of its cost (a selector object per call)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _open_session_request() -> bytes:
    """The ``open_session`` request, framed."""
    request: tuple[Any, ...] = (
        None,
        "open_session",
        (os.getpid(), socket.gethostname(), _process_name()),
        {},
    )
    message = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
    return _SHORT.pack(len(message)) + message


def _process_name() -> str:
    return current_process().name


_SHORT = struct.Struct("!i")  # a message's length prefix (multiprocessing.connection's)

_client_sessions = _ClientSessions()
_fork.register(_client_sessions)
session_for = _client_sessions.session_for
