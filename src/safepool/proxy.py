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
from multiprocessing import AuthenticationError
from multiprocessing.managers import BaseProxy, Token
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from . import _fork, _sessions
from ._fastclient import FastLeasing
from ._fastlease import TableLeaser, detach_finished
from ._lease import Lease, LeaseRef
from ._protocol import (
    POOL_METHODS,
    RETURN,
    Channel,
    error_from_reply,
    open_channel,
    request,
    transport_error,
)
from ._references import Reference, drop_references, dropped, references
from ._revoke import check_action, check_lease_id
from ._settler import settler
from ._stdlib import RebuildProxy
from .errors import AuthkeyError, LeaseError, ManagerUnavailable, SafePoolError
from .stats import LeaseInfo, PoolStats

__all__ = ["HostedItem", "PoolProxy"]

T = TypeVar("T")
U = TypeVar("U")  # the item a function sent to the server receives
R = TypeVar("R")  # what a function called on an item returns
P = ParamSpec("P")  # the rest of its parameters

# Authkeys of the manager servers this process knows, by address. Filled when a manager starts
# or connects, and when a proxy arrives with its key (through an initializer, or inheritance);
# consulted when a proxy is unpickled without one (as task arguments always are).
_known_authkeys: dict[Any, bytes] = {}

_dumps = pickle.dumps
_HIGHEST = pickle.HIGHEST_PROTOCOL


def remember_authkey(address: Any, authkey: bytes) -> None:
    _known_authkeys[address] = bytes(authkey)


class _Claim:
    """What one acquire() through a proxy holds (see safepool._lease): its token and item,
    recorded in the same step as the lease is recorded in the proxy."""

    __slots__ = ("item", "token")

    def __init__(self) -> None:
        self.item: Any = None
        self.token: int | None = None


