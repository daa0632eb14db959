"""The manager server safepool runs: the stdlib ``Server``, with safe defaults.

Differences from :class:`multiprocessing.managers.Server`:

* It never sends a copy of a hosted object: ``#GETVALUE`` (what ``proxy._getvalue()`` and
  ``copy.deepcopy(proxy)`` ask for) is refused whatever ``exposed`` says, and ``debug_info`` (which
  sends the repr of every hosted object) is not served.
* Only names listed in a registered type's ``exposed`` can be called; a refused name comes back to
  the client as an ``AttributeError`` (not a bare ``RemoteError`` carrying a traceback string).
* Exceptions keep their type across the boundary: a ``ValueError`` raised while creating a
  shared object arrives as that ``ValueError``, and an exception that cannot be pickled arrives as
  a :class:`~safepool.errors.SafePoolError` that says so.
* Clients that connect and do not authenticate are dropped after ``handshake_timeout`` seconds
  (the stdlib waits forever, one pinned thread per silent connection).
* Each client process holds a *session* (:mod:`safepool._sessions`): leases are bound to it and
  return to their pools when the process dies.
* Replies are pickled with the plain :mod:`pickle` module, not multiprocessing's pickler. That
  one *duplicates the file descriptor* of any socket or connection in a reply into the client (a
  registered method returning a socket silently shares it); plain pickle refuses them, and the
  client gets an error instead. It is also ~6x cheaper per message.

The request loop (``serve_client``) is the stdlib's protocol, written out here so that the checks
above hold for every call; it is the hot path of every cross-process lease.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError, connection
from multiprocessing.managers import Server, Token
from typing import Any

from . import _sessions
from ._stdlib import public_methods
from ._wire import MessageReader
from .errors import SafePoolError

__all__ = ["SafeServer"]

logger = logging.getLogger(__name__)


def _describe_unpicklable(exc: BaseException, reason: BaseException) -> SafePoolError:
    return SafePoolError(
        f"the server raised {type(exc).__name__}: {exc} (it could not be sent as is: "
        f"{type(reason).__name__}: {reason})"
    )


class SafeServer(Server):
    """A manager server that refuses copies of hosted objects and keeps error types."""

    # Set by Server.__init__ / serve_forever (stdlib internals, see safepool._stdlib).
    authkey: bytes
    registry: dict[str, Any]
    mutex: threading.Lock
    stop_event: threading.Event
    id_to_refcount: dict[str, int]
    id_to_local_proxy_obj: dict[str, Any]

    public = [  # noqa: RUF012 - the stdlib declares it as a list
        "shutdown",
        "create",
        "accept_connection",
        "open_session",
        "get_methods",
        "number_of_objects",
        "dummy",
        "incref",
        "decref",
    ]
    # Requests that reply themselves and then keep the connection.
    _LONG_LIVED = frozenset({"accept_connection", "open_session"})

    #: Seconds a new connection has to authenticate and make its request.
    handshake_timeout: float = 5.0

    def _handle_request(self, c: Any) -> None:
        """Authenticate one new connection and run the one server-level request it makes."""
        try:
            with _HandshakeDeadline(c, self.handshake_timeout) as guarded:
                # The stdlib functions only call send_bytes/recv_bytes on what they are given.
                conn: Any = guarded
                connection.deliver_challenge(conn, self.authkey)
                connection.answer_challenge(conn, self.authkey)
                request = pickle.loads(guarded.recv_bytes())
        except _HandshakeTimeout:
            logger.warning(
                "safepool server: dropped a connection that did not authenticate within %ss",
                self.handshake_timeout,
            )
            return
        except (AuthenticationError, EOFError, OSError) as exc:
            logger.info("safepool server: refused a connection: %s", exc)
            return
        try:
            _, funcname, args, kwds = request
            if funcname not in self.public:
                raise AttributeError(f"{funcname!r} is not a request this server serves")
            func = getattr(self, funcname)
        except Exception as exc:
            msg: tuple[str, Any] = ("#ERROR", exc)
        else:
            if funcname in self._LONG_LIVED:
                func(c, *args, **kwds)
                return
            try:
                msg = ("#RETURN", func(c, *args, **kwds))
            except Exception as exc:
                msg = ("#ERROR", exc)
        self._send(c, msg)

    @staticmethod
    def _send(c: Any, msg: tuple[str, Any]) -> bool:
        """Send a reply with plain pickle; one that cannot be pickled becomes a SafePoolError."""
        try:
            data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
        except Exception as reason:
            kind, payload = msg
            exc = payload if kind == "#ERROR" else ValueError(f"a {type(payload).__name__}")
            data = pickle.dumps(("#ERROR", _describe_unpicklable(exc, reason)))
        try:
            c.send_bytes(data)
        except (EOFError, OSError):
            return False  # the client is gone
        return True

    def serve_client(self, conn: Any) -> None:
        """Serve the method calls of one client connection (one thread of one process)."""
        read = MessageReader(conn.fileno()).read
        loads = pickle.loads
        id_to_obj = self.id_to_obj
        stop = self.stop_event
        while not stop.is_set():
            try:
                request = read()
            except (EOFError, OSError):
                return
            try:
                ident, methodname, args, kwds = loads(request)
                try:
                    obj, exposed, gettypeid = id_to_obj[ident]
                except KeyError:
                    obj, exposed, gettypeid = self.id_to_local_proxy_obj[ident]
                if methodname in exposed:
                    result = getattr(obj, methodname)(*args, **kwds)
                elif methodname in ("__repr__", "__str__"):
                    result = repr(obj)
                else:
                    raise AttributeError(
                        f"{methodname!r} cannot be called on a shared {type(obj).__name__}: "
                        f"it is not one of its exposed methods {sorted(exposed)}"
                    )
                typeid = gettypeid and gettypeid.get(methodname)
                if typeid:  # a registered method that returns another shared object
                    rident, rexposed = self.create(conn, typeid, result)
                    msg: tuple[str, Any] = (
                        "#PROXY",
                        (rexposed, Token(typeid, self.address, rident)),
                    )
                else:
                    msg = ("#RETURN", result)
            except Exception as exc:
                msg = ("#ERROR", exc)
            if not self._send(conn, msg):
                return

    def create(
        self, c: Any, typeid: str, /, *args: Any, **kwds: Any
    ) -> tuple[str, tuple[str, ...]]:
        """Create a shared object. Unlike the stdlib, the callable runs outside the server's
        mutex: a pool whose factory is slow (min_size connections) blocks no other client."""
        with self.mutex:
            try:
                callable_, exposed, method_to_typeid, _ = self.registry[typeid]
            except KeyError:
                raise LookupError(
                    f"this server has no type {typeid!r} registered; registered: "
                    f"{sorted(self.registry)}"
                ) from None
        if callable_ is None:
            if kwds or len(args) != 1:
                raise LookupError(
                    f"{typeid!r} is registered in this server without a factory: register it "
                    f"with register_pool(Manager, {typeid!r}, factory=...) in the server"
                )
            obj = args[0]
        else:
            obj = callable_(*args, **kwds)
        if exposed is None:
            exposed = public_methods(obj)
        if method_to_typeid is not None:
            exposed = list(exposed) + list(method_to_typeid)
        ident = f"{id(obj):x}"
        with self.mutex:
            self.id_to_obj[ident] = (obj, set(exposed), method_to_typeid)
            self.id_to_refcount.setdefault(ident, 0)
        self.incref(c, ident)
        return ident, tuple(exposed)

    def accept_connection(self, c: Any, name: str, session: str | None = None) -> None:
        """Serve a client thread's method calls, as part of its process's ``session``."""
        threading.current_thread().name = name
        _sessions.serve_session(session)
        if self._send(c, ("#RETURN", None)):
            self.serve_client(c)

    def open_session(self, c: Any, pid: int, host: str, process: str) -> None:
        """Hold one client process's session until its connection closes, then reclaim the
        leases it still held."""
        info = _sessions.registry.open(pid, host, process)
        threading.current_thread().name = f"session {info.describe()}"
        _sessions.keep_alive(c)
        try:
            if self._send(c, ("#RETURN", info.id)):
                while not self.stop_event.is_set():
                    c.recv_bytes()  # the client never writes: this returns only at its end
        except (EOFError, OSError):
            pass
        finally:
            self._end_session(info.id)

    def _end_session(self, session_id: str) -> None:
        info, leases = _sessions.registry.close(session_id)
        for pool, token in leases:
            try:
                pool.reclaim(token, info)
            except Exception:
                logger.exception("safepool server: reclaiming a lease failed")


class _HandshakeTimeout(Exception):
    pass


class _HandshakeDeadline:
    """The connection as the handshake sees it, with a deadline on every read.

    Waiting for each message is bounded by ``poll()``, and every partial read by ``SO_RCVTIMEO``
    (so a client that sends a byte and stops cannot pin the thread either).
    """

    def __init__(self, conn: Any, timeout: float) -> None:
        self._conn = conn
        self._deadline = time.monotonic() + timeout
        self._timeout = timeout

    def __enter__(self) -> _HandshakeDeadline:
        self._set_receive_timeout(self._timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self._set_receive_timeout(0.0)

    def send_bytes(self, data: bytes) -> None:
        self._conn.send_bytes(data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if not self._conn.poll(max(0.0, self._deadline - time.monotonic())):
            raise _HandshakeTimeout
        try:
            return self._conn.recv_bytes(maxlength)  # type: ignore[no-any-return]
        except BlockingIOError:  # SO_RCVTIMEO expired in the middle of a message
            raise _HandshakeTimeout from None

    def _set_receive_timeout(self, seconds: float) -> None:
        try:
            sock = socket.socket(fileno=os.dup(self._conn.fileno()))
        except OSError:
            return
        try:
            whole = int(seconds)
            timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        except OSError:
            pass
        finally:
            sock.close()  # the duplicate only
