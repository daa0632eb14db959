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
* A new connection has ``handshake_timeout`` seconds from accept, in all, to authenticate and
  make its request (:mod:`safepool._handshake`; the stdlib waits forever, one pinned thread per
  silent connection), and at most ``max_unauthenticated`` may be that far at once
  (:mod:`safepool._connections`); past it, new ones are closed at once. Out of file descriptors,
  the accepter backs off instead of spinning. The listener (:mod:`safepool._transport`) has a
  backlog of 1024 and sets ``TCP_NODELAY``.
* ``close()`` stops it from any thread: accepter, pools, connections, their threads.
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

import contextlib
import errno
import logging
import os
import pickle
import select
import socket
import threading
import time
from multiprocessing import AuthenticationError, process
from multiprocessing.managers import Server, Token
from typing import Any

from . import _admin_server, _fork, _hosted, _sessions
from ._connections import DEFAULT_MAX_UNAUTHENTICATED, Connections, RateLimitedLog
from ._handshake import HandshakeTimeout, authenticate
from ._protocol import (
    CHANNEL_REQUESTS,
    ERROR,
    PROXY,
    RETURN,
    SERVER_REQUESTS,
    UNPROBED,
    MessageReader,
    aborted_request,
)
from ._served import ServerChannel, current_channel, serve_channel, watcher
from ._signals import start_daemon
from ._starter import starter_gone
from ._stdlib import public_methods
from ._transport import Listener
from .errors import SafePoolError, TaskAborted

__all__ = ["SafeServer"]

logger = logging.getLogger(__name__)

# accept() errors that mean "out of a resource": retrying at once would spin on the same
# pending connection, so the accepter backs off.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_exhausted_log = RateLimitedLog(logger)
_capped_log = RateLimitedLog(logger)
_timeout_log = RateLimitedLog(logger)
_refused_log = RateLimitedLog(logger)


def _describe_unpicklable(exc: BaseException, reason: BaseException) -> SafePoolError:
    return SafePoolError(
        f"the server raised {type(exc).__name__}: {exc} (it could not be sent as is: "
        f"{type(reason).__name__}: {reason})"
    )


def _unpickling_error(exc: BaseException) -> TypeError:
    """The error a client gets when the server cannot unpickle its request."""
    return TypeError(
        f"the server could not unpickle the request: {type(exc).__name__}: {exc}. Everything "
        "sent to the server (a factory, a hook, a function, an argument) must be importable "
        "there by module and name: define it at module level in a module the server can import, "
        "not as a lambda or closure, nor under `if __name__ == '__main__':` (a server started "
        "with spawn or forkserver does not run that block)"
    )


def _aborted(exc: BaseException, what: str) -> TaskAborted:
    """A BaseException raised by code the server ran for a client, as an error for the client:
    it must neither end the serving thread (the client would see a dead server) nor reach the
    client as itself (a SystemExit would end the client)."""
    return TaskAborted(
        f"{what} raised {type(exc).__name__}({exc}) in the server; the server keeps serving",
        exc_type=type(exc).__qualname__,
        exc_message=str(exc),
    )


class _Creation:
    """A pool a ``create_for`` on a channel made for the client's session, until the client
    takes the reply (it is the channel's ``unacked``, as a lease grant is): a client cut short
    before it read the reply never holds a proxy to it, so its session's reference is dropped
    then, and the pool disposed of at once instead of when the process ends."""

    __slots__ = ("_server", "ident", "session")

    def __init__(self, server: SafeServer, ident: str, session: str) -> None:
        self._server = server
        self.ident = ident
        self.session = session

    def take_back(self) -> None:
        if _sessions.registry.remove_ref(self.session, self.ident):
            self._server._drop_reference(self.ident)