class PoolProxy(FastLeasing, BaseProxy, Generic[T]):
    """A pool in a manager server, used from any process.

    ``acquire()`` returns a copy of the item for pools created with ``share="value"``, and a
    :class:`HostedItem` handle for ``share="hosted"`` pools (the default), whose items never leave
    the server. Either way, pass what you got to ``release()``, or use ``with pool.lease()``.

    ``T`` is what ``acquire()`` returns: a hosted pool of ``sqlite3.Connection`` is a
    ``PoolProxy[HostedItem[sqlite3.Connection]]``, a by-value pool of ``Token`` a
    ``PoolProxy[Token]``. ``PoolManager.SafeConnectionPool(factory=...)`` and
    :func:`~safepool.register_pool` infer it from the factory (see docs/guides/typing.md).

    A call cut short (Ctrl+C, a signal handler raising) never leaves anything behind: its
    connection is dropped, a lease granted to an interrupted ``acquire()`` goes straight back
    to the pool, and an interrupted ``release()`` still happens. See safepool._protocol.
    """

    _exposed_ = POOL_METHODS

    # Set by BaseProxy.__init__ (stdlib internals, see safepool._stdlib).
    _token: Token
    _tls: Any
    _id: str
    _authkey: bytes
    _manager: Any
    _owned_by_manager: bool
    _Client: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._deferred_error: SafePoolError | None = None
        self._needs_incref = False
        self._reference: Reference | None = None
        self._reset_leases()
        super().__init__(*args, **kwargs)
        remember_authkey(self._token.address, self._authkey)
        _fork.register(self)

    # -- the pool API -------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> T:
        """Lease an item (a copy by value, or a :class:`HostedItem`); see the class docstring."""
        fast = self._fast
        if type(fast) is TableLeaser:  # the pool's table is on this host: no round trip
            lease: list[Any] = []
            try:
                return self._fast_acquire(fast, lease, None, timeout)  # type: ignore[no-any-return]
            except BaseException:  # also here, after it returned (3.10 runs handlers there)
                self._fast_undo(fast, lease)
                raise
        claim = _Claim()
        try:
            return self._acquire_into(claim, timeout)
        except BaseException:  # also here, after it returned (3.10 runs handlers there)
            self._settle(claim)
            raise

    def release(self, item: T, *, discard: bool = False) -> None:
        """Give back what :meth:`acquire` returned. Raises :class:`LeaseError` for anything
        else (a look-alike copy, another pool's item, a second release) and changes nothing.
        A release cut short by an interruption still reaches the server."""
        fast = self._fast
        if type(fast) is TableLeaser:
            self._fast_release(fast, item, discard)
            return
        token = self._token_of(item)
        if token is not None and token < 0:  # leased here before the table was detached
            raise LeaseError(f"this {type(item).__name__} is not leased through this proxy")
        if token is not None:
            self._send_release(item, token, discard)

    def lease(self, timeout: float | None = None) -> Lease[T]:
        """``with pool.lease() as item:`` -- released however the block exits."""
        if not settler.running:  # (a lease collected while held is given back by its thread)
            settler.start()
        return Lease(self, timeout)

    # Typed from ``func``: its first parameter takes the pool's item (the connection itself, not
    # the HostedItem handle, for a hosted pool), the rest are checked against ``args``/``kwargs``,
    # and its return type is the result's. A ParamSpec cannot be followed by a keyword-only
    # ``timeout``, so a call that passes one checks ``func``'s item and result types only.
    @overload
    def call(
        self: PoolProxy[HostedItem[U]],
        func: Callable[Concatenate[U, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...
    @overload
    def call(
        self: PoolProxy[HostedItem[U]],
        func: Callable[Concatenate[U, P], R],
        /,
        *args: Any,
        timeout: float | None,
        **kwargs: Any,
    ) -> R: ...
    @overload
    def call(
        self: PoolProxy[U],
        func: Callable[Concatenate[U, P], R],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R: ...
    @overload
    def call(
        self: PoolProxy[U],
        func: Callable[Concatenate[U, P], R],
        /,
        *args: Any,
        timeout: float | None,
        **kwargs: Any,
    ) -> R: ...
    def call(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ``func(item, *args, **kwargs)`` in the server on a leased item; return its result.

        One round trip: lease, call, release. ``func`` must be importable by the server (a
        module-level function); its result must be plain picklable data. ``timeout`` (keyword
        only) is the wait for an item (name your own argument differently, or use
        functools.partial).
        """
        timeout = kwargs.pop("timeout", None)
        payload = self._callmethod("call", (func, args, kwargs, timeout))
        return pickle.loads(payload)

    def stats(self) -> PoolStats:
        """The pool's statistics, from the server."""
        return self._callmethod("stats")  # type: ignore[no-any-return]

    def leases(self) -> list[LeaseInfo]:
        """Who holds each lease (pid, host, since when), oldest first, from the server."""
        return self._callmethod("leases")  # type: ignore[no-any-return]

    def revoke(self, lease_id: int, *, action: str = "close") -> LeaseInfo:
        """Take lease ``lease_id`` (its id in :meth:`leases`) back from a holder that is stopped
        or hung: ``action="close"`` closes the item, ``action="reset"`` returns it to the pool
        after the pool's ``reset`` hook. The holder's later use or release of it raises
        :class:`~safepool.errors.LeaseRevoked`. Returns the lease as it was.

        Raises :class:`~safepool.errors.LeaseError`, changing nothing, if no such lease is held
        or a call on its item is running in the server right now. Leases a same-host client took
        in a fast-path table itself have no id and cannot be revoked (end their process)."""
        check_lease_id(lease_id)
        check_action(action)
        return self._callmethod("revoke", (lease_id, action))  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the shared pool for every process using it."""
        self._callmethod("close")
        detach_finished()  # this process's registration of the pool's table, if it had one

    def describe(self) -> dict[str, Any]:
        """``{"name", "share", "max_size"}`` of the shared pool."""
        return self._callmethod("describe")  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<PoolProxy {self._token.typeid!r} at {self._token.address!r}>"

    # -- leasing, interruption-safe (the Leaser protocol of safepool._lease) -------------------

    def _new_claim(self) -> _Claim:
        return _Claim()

    def _acquire_into(self, claim: _Claim, timeout: float | None) -> T:
        leaser = self._fast_leaser()
        if leaser is not None:  # the pool's table is on this host: no round trip
            lease: list[Any] = []
            try:
                return self._fast_acquire(leaser, lease, claim, timeout)  # type: ignore[no-any-return]
            except BaseException:
                self._fast_undo(leaser, lease)
                raise
        channel = self._channel()
        message = _dumps((self._id, "acquire", (timeout,), {}), _HIGHEST)
        number = channel.sent + 1  # the acquire's, on this channel
        try:
            kind, value = channel.exchange(message)
            if kind == RETURN:
                return self._take_delivery(claim, value)
        except BaseException:
            # Cut short before the caller had the item: the server takes the lease back when
            # the channel aborts, and nothing of it stays here.
            channel.abort(number)
            self._forget_claim(claim)
            raise
        raise error_from_reply(kind, value)

    def _take_delivery(self, claim: _Claim, value: tuple[int, bytes | None]) -> T:
        token, payload = value
        if payload is None:
            item: Any = HostedItem(self, token)
        else:
            item = pickle.loads(payload)
        with self._leases_lock:
            claim.item = item
            claim.token = token
            if payload is not None:
                self._by_id.setdefault(id(item), (item, []))[1].append(token)
        return item  # type: ignore[no-any-return]

    def _release_claim(self, claim: _Claim) -> None:
        if claim.token is None:
            raise LeaseError("this lease was already released")
        self.release(claim.item)

    def _settle_orphan(self, ref: LeaseRef) -> None:
        """Release what a lease collected while held still held (in the settler's thread: see
        safepool._settler)."""
        self._settle(ref.claim)
        self._lease_refs.discard(ref)

    def _settle(self, claim: _Claim) -> None:
        """Give back what ``claim`` still holds (after an interruption)."""
        item, token = claim.item, claim.token
        if token is not None and token < 0:
            self._fast_settle(claim)
        elif token is not None and self._holds(item, token):
            self._send_release(item, token, False)

    def _token_of(self, item: object) -> int | None:
        """The token ``item`` is leased under through this proxy; None for an item inherited
        from a parent process (not ours to release). Raises LeaseError, changing nothing."""
        if isinstance(item, HostedItem):
            return item._token_for(self)
        with self._leases_lock:
            held = self._by_id.get(id(item))
            if held is not None and held[0] is item and held[1]:
                return held[1][-1]
            if id(item) in self._inherited:
                self._inherited.discard(id(item))
                return None  # leased by the parent before a fork: not ours to release
        raise LeaseError(
            f"this {type(item).__name__} is not leased through this proxy (never leased, "
            "leased from another pool, or already released)"
        )

    def _holds(self, item: object, token: int) -> bool:
        if isinstance(item, HostedItem):
            return item._proxy is not None and item._token == token
        with self._leases_lock:
            held = self._by_id.get(id(item))
            return held is not None and held[0] is item and token in held[1]

    def _forget(self, item: object, token: int) -> None:
        """This process no longer holds ``token`` on ``item`` (idempotent)."""
        if isinstance(item, HostedItem):
            if item._token == token:
                item._proxy = None
            return
        with self._leases_lock:
            held = self._by_id.get(id(item))
            if held is not None and held[0] is item and token in held[1]:
                held[1].remove(token)
                if not held[1]:
                    del self._by_id[id(item)]

    def _forget_claim(self, claim: _Claim) -> None:
        if claim.token is not None:
            self._forget(claim.item, claim.token)
            claim.token = None

    def _send_release(self, item: object, token: int, discard: bool) -> None:
        message = _dumps((self._id, "release", (token, discard), {}), _HIGHEST)
        channel = self._channel()  # cut short until here: nothing changed, the item is held
        number = channel.sent + 1
        try:
            self._forget(item, token)  # from here on the release happens, whatever interrupts
            kind, value = channel.exchange(message, must_arrive=True)
        except BaseException:
            self._forget(item, token)
            channel.abort(number, resend=message)  # if exchange() did not (or never began)
            raise
        if kind != RETURN:
            raise error_from_reply(kind, value)

    # -- transport ----------------------------------------------------------------------------

    def _callmethod(
        self, methodname: str, args: tuple[Any, ...] = (), kwds: dict[str, Any] | None = None
    ) -> Any:
        # Plain pickle, not multiprocessing's: ~6x cheaper per message, and it refuses to pass
        # file descriptors (a socket in the arguments) instead of duplicating them.
        message = _dumps((self._id, methodname, args, kwds or {}), _HIGHEST)
        return self._channel().call(message)

    def _channel(self) -> Channel:
        """This thread's channel to the server (opened on first use, or after an abort)."""
        if self._deferred_error is not None:
            raise self._deferred_error
        if self._needs_incref:
            self._incref()
        if dropped:
            drop_references()
        try:
            return self._tls.channel  # type: ignore[no-any-return]
        except AttributeError:
            return self._connect()

    def _connect(self) -> Channel:
        """Open this thread's connection to the server, bound to this process's session."""
        address = self._token.address
        try:
            return open_channel(address, self._authkey, self._tls, self._session())
        except AuthkeyError as exc:
            raise self._authkey_error() from exc
        except ManagerUnavailable:
            raise
        except (AuthenticationError, EOFError, OSError) as exc:
            error = transport_error(address, exc)
            raise (self._authkey_error() if isinstance(error, AuthkeyError) else error) from exc

    def _session(self) -> str | None:
        try:
            return _sessions.session_for(self._token.address, self._authkey)
        except (AuthenticationError, EOFError, OSError) as exc:
            error = transport_error(self._token.address, exc)
            raise (self._authkey_error() if isinstance(error, AuthkeyError) else error) from exc

    def _incref(self) -> None:
        """Take this process's reference to the pool, bound to its session: it ends when this
        proxy is collected, or when this process ends (however it ends)."""
        self._needs_incref = False
        if self._owned_by_manager:
            return
        drop_references()  # the drops queued before this reference, first
        session = self._session()
        try:
            request(self._token.address, self._authkey, "incref", (self._id, session))
        except AuthkeyError as exc:
            raise self._authkey_error() from exc
        self._adopt_reference(session)

    def _adopt_reference(self, session: str | None) -> None:
        """Drop the reference ``session`` holds when this proxy is collected (lazily: see
        :class:`Reference`)."""
        reference = Reference(self, dropped.append)
        reference.address = self._token.address
        reference.authkey = bytes(self._authkey)
        reference.ident = self._id
        reference.session = session
        references.add(reference)
        self._reference = reference

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
        # _leases_lock guards _by_id (id(copy) -> (copy, tokens), for by-value leases) and
        # _inherited (ids of copies the parent held before a fork).
        self._leases_lock = threading.Lock()
        self._by_id: dict[int, tuple[object, list[int]]] = {}
        self._inherited: set[int] = set()
        # References to leases collected while holding a claim (see safepool._lease) go to the
        # settler's queue, whose thread releases them at once (see safepool._settler).
        self._orphan_sink: Callable[[Any], object] = settler.sink
        self._lease_refs: set[Any] = set()
        self._reset_fast()  # a forked child attaches to the pool's table itself

    def _after_fork_in_child(self) -> None:
        """In a forked child (raw os.fork() too): the parent's leases and connections stay the
        parent's; this process connects and takes its own reference on first use."""
        inherited = set(self._by_id)
        _fork.abandon(self._by_id)
        self._reset_leases()
        self._inherited = inherited
        channel = self._tls.__dict__.pop("channel", None)
        if channel is not None:
            conn = channel.detach_after_fork()
            # Close our copy of the descriptor: a closed copy sends nothing (the parent's
            # keeps the socket open), and the server sees the end when the parent's goes.
            with contextlib.suppress(OSError):
                os.close(conn.fileno())
            _fork.abandon(conn)  # its handle is closed: its finaliser must not run
        self._reference = None  # the parent's reference is the parent's to drop
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


class HostedItem(Generic[T]):
    """A lease on an item that stays in the server (``share="hosted"``).

    ``call(func, *args, **kwargs)`` runs ``func(item, *args, **kwargs)`` in the server on this
    very item, so several calls can form one transaction. It belongs to the process that leased
    it, and cannot be pickled. ``T`` is the item's type in the server: a
    ``HostedItem[sqlite3.Connection]`` has none of the connection's methods, only ``call``.
    """

    __slots__ = ("__weakref__", "_proxy", "_token")

    def __init__(self, proxy: PoolProxy[Any], token: int) -> None:
        self._proxy: PoolProxy[Any] | None = proxy
        self._token = token

    def call(self, func: Callable[Concatenate[T, P], R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``func(item, *args, **kwargs)`` in the server on this item; return its result."""
        proxy = self._live()
        payload = proxy._callmethod("call_leased", (self._token, func, args, kwargs))
        result: R = pickle.loads(payload)
        return result

    @property
    def released(self) -> bool:
        return self._proxy is None

    def _live(self) -> PoolProxy[Any]:
        if self._proxy is None:
            raise LeaseError("this hosted item was already released")
        return self._proxy

    def _token_for(self, proxy: PoolProxy[Any]) -> int:
        """The token to release through ``proxy``; raises LeaseError, changing nothing."""
        owner = self._live()
        if owner._token.address != proxy._token.address or owner._token.id != proxy._token.id:
            raise LeaseError("this hosted item was leased from another pool")
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
