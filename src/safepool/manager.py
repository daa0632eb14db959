"""Share one bounded pool among many processes, through a manager server.

``PoolManager`` is a :class:`multiprocessing.managers.BaseManager` whose server is
:class:`~safepool._server.SafeServer` and which has ``SafeConnectionPool`` registered::

    with PoolManager() as manager:
        pool = manager.SafeConnectionPool(factory=connect, max_size=10)
        ...  # pass `pool` to worker processes; each uses pool.lease(), pool.call(), ...

``register_pool`` registers a *named* pool (one per server) on any ``BaseManager`` subclass, and,
without a factory, only the typeid, for clients of a server started elsewhere.

The pool is a :class:`~safepool.pool.SafeConnectionPool` inside the server, so the server's
one-thread-per-client dispatch cannot race it (the trap of a plain object registered on a
manager: two processes leased the same connection in 40 of 40 trials here).
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import pickle
from collections.abc import Callable
from multiprocessing import ProcessError
from multiprocessing.managers import BaseManager, Server, SyncManager, Token
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, Literal, TypeVar, overload

from . import _sessions
from ._hosted import HostedPool, NamedPoolFactory, check_fast_path, check_share, pack_options
from ._protocol import (
    RETURN,
    UNPROBED,
    Channel,
    error_from_reply,
    open_channel_with,
    request,
    transport,
)
from ._references import drop_references
from ._server import SafeServer
from ._serverlog import ServerLogging, check_log_level
from ._stdlib import State, thread_locals
from ._transport import check_address
from .errors import ManagerUnavailable
from .pool import check_pool_options
from .proxy import HostedItem, PoolProxy, remember_authkey

__all__ = ["PoolAccessor", "PoolManager", "register_pool"]

T = TypeVar("T")

_POOL_OPTIONS = frozenset(inspect.signature(check_pool_options).parameters)


def _check_options(share: Any, options: dict[str, Any]) -> None:
    """Everything a server would reject, rejected here first, with the same messages."""
    unknown = sorted(set(options) - _POOL_OPTIONS)
    if unknown:
        raise TypeError(
            f"unknown pool option(s) {', '.join(map(repr, unknown))}; valid options: "
            f"{', '.join(sorted(_POOL_OPTIONS))}, share"
        )
    check_share(share)
    check_pool_options(**options)
    try:
        ForkingPickler.dumps(options)
    except Exception as exc:
        raise TypeError(
            "pool options must be picklable to reach the manager server "
            f"({type(exc).__name__}: {exc}); use module-level functions or picklable objects "
            "for factory, check, reset and close, not lambdas or closures"
        ) from None


def _request(manager: Any, funcname: str, *args: Any, **kwds: Any) -> Any:
    """One server-level request to ``manager``'s server (any ``BaseManager``, typed loosely: its
    ``_address``/``_authkey`` are stdlib internals)."""
    return request(manager._address, manager._authkey, funcname, args, kwds)


def create_proxy(manager: Any, typeid: str, /, *args: Any, **kwds: Any) -> PoolProxy[Any]:
    """Create a shared object on ``manager``'s server and return a proxy to it (which keeps
    ``manager``, as a stdlib proxy does); see :func:`new_proxy`."""
    return new_proxy(manager._address, manager._authkey, typeid, args, kwds, manager=manager)


def new_proxy(
    address: Any,
    authkey: bytes,
    typeid: str,
    args: tuple[Any, ...] = (),
    kwds: dict[str, Any] | None = None,
    *,
    manager: Any = None,
) -> PoolProxy[Any]:
    """Create a shared object of ``typeid`` on the server at ``address`` (or get a served named
    pool) and return a proxy to it.

    The object's first reference belongs to this process's session, so the object is disposed
    of when the proxy is collected, or when this process ends, however it ends. Created on a
    channel, it is disposed of at once if this call is cut short before the proxy holds the
    reference: the channel is aborted, and the server drops the reference its unread (or
    unacknowledged) reply gave.
    """
    drop_references()
    kwds = kwds or {}
    used: list[Any] = []  # (channel, request number) of each request the creation makes
    try:
        with transport(address):
            session = _sessions.session_for(address, authkey)
            if session is not None:
                creation = (session, typeid, args, kwds)
                ident, exposed, probe = _create_on_channel(address, authkey, creation, used)
        if session is None:  # pragma: no cover - a server without sessions (not a SafeServer)
            ident, exposed = request(address, authkey, "create", (typeid, *args), kwds)
            probe = UNPROBED
        proxy: PoolProxy[Any] = PoolProxy(
            Token(typeid, address, ident),
            "pickle" if manager is None else manager._serializer,
            manager=manager,
            authkey=authkey,
            exposed=exposed,
            incref=session is None,
        )
        if session is None:  # pragma: no cover - see above
            request(address, authkey, "decref", (ident,))
        else:
            proxy._adopt_reference(session)
        if probe != UNPROBED:
            proxy._offer_fast_path(probe)
    except BaseException:
        for channel, number in used:
            channel.abort(number)
        raise
    return proxy


def _create_on_channel(
    address: Any,
    authkey: bytes,
    creation: tuple[str, str, Any, Any],
    used: list[tuple[Channel, int]],
) -> tuple[str, tuple[str, ...], Any]:
    """Create (``creation`` is the session, typeid, args, kwds of ``create_for``) on this
    thread's channel to the server, opened now if it has none (the proxy's calls then use it):
    one connection and handshake fewer than a request of its own. Returns the object's ident,
    its exposed methods, and its ``fast_path()`` (``UNPROBED`` if the server did not say).

    Each channel a request goes on is added to ``used`` first, with the request's number. A
    channel kept from before can be stale (the server restarted): nothing was created through
    it then, so the request goes once more on a fresh channel. A thread whose channel was
    opened with another authkey, or an older server, which carries no server-level requests on
    a channel, gets a connection of its own (so a wrong key is refused as before).
    """
    home = thread_locals(address)
    channel = getattr(home, "channel", None)
    if channel is not None and not hmac.compare_digest(channel.authkey, authkey):
        # Opened with another key: this key proves itself on a connection of its own.
        return (*request(address, authkey, "create_for", creation), UNPROBED)
    if channel is not None and "create_for" in channel.requests:
        used.append((channel, channel.sent + 1))
        with contextlib.suppress(ManagerUnavailable):
            return _create(channel, creation)
        channel = None  # it was stale, and has closed itself
    if channel is None:  # open one, with the creation in the same write
        message = pickle.dumps((None, "create_probed", creation, {}), pickle.HIGHEST_PROTOCOL)
        channel, reply = open_channel_with(
            address, authkey, home, creation[0], then=message, used=used
        )
        if reply is not None and "create_probed" in channel.requests:
            kind, value = reply
            if kind == RETURN:
                return value  # type: ignore[no-any-return]
            raise error_from_reply(kind, value)
        if "create_for" in channel.requests:  # a server without create_probed
            return _create(channel, creation)
    # An older server: a connection of its own.
    return (*request(address, authkey, "create_for", creation), UNPROBED)


def _create(channel: Any, creation: tuple[str, str, Any, Any]) -> tuple[str, tuple[str, ...], Any]:
    """``create_probed`` on ``channel``, or ``create_for`` if its server lacks it."""
    probed = "create_probed" in channel.requests
    name = "create_probed" if probed else "create_for"
    value = channel.call(pickle.dumps((None, name, creation, {}), pickle.HIGHEST_PROTOCOL))
    return value if probed else (*value, UNPROBED)


class PoolManager(BaseManager):
    """A manager that hosts :class:`~safepool.pool.SafeConnectionPool` safely.

    Takes the ``BaseManager`` arguments (``address``, ``authkey``, ``serializer``, ``ctx``, ...)
    and serves from :class:`~safepool._server.SafeServer`: no proxy can fetch a copy of a hosted
    object, call an unexposed method, or turn a server-side error into a typeless one.

    ``log_level`` (keyword-only, default ``"WARNING"``): the level of the ``safepool`` loggers in
    the server process that :meth:`start` runs. Their records go to that process's stderr unless
    logging there is configured already (see :mod:`safepool._serverlog`), so leak warnings,
    reclaimed and revoked leases and failing hooks reach someone. ``None`` leaves logging alone.
    """

    _Server = SafeServer
    # Set by BaseManager.__init__ (stdlib internals, see safepool._stdlib).
    _address: Any
    _authkey: bytes
    _state: Any
    _registry: dict[str, Any]
    _serializer: str

    def __init__(
        self,
        address: Any = None,
        *args: Any,
        log_level: int | str | None = "WARNING",
        **kwargs: Any,
    ) -> None:
        """``BaseManager``'s arguments; ``address`` is ``"HOST:PORT"``, ``"[::1]:PORT"``,
        ``"unix:/path"``, a ``(host, port)`` tuple, or None (a new Unix socket when started).
        ``log_level``: what the server process logs to its stderr (see the operations guide)."""
        self._log_level = check_log_level(log_level)
        if address is not None:
            address = check_address(address)
        super().__init__(address, *args, **kwargs)

    def get_server(self) -> Any:
        """The server object, to run in this process with ``serve_forever()``.

        (``BaseManager.get_server`` ignores ``_Server`` and always builds the stdlib's.)
        """
        if self._state.value != State.INITIAL:
            raise ProcessError("the manager's server is already started or shut down")
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def start(self, initializer: Any = None, initargs: Any = ()) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, got {initializer!r}")
        try:
            super().start(ServerLogging(self._log_level, initializer, initargs))
        except BaseException as exc:
            self._end_unstarted()  # cut short (Ctrl+C, a signal handler): no server left behind
            if not isinstance(exc, EOFError):
                raise
            raise ManagerUnavailable(
                "the manager's server process ended while starting (EOFError); a server started "
                "with spawn or forkserver imports everything registered on the manager (pool "
                "factories, hooks) by module and name: define them at module level in an "
                "importable module, not under `if __name__ == '__main__':`"
            ) from exc
        remember_authkey(self._address, self._authkey)

    def _end_unstarted(self) -> None:
        """``start()`` failed or was cut short: end a server process it started. (One forked
        but not yet recorded by ``Process.start()`` ends when this process does: _starter.)"""
        process = getattr(self, "_process", None)
        if process is not None and process.pid is not None:
            process.kill()
            process.join()

    def connect(self) -> None:
        """Connect to a server started elsewhere (``BaseManager.connect``, with safepool errors)."""
        _request(self, "dummy")
        self._connected()

    def _connected(self) -> None:
        """Use a server started elsewhere without a request to check it first: the first real
        request reports an unreachable server or a wrong authkey (one connection fewer)."""
        self._state.value = State.STARTED
        remember_authkey(self._address, self._authkey)

    # Typed from the factory: a hosted pool's leases are HostedItem[T] handles, a by-value
    # pool's are copies of T; a `share` known only at run time gives PoolProxy[Any].
    @overload
    def SafeConnectionPool(
        self,
        *,
        factory: Callable[[], T],
        share: Literal["hosted"] = "hosted",
        fast_path: bool = True,
        **options: Any,
    ) -> PoolProxy[HostedItem[T]]: ...
    @overload
    def SafeConnectionPool(
        self,
        *,
        factory: Callable[[], T],
        share: Literal["value"],
        fast_path: bool = True,
        **options: Any,
    ) -> PoolProxy[T]: ...
    @overload
    def SafeConnectionPool(
        self,
        *,
        factory: Callable[[], Any],
        share: str = "hosted",
        fast_path: bool = True,
        **options: Any,
    ) -> PoolProxy[Any]: ...
    def SafeConnectionPool(
        self, *, share: str = "hosted", fast_path: bool = True, **options: Any
    ) -> PoolProxy[Any]:
        """Create a pool in the server; return a proxy usable from any process.

        ``options`` are :class:`~safepool.pool.SafeConnectionPool`'s (``factory``,
        ``max_size``, ...), validated here before anything is sent. ``share="hosted"`` keeps
        items in the server; ``share="value"`` gives clients copies of picklable items, and
        clients on the server's host lease them with no round trip (``fast_path=False`` turns
        that off; ``describe()`` says whether a pool has it, and why not).

        Typed from the factory's return type ``T``: a ``PoolProxy[HostedItem[T]]`` for a hosted
        pool, a ``PoolProxy[T]`` for ``share="value"``.
        """
        _check_options(share, options)
        check_fast_path(fast_path)
        return create_proxy(
            self, "SafeConnectionPool", share=share, fast_path=fast_path, **pack_options(options)
        )


PoolManager.register(
    "SafeConnectionPool", callable=HostedPool, proxytype=PoolProxy, create_method=False
)

_STDLIB_MANAGERS: tuple[type, ...] = (BaseManager, SyncManager, PoolManager)
try:
    from multiprocessing.managers import SharedMemoryManager

    _STDLIB_MANAGERS += (SharedMemoryManager,)
except ImportError:  # pragma: no cover - platforms without shared memory
    pass


class PoolAccessor(Generic[T]):
    """What :func:`register_pool` returns: ``accessor(manager)`` is ``manager.<typeid>()``, typed.

    ``T`` is what the pool's ``acquire()`` returns (``HostedItem[Conn]`` for a hosted pool of
    ``Conn``), inferred from the factory; a client that registers only the typeid states it::

        get_db: PoolAccessor[HostedItem[sqlite3.Connection]] = register_pool(Client, "db")
        pool = get_db(client)  # PoolProxy[HostedItem[sqlite3.Connection]]
    """

    __slots__ = ("manager_cls", "typeid")

    def __init__(self, manager_cls: type[BaseManager], typeid: str) -> None:
        self.manager_cls = manager_cls
        self.typeid = typeid

    def __call__(self, manager: BaseManager) -> PoolProxy[T]:
        """A proxy to the server's pool ``typeid`` (what ``manager.<typeid>()`` returns)."""
        if not isinstance(manager, self.manager_cls):
            raise TypeError(
                f"the pool {self.typeid!r} is registered on {self.manager_cls.__name__}; pass an "
                f"instance of it (started or connected), got {manager!r}"
            )
        return create_proxy(manager, self.typeid)

    def __repr__(self) -> str:
        return f"<PoolAccessor {self.manager_cls.__name__}.{self.typeid}>"