class SafeServer(Server):
    """A manager server that refuses copies of hosted objects and keeps error types."""

    # Set by Server.__init__ / serve_forever (stdlib internals, see safepool._stdlib).
    authkey: bytes
    address: Any
    registry: dict[str, Any]
    mutex: threading.Lock
    stop_event: threading.Event
    id_to_obj: dict[str, Any]
    id_to_refcount: dict[str, int]
    id_to_local_proxy_obj: dict[str, Any]

    public = list(SERVER_REQUESTS)  # noqa: RUF012 - the stdlib declares it as a list
    # Requests that reply themselves and then keep the connection. They raise only before
    # replying (bad arguments); the error is then sent as the reply.
    _LONG_LIVED = frozenset({"accept_connection", "open_session"})

    #: Seconds a new connection has, from accept, to authenticate and make its request.
    handshake_timeout: float = 5.0
    #: New connections that may be in their handshake at once; past it, new ones are closed.
    max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED

    def __init__(self, registry: dict[str, Any], address: Any, authkey: bytes, serializer: str):
        """The stdlib's ``Server.__init__``, with safepool's listener (backlog, NODELAY, IPv6,
        the address grammar). ``serializer`` is accepted and ignored: replies are plain pickle."""
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, got {type(authkey).__name__}")
        self.registry = registry
        self.authkey = process.AuthenticationString(authkey)  # type: ignore[attr-defined]
        self.listener = Listener(address)
        self.address = self.listener.address
        self.id_to_obj = {"0": (None, ())}
        self.id_to_refcount = {}
        self.id_to_local_proxy_obj = {}
        self.mutex = threading.Lock()
        self.stop_event = threading.Event()
        self._connections = Connections()
        self._accepter: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._stop_lock = threading.Lock()  # guards _closer; taken before Connections' lock
        self._closer: threading.Thread | None = None  # the thread that closes, once started
        self._close_lock = threading.Lock()  # held by a closer thread; taken after _stop_lock
        self._close_done = threading.Event()
        self._closed = False
        self._forked = False  # True in a child forked from the serving process
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """A forked child is not the server (its threads did not survive the fork): close its
        copies of the listening socket and of every connection, so that a stopped or dead server
        is seen as such by clients while the child lives on."""
        self._closed = self._forked = True
        self._stop_lock = threading.Lock()
        self.stop_event = threading.Event()
        self.stop_event.set()
        # Only descriptors still open in the parent: each is forgotten once closed there.
        self._connections.after_fork_in_child()
        self.listener.close_after_fork()
        self._close_wake_pipe()

    # -- life cycle -----------------------------------------------------------------------------

    def start_accepting(self) -> None:
        """Accept connections in a daemon thread of their own (returns at once)."""
        if self._accepter is not None or self._closed:
            raise RuntimeError("this server was started already")
        # (start_daemon: the connection threads it starts run the pools' factories and hooks,
        # and inherit its mask, the caller's, as would processes those start.)
        self._accepter = start_daemon(self._accept_loop, name=f"safepool accepter {self.address!r}")

    def serve_forever(self) -> None:
        """Serve until shut down (a ``shutdown`` request, SIGTERM made SystemExit, Ctrl+C); then
        close the pools this process hosts (their items, and the shared tables of fast-path
        pools, which would otherwise outlive the server)."""
        current_process = process.current_process()
        current_process._manager_server = self  # type: ignore[attr-defined] # as the stdlib
        try:
            self.start_accepting()
            while True:  # wake up for signals handed to other threads
                if self.stop_event.wait(0.2):
                    break
                if starter_gone():
                    logger.warning(
                        "safepool server %r: the process that started it is gone; shutting down",
                        self.address,
                    )
                    break
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.close()
            _hosted.close_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close this server's pools and every connection, and join the server's
        threads (each for what is left of ``timeout`` seconds). Idempotent, from any thread.

        The work runs in a thread of its own, which this call waits for: an exception raised in
        the waiting thread (Ctrl+C, a signal handler) cannot cut it short, and the next close()
        waits for the same work to finish."""
        if self._forked:
            return  # a forked child's copy serves nothing and owns nothing (see below)
        with self._stop_lock:
            self._closed = True
            closer = self._closer
            if closer is None or not (closer.is_alive() or self._close_done.is_set()):
                # Assigned once started: a start cut short leaves no unstarted thread behind,
                # at worst a second closer, which waits for the first and finds it all done.
                # (start_daemon: a handler raising inside Thread.start() cannot leave the
                # thread half-registered; the pools' close hooks run with this thread's mask.)
                closer = start_daemon(self._close_now, timeout, name="safepool server stop")
                self._closer = closer
        while True:  # a bounded wait, so signals handed to other threads are seen
            closer.join(0.2)
            if not closer.is_alive():
                break

    def _close_now(self, timeout: float) -> None:
        with self._close_lock:  # each step may run again: a second closer only re-checks
            self._close_steps(time.monotonic() + timeout)
            self._close_done.set()

    def _close_steps(self, deadline: float) -> None:
        self.stop_event.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        accepter = self._accepter
        if accepter is not None:
            accepter.join(max(0.0, deadline - time.monotonic()))
        self.listener.close()
        _hosted.close_pools(self._hosted_pools())
        with self.mutex:  # and let what they held go (a stopped server may live on)
            self.id_to_obj = {"0": (None, ())}
            self.id_to_refcount.clear()
            self.id_to_local_proxy_obj.clear()
        self._connections.close_all(deadline)
        self._close_wake_pipe()

    def _close_wake_pipe(self) -> None:
        fds, (self._wake_r, self._wake_w) = (self._wake_r, self._wake_w), (-1, -1)
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _hosted_pools(self) -> list[Any]:
        with self.mutex:
            objects = [entry[0] for entry in self.id_to_obj.values()]
            named = [
                entry[0].typeid
                for entry in self.registry.values()
                if isinstance(entry[0], _hosted.NamedPoolFactory)
            ]
        return objects + _hosted.forget_named(named)

    # -- accepting --------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        """Accept until closed. Out of file descriptors (or buffers, or memory), back off
        10 ms, doubling to 0.5 s, instead of spinning on the connection the kernel holds."""
        poller = select.poll()
        poller.register(self.listener.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        backoff = 0.0
        while not self.stop_event.is_set():
            poller.poll()
            if self.stop_event.is_set():
                return
            try:
                sock = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if self.stop_event.is_set():
                    return
                if exc.errno not in _EXHAUSTED:
                    logger.debug("safepool server: accept failed: %s", exc)
                    continue
                backoff = min(max(2 * backoff, 0.01), 0.5)
                _exhausted_log.warning(
                    "safepool server: cannot accept connections (%s); retrying in %.2fs",
                    exc,
                    backoff,
                )
                self.stop_event.wait(backoff)
                continue
            backoff = 0.0
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Start the handshake of a new connection, or close it at once past the cap."""
        conn = self._connections.admit(sock, self.max_unauthenticated, self.handle_request)
        if conn is None:
            _capped_log.warning(
                "safepool server: closed a new connection at once: %d connections are in their "
                "handshake already (max_unauthenticated=%d)",
                self.max_unauthenticated,
                self.max_unauthenticated,
            )

    def handle_request(self, c: Any) -> None:
        """The thread of one connection: its handshake, its request, its end."""
        try:
            self._handle_request(c)
        finally:
            self._connections.ended(c)

    def _handle_request(self, c: Any) -> None:
        """Authenticate one new connection and run the one server-level request it makes."""
        deadline = time.monotonic() + self.handshake_timeout
        try:
            data = authenticate(c, self.authkey, deadline)
        except HandshakeTimeout:
            _timeout_log.warning(
                "safepool server: dropped a connection that did not authenticate within %ss",
                self.handshake_timeout,
            )
            return
        except (AuthenticationError, EOFError, OSError) as exc:
            _refused_log.log(logging.INFO, "safepool server: refused a connection: %s", exc)
            return
        finally:
            self._connections.authenticated(c)
        msg = self._run_request(c, data)
        if msg is not None:
            self._send(c, msg)

    def _run_request(self, c: Any, data: bytes) -> tuple[str, Any] | None:
        """One server-level request: the reply to send, or None if the request replied itself
        and has served its connection to the end."""
        try:
            request = pickle.loads(data)
        except Exception as exc:
            return (ERROR, _unpickling_error(exc))
        try:
            _, funcname, args, kwds = request
            if funcname not in self.public:
                raise AttributeError(f"{funcname!r} is not a request this server serves")
            func = getattr(self, funcname)
            result = func(c, *args, **kwds)
        except Exception as exc:
            return (ERROR, exc)
        except BaseException as exc:
            return (ERROR, _aborted(exc, "the request"))
        return None if funcname in self._LONG_LIVED else (RETURN, result)

    @staticmethod
    def _send(c: Any, msg: tuple[str, Any]) -> bool:
        """Send a reply with plain pickle; one that cannot be pickled becomes a SafePoolError."""
        try:
            data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
        except Exception as reason:
            kind, payload = msg
            exc = payload if kind == ERROR else ValueError(f"a {type(payload).__name__}")
            data = pickle.dumps((ERROR, _describe_unpicklable(exc, reason)))
        try:
            c.send_bytes(data)
        except (EOFError, OSError):
            return False  # the client is gone
        return True

    def _serve(self, conn: Any, channel: ServerChannel) -> None:
        """Serve the method calls of one client connection (one thread of one process).

        A request also tells that the previous reply was taken; an ABORT that names the last
        request read, or a reply that cannot be sent, gives back a lease the last reply granted
        (see safepool._protocol).
        """
        read = MessageReader(conn.fileno()).read
        stop = self.stop_event
        number = 0  # requests read
        while not stop.is_set():
            try:
                request = read()
            except (EOFError, OSError):
                return
            aborted = aborted_request(request)
            if aborted is not None:
                if aborted in (number, -1):  # -1: an older client's bare ABORT
                    channel.take_back_unacked()
                return
            number += 1
            channel.unacked = None
            if not self._send(conn, self._dispatch(conn, request)):
                channel.take_back_unacked()
                return

    def _dispatch(self, conn: Any, request: bytes) -> tuple[str, Any]:
        """The reply to one request on a client's channel: a method call on a shared object,
        or (ident None) one of the server-level CHANNEL_REQUESTS."""
        try:
            ident, methodname, args, kwds = pickle.loads(request)
        except Exception as exc:
            return (ERROR, _unpickling_error(exc))
        try:
            if ident is None:
                if methodname not in CHANNEL_REQUESTS:
                    raise AttributeError(
                        f"{methodname!r} is not a request this server serves on an open connection"
                    )
                return (RETURN, getattr(self, methodname)(conn, *args, **kwds))
            try:
                obj, exposed, gettypeid = self.id_to_obj[ident]
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
                return (PROXY, (rexposed, Token(typeid, self.address, rident)))
            return (RETURN, result)
        except Exception as exc:
            return (ERROR, exc)
        except BaseException as exc:
            return (ERROR, _aborted(exc, f"{methodname}()"))

    def serve_client(self, conn: Any) -> None:  # the stdlib's entry point, for completeness
        self._serve(conn, ServerChannel(conn.fileno(), None))

    def create(
        self, c: Any, typeid: str, /, *args: Any, **kwds: Any
    ) -> tuple[str, tuple[str, ...]]:
        """Create a shared object. Unlike the stdlib, the callable runs outside the server's
        mutex: a pool whose factory is slow (min_size connections) blocks no other client."""
        with self.mutex:
            try:
                callable_, exposed, method_to_typeid, _ = self.registry[typeid]
            except (KeyError, TypeError):
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
        super().incref(c, ident)
        return ident, tuple(exposed)

    def create_for(
        self, c: Any, session: str, typeid: str, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> tuple[str, tuple[str, ...]]:
        """Create a shared object whose first reference belongs to ``session``: it is dropped
        when the creating process's proxy goes, or when that process ends."""
        if (
            not isinstance(session, str)
            or not isinstance(args, tuple)
            or not isinstance(kwds, dict)
        ):
            raise TypeError("create_for(session: str, typeid: str, args: tuple, kwds: dict)")
        ident, exposed = self.create(c, typeid, *args, **kwds)
        if not _sessions.registry.add_ref(session, ident):
            self._drop_reference(ident)
            raise SafePoolError("this client's session with the server has ended; retry")
        channel = current_channel()
        if channel is not None:  # on a channel: given back if the client never takes the reply
            channel.unacked = _Creation(self, ident, session)
        return ident, exposed

    def create_probed(
        self, c: Any, session: str, typeid: str, args: tuple[Any, ...], kwds: dict[str, Any]
    ) -> tuple[str, tuple[str, ...], Any]:
        """``create_for``, and what the new object's ``fast_path()`` returns (None if it has no
        such method; :data:`~safepool._protocol.UNPROBED` if it raised): one request fewer."""
        ident, exposed = self.create_for(c, session, typeid, args, kwds)
        if "fast_path" not in exposed:
            return ident, exposed, None
        with self.mutex:
            entry = self.id_to_obj.get(ident)
        try:
            return ident, exposed, entry[0].fast_path()  # type: ignore[index]
        except Exception:  # the client asks again when it leases (and gets the error then)
            return ident, exposed, UNPROBED

    def incref(self, c: Any, ident: str, session: str | None = None) -> None:
        """One more reference to ``ident``; with a ``session``, it ends with that session."""
        super().incref(c, ident)
        if session is not None and not _sessions.registry.add_ref(session, ident):
            self._drop_reference(ident)
            raise SafePoolError("this client's session with the server has ended; retry")

    def decref(self, c: Any, ident: str, session: str | None = None) -> None:
        if session is not None and not _sessions.registry.remove_ref(session, ident):
            return  # dropped already, when the session ended
        super().decref(c, ident)

    def _drop_reference(self, ident: str) -> None:
        try:
            super().decref(None, ident)  # type: ignore[arg-type] # the stdlib ignores c
        except (KeyError, AssertionError):  # pragma: no cover - already gone
            logger.debug("safepool server: object %s was already disposed of", ident)

    def accept_connection(self, c: Any, name: str, session: str | None = None) -> None:
        """Serve a client thread's method calls, as part of its process's ``session``."""
        if not isinstance(name, str) or not (session is None or isinstance(session, str)):
            raise TypeError("accept_connection(name: str, session: str | None = None)")
        channel = ServerChannel(c.fileno(), session)
        if session is not None and not _sessions.registry.add_channel(channel):
            raise SafePoolError(
                "this client's session with the server has ended (or was never opened); retry"
            )
        threading.current_thread().name = name
        serve_channel(channel)
        try:
            if self._send(c, (RETURN, tuple(sorted(CHANNEL_REQUESTS)))):
                self._serve(c, channel)
        finally:
            serve_channel(None)  # this thread may serve another connection next
            watcher.unwatch(channel.fd)
            if session is not None:
                _sessions.registry.remove_channel(channel)

    def open_session(self, c: Any, pid: int, host: str, process: str) -> None:
        """Hold one client process's session until its connection closes, then reclaim what
        it still held: its leases, its waits, its references to hosted pools."""
        if not isinstance(pid, int) or not isinstance(host, str) or not isinstance(process, str):
            raise TypeError("open_session(pid: int, host: str, process: str)")
        info = _sessions.registry.open(pid, host, process)
        threading.current_thread().name = f"session {info.describe()}"
        _sessions.keep_alive(c)
        try:
            if self._send(c, (RETURN, info.id)):
                while True:
                    if self.stop_event.is_set():
                        break
                    c.recv_bytes()  # the client never writes: this returns only at its end
        except (EOFError, OSError):
            pass
        finally:
            self._end_session(info.id)

    def pools(self, c: Any) -> list[Any]:
        """Every hosted pool's stats and lease table (``python -m safepool inspect``)."""
        return _admin_server.pool_reports(self)

    def revoke_lease(self, c: Any, pool: str, lease_id: int, action: str = "close") -> Any:
        """Revoke a lease of a hosted pool (``python -m safepool revoke``)."""
        return _admin_server.revoke_lease(self, pool, lease_id, action)

    def _end_session(self, session_id: str) -> None:
        ended = _sessions.registry.close(session_id)
        if ended is None:
            return
        for channel in ended.channels:
            channel.client_gone()  # its waits end now: dead waiters never keep a place
        _hosted.reap_all()  # and what it held in the tables of fast-path pools
        for record in ended.leases:
            try:
                record.pool.reclaim(record, ended.info)
            except Exception:
                logger.exception("safepool server: reclaiming a lease failed")
        for ident, count in ended.refs.items():
            for _ in range(count):
                self._drop_reference(ident)
