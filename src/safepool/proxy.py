"""Client-side handles on a pool hosted in a manager server.

:class:`PoolProxy` is a typed proxy with an explicit ``_exposed_`` list and one method per call
(no AutoProxy). What the stdlib ``BaseProxy`` does not do, it does:

* Transport failures (the server died, or was shut down) raise
  :class:`~safepool.errors.ManagerUnavailable` at once, never hang, and never pass for an error
  the server raised (a remote ``PoolTimeout`` is a ``TimeoutError`` too, and stays a
  ``PoolTimeout``).
* Unpickling a proxy never fails. The stdlib connects while unpickling, so a proxy passed as a
  ``Pool`` task argument to a worker that does not know the manager's authkey kills the worker
  inside the pool's task loop, and ``map()`` hangs forever. Here the proxy is rebuilt with the
  authkey this process already knows for that address (inherited by fork, or learnt from a proxy
  passed through the initializer); failing that, the first call raises
  :class:`~safepool.errors.AuthkeyError` saying what to do.
* After a raw ``os.fork()`` the child drops the parent's connections to the server (sharing
  them would interleave two processes' requests on one socket) and takes its own reference on
  first use; leases the parent held are never released by the child.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError, current_process
from multiprocessing.managers import BaseProxy, Token
from typing import Any, Generic, TypeVar

from . import _fork, _sessions
from ._stdlib import RebuildProxy, base_proxy_incref, convert_to_error, dispatch
from ._wire import MessageReader
from .errors import AuthkeyError, LeaseError, ManagerUnavailable, SafePoolError
from .pool import Lease
from .stats import LeaseInfo, PoolStats

__all__ = ["HostedItem", "PoolProxy"]

T = TypeVar("T")

# Authkeys of the manager servers this process knows, by address. Filled when a manager starts
# or connects, and when a proxy arrives with its key (through an initializer, or inheritance);
# consulted when a proxy is unpickled without one (as task arguments always are).
_known_authkeys: dict[Any, bytes] = {}


def remember_authkey(address: Any, authkey: bytes) -> None:
    _known_authkeys[address] = bytes(authkey)


def _transport_error(proxy: PoolProxy[Any], exc: BaseException) -> ManagerUnavailable:
    return ManagerUnavailable(
        f"the manager server at {proxy._token.address!r} is unreachable "
        f"({type(exc).__name__}: {exc}); it died or was shut down"
    )


class PoolProxy(BaseProxy, Generic[T]):
    """A pool in a manager server, used from any process.

    ``acquire()`` returns a copy of the item for pools created with ``share="value"``, and a
    :class:`HostedItem` handle for ``share="hosted"`` pools (the default), whose items never leave
    the server. Either way, pass what you got to ``release()``, or use ``with pool.lease()``.
    """

    _exposed_ = (
        "acquire", "release", "call", "call_leased", "stats", "leases", "close", "describe",
    )  # fmt: skip

    # Set by BaseProxy.__init__ (stdlib internals, see safepool._stdlib).
    _token: Token
    _tls: Any
    _id: str
    _authkey: bytes
    _owned_by_manager: bool
    _Client: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._deferred_error: SafePoolError | None = None
        self._needs_incref = False
        self._reset_leases()
        super().__init__(*args, **kwargs)
        remember_authkey(self._token.address, self._authkey)
        _fork.register(self)

    # -- the pool API -------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> T:
        """Lease an item (a copy by value, or a :class:`HostedItem`); see the class docstring."""
        token, payload = self._callmethod("acquire", (timeout,))
        if payload is None:
            return HostedItem(self, token)  # type: ignore[return-value]
        item = pickle.loads(payload)
        with self._leases_lock:
            self._by_id.setdefault(id(item), (item, []))[1].append(token)
        return item  # type: ignore[no-any-return]

    def release(self, item: T, *, discard: bool = False) -> None:
        """Give back what :meth:`acquire` returned. Raises :class:`LeaseError` for anything
        else (a look-alike copy, another pool's item, a second release) and changes nothing."""
        if isinstance(item, HostedItem):
            token = item._take(self)
        else:
            with self._leases_lock:
                held = self._by_id.get(id(item))
                if held is None or held[0] is not item:
                    if id(item) in self._inherited:
                        return  # leased by the parent before a fork: not ours to release
                    raise LeaseError(
                        f"this {type(item).__name__} is not leased through this proxy (never "
                        "leased, leased from another pool, or already released)"
                    )
                token = held[1].pop()
                if not held[1]:
                    del self._by_id[id(item)]
        self._callmethod("release", (token, discard))

    def lease(self, timeout: float | None = None) -> Lease[T]:
        """``with pool.lease() as item:`` -- released however the block exits."""
        return Lease(self, timeout)

    def call(
        self, func: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Run ``func(item, *args, **kwargs)`` in the server on a leased item; return its result.

        One round trip: lease, call, release. ``func`` must be importable by the server (a
        module-level function); its result must be plain picklable data. ``timeout`` is the
        wait for an item (name your own argument differently, or use functools.partial).
        """
        payload = self._callmethod("call", (func, args, kwargs, timeout))
        return pickle.loads(payload)

    def stats(self) -> PoolStats:
        """The pool's statistics, from the server."""
        return self._callmethod("stats")  # type: ignore[no-any-return]

    def leases(self) -> list[LeaseInfo]:
        """Who holds each lease (pid, host, since when), oldest first, from the server."""
        return self._callmethod("leases")  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the shared pool for every process using it."""
        self._callmethod("close")

    def describe(self) -> dict[str, Any]:
        """``{"name", "share", "max_size"}`` of the shared pool."""
        return self._callmethod("describe")  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<PoolProxy {self._token.typeid!r} at {self._token.address!r}>"

    # -- transport ----------------------------------------------------------------------------

    def _callmethod(
        self, methodname: str, args: tuple[Any, ...] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        if self._deferred_error is not None:
            raise self._deferred_error
        if self._needs_incref:
            self._incref()
        tls = self._tls
        try:
            conn, reader = tls.connection, tls.reader
        except AttributeError:
            self._connect()
            conn, reader = tls.connection, tls.reader
        # Plain pickle, not multiprocessing's: ~6x cheaper per message, and it refuses to pass
        # file descriptors (a socket in the arguments) instead of duplicating them.
        request = pickle.dumps((self._id, methodname, args, kwds or {}), pickle.HIGHEST_PROTOCOL)
        try:
            conn.send_bytes(request)
            kind, result = pickle.loads(reader.read())
        except (EOFError, OSError) as exc:
            self._drop_connection()
            raise _transport_error(self, exc) from exc
        if kind == "#RETURN":
            return result
        raise convert_to_error(kind, result)

    def _connect(self) -> None:
        """Open this thread's connection to the server, bound to this process's session."""
        address = self._token.address
        try:
            session = _sessions.session_for(address, self._authkey)
            conn = self._Client(address, authkey=self._authkey)
            name = current_process().name
            if threading.current_thread() is not threading.main_thread():
                name += "|" + threading.current_thread().name
            args: tuple[Any, ...] = (name,) if session is None else (name, session)
            dispatch(conn, None, "accept_connection", args)
        except AuthenticationError as exc:
            raise self._authkey_error() from exc
        except (EOFError, OSError) as exc:
            raise _transport_error(self, exc) from exc
        self._tls.connection = conn
        self._tls.reader = MessageReader(conn.fileno())

    def _incref(self) -> None:
        self._needs_incref = False
        try:
            base_proxy_incref(self)
        except AuthenticationError as exc:
            raise self._authkey_error() from exc
        except (EOFError, OSError) as exc:
            raise _transport_error(self, exc) from exc

    def _drop_connection(self) -> None:
        conn = getattr(self._tls, "connection", None)
        self._tls.__dict__.pop("reader", None)
        if conn is not None:
            del self._tls.connection
            with contextlib.suppress(OSError):
                conn.close()

    def _authkey_error(self) -> AuthkeyError:
        return AuthkeyError(
            f"the manager at {self._token.address!r} refused this process's authkey. Proxies "
            "are pickled without their key (a Pool task argument, for example), so this process "
            "must learn it another way: pass the proxy once through the worker initializer "
            "(Pool(initializer=..., initargs=(proxy,)), or safepool.worker_init_proxies), which "
            "carries the key; or create the manager with the default authkey"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        _, (cls, token, serializer, kwds) = super().__reduce__()
        return (_rebuild_pool_proxy, (cls, token, serializer, kwds))

    # -- fork ---------------------------------------------------------------------------------

    def _reset_leases(self) -> None:
        # _leases_lock guards _by_id: id(copy) -> (copy, tokens) for by-value leases.
        self._leases_lock = threading.Lock()
        self._by_id: dict[int, tuple[object, list[int]]] = {}
        self._inherited: set[int] = set()

    def _after_fork_in_child(self) -> None:
        """In a forked child (raw os.fork() too): the parent's leases and connections stay the
        parent's; this process connects and takes its own reference on first use."""
        inherited = set(self._by_id)
        _fork.abandon(self._by_id)
        self._reset_leases()
        self._inherited = inherited
        self._tls.__dict__.pop("reader", None)
        tls_connection = self._tls.__dict__.pop("connection", None)
        if tls_connection is not None:
            # Close our copy of the descriptor: a closed copy sends nothing (the parent's
            # keeps the socket open), and the server sees the end when the parent's goes.
            with contextlib.suppress(OSError):
                os.close(tls_connection.fileno())
            _fork.abandon(tls_connection)  # its handle is closed: its finaliser must not run
        close = getattr(self, "_close", None)
        if close is not None:
            close.cancel()  # the parent's reference is the parent's to drop
        self._needs_incref = not self._owned_by_manager


def _rebuild_pool_proxy(
    cls: type[PoolProxy[Any]], token: Any, serializer: str, kwds: dict[str, Any]
) -> PoolProxy[Any]:
    """Unpickle a proxy. Never raises: an exception while unpickling a Pool task kills the
    worker and hangs the pool, so a failure to reach the server, authenticate, or find the
    pool there is kept and raised by the proxy's first call instead."""
    if "authkey" not in kwds and token.address in _known_authkeys:
        kwds["authkey"] = _known_authkeys[token.address]
    try:
        return RebuildProxy(cls, token, serializer, dict(kwds))  # type: ignore[no-any-return]
    except Exception as exc:
        proxy: PoolProxy[Any] = RebuildProxy(cls, token, serializer, dict(kwds, incref=False))
        if isinstance(exc, (AuthkeyError, ManagerUnavailable)):
            proxy._deferred_error = exc
        else:  # e.g. KeyError from incref: every proxy was dropped and the pool with them
            proxy._deferred_error = ManagerUnavailable(
                f"the shared pool {token.typeid!r} no longer exists in the server at "
                f"{token.address!r} ({type(exc).__name__}: {exc}); keep a proxy alive in the "
                "process that created it while other processes use it"
            )
        return proxy


class HostedItem:
    """A lease on an item that stays in the server (``share="hosted"``).

    ``call(func, *args, **kwargs)`` runs ``func(item, *args, **kwargs)`` in the server on this
    very item, so several calls can form one transaction. It belongs to the process that leased
    it, and cannot be pickled.
    """

    __slots__ = ("__weakref__", "_proxy", "_token")

    def __init__(self, proxy: PoolProxy[Any], token: int) -> None:
        self._proxy: PoolProxy[Any] | None = proxy
        self._token = token

    def call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        proxy = self._live()
        payload = proxy._callmethod("call_leased", (self._token, func, args, kwargs))
        return pickle.loads(payload)

    @property
    def released(self) -> bool:
        return self._proxy is None

    def _live(self) -> PoolProxy[Any]:
        if self._proxy is None:
            raise LeaseError("this hosted item was already released")
        return self._proxy

    def _take(self, proxy: PoolProxy[Any]) -> int:
        """Hand the token back for a release through ``proxy`` (once)."""
        owner = self._live()
        if owner._token.address != proxy._token.address or owner._token.id != proxy._token.id:
            raise LeaseError("this hosted item was leased from another pool")
        self._proxy = None
        return self._token

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a HostedItem belongs to the process that leased it and cannot be pickled; "
            "pass the pool proxy to other processes and lease there"
        )

    def __repr__(self) -> str:
        state = "released" if self._proxy is None else "leased"
        return f"<HostedItem {state}>"


def _reinit_stdlib_proxy_lock() -> None:
    # BaseProxy._mutex is reinitialised by multiprocessing's own after-fork machinery, which a
    # raw os.fork() does not run; a thread holding it at fork time would deadlock the child.
    BaseProxy._mutex._at_fork_reinit()


class _StdlibForkFixes:
    def _after_fork_in_child(self) -> None:
        _reinit_stdlib_proxy_lock()


_stdlib_fork_fixes = _StdlibForkFixes()
_fork.register(_stdlib_fork_fixes)