def check_typeid(manager_cls: type[BaseManager], typeid: Any) -> None:
    """``typeid`` can name a pool on ``manager_cls``: a public identifier, hiding nothing."""
    if not isinstance(typeid, str) or not typeid.isidentifier() or typeid.startswith("_"):
        raise ValueError(
            f"typeid must be a public Python identifier (it becomes a method), got {typeid!r}"
        )
    existing = getattr(manager_cls, typeid, None)
    if existing is not None and typeid not in getattr(manager_cls, "_registry", {}):
        raise ValueError(f"typeid {typeid!r} would hide {manager_cls.__name__}.{typeid}")


@overload
def register_pool(
    manager_cls: type[BaseManager],
    typeid: str,
    factory: Callable[[], T],
    *,
    share: Literal["hosted"] = "hosted",
    fast_path: bool = True,
    **options: Any,
) -> PoolAccessor[HostedItem[T]]: ...
@overload
def register_pool(
    manager_cls: type[BaseManager],
    typeid: str,
    factory: Callable[[], T],
    *,
    share: Literal["value"],
    fast_path: bool = True,
    **options: Any,
) -> PoolAccessor[T]: ...
@overload
def register_pool(
    manager_cls: type[BaseManager],
    typeid: str,
    factory: Callable[[], Any] | None = None,
    *,
    share: str = "hosted",
    fast_path: bool = True,
    **options: Any,
) -> PoolAccessor[Any]: ...
def register_pool(
    manager_cls: type[BaseManager],
    typeid: str,
    factory: Callable[[], Any] | None = None,
    *,
    share: str = "hosted",
    fast_path: bool = True,
    **options: Any,
) -> PoolAccessor[Any]:
    """Register a named pool on a ``BaseManager`` subclass: ``manager.<typeid>()`` returns a
    :class:`~safepool.proxy.PoolProxy` to the one pool of that name in the server.

    With a ``factory`` (and pool ``options``), the server makes the pool on first use. Without
    one, only the typeid is registered: for a client that connects to a server started
    elsewhere. A subclass still on the stdlib's server is switched to safepool's
    :class:`~safepool._server.SafeServer`.

    Returns a :class:`PoolAccessor`: ``accessor(manager)`` is ``manager.<typeid>()`` with a
    type checkers know (``PoolProxy[HostedItem[T]]`` for a hosted pool of the factory's ``T``,
    ``PoolProxy[T]`` with ``share="value"``).
    """
    if not (isinstance(manager_cls, type) and issubclass(manager_cls, BaseManager)):
        raise TypeError(
            f"manager_cls must be a BaseManager subclass, got {manager_cls!r}; "
            "e.g. class MyManager(PoolManager): pass"
        )
    if manager_cls in _STDLIB_MANAGERS:
        raise TypeError(
            f"register on a subclass of your own, not on {manager_cls.__name__} itself (that "
            f"would change it for every user): class MyManager({manager_cls.__name__}): pass"
        )
    check_typeid(manager_cls, typeid)
    if factory is None:
        if options or share != "hosted" or fast_path is not True:
            raise TypeError(
                "pool options need a factory; a client of a server started elsewhere "
                f"registers only the typeid: register_pool({manager_cls.__name__}, {typeid!r})"
            )
        callable_: Any = None
    else:
        options = {"factory": factory, **options}
        _check_options(share, options)
        check_fast_path(fast_path)
        callable_ = NamedPoolFactory(typeid, share, options, fast_path)
    manager_cls.register(typeid, callable=callable_, proxytype=PoolProxy, create_method=False)

    def get_pool(self: Any) -> PoolProxy[Any]:
        return create_proxy(self, typeid)

    get_pool.__name__ = get_pool.__qualname__ = typeid
    get_pool.__doc__ = f"A proxy to the server's pool {typeid!r}."
    setattr(manager_cls, typeid, get_pool)
    if getattr(manager_cls, "_Server", None) is Server:
        setattr(manager_cls, "_Server", SafeServer)  # noqa: B010 - typeshed lacks _Server
    return PoolAccessor(manager_cls, typeid)
