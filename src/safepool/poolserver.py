"""A pool server to embed in your own program: ``PoolServer(...).start()``, ``.stop()``.

::

    server = PoolServer("127.0.0.1:0", make_connection, typeid="db", max_size=10)
    server.start()               # returns once it listens; serves from threads of its own
    print(server.address)        # "127.0.0.1:43117": what connect_pool() and the CLI read
    ...
    server.stop()                # closes the pool, every connection, joins the threads

It works from any thread and installs no signal handlers (``python -m safepool serve`` and
``serve_pool(..., handle_signals=True)`` do). The server is a
:class:`~safepool._server.SafeServer`: a hardened handshake (one deadline, a cap on connections
in their handshake, back-off when out of file descriptors), no copies of hosted objects.
"""

from __future__ import annotations

import math
import secrets
import threading
from multiprocessing.managers import BaseManager
from typing import Any

from ._connections import DEFAULT_MAX_UNAUTHENTICATED, check_cap
from ._transport import check_address, format_address, is_local
from .manager import PoolManager, register_pool
from .proxy import remember_authkey

__all__ = ["PoolServer", "check_handshake_timeout"]


def check_handshake_timeout(value: Any) -> float:
    """``handshake_timeout`` validated: a finite number of seconds > 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"handshake_timeout must be a number of seconds > 0 (the time a new connection has "
            f"to authenticate), got {value!r}"
        )
    return float(value)


class PoolServer:
    """Serve pools to other processes and hosts, from threads of this process.

    With a ``factory``, serves one pool named ``typeid`` (``options`` are the pool's:
    ``max_size``, ``timeout``, ...); clients get it with ``connect_pool(address, typeid)``.
    Without one, serves what ``manager`` (a :class:`~safepool.PoolManager` subclass) registers,
    and clients create pools with ``PoolManager(address=..., authkey=...).connect()``.

    ``address``: ``"HOST:PORT"`` (port 0: a free one), ``"[::1]:PORT"``, ``"unix:/path"``.
    ``authkey``: required unless the address is loopback or a Unix socket (then a random key is
    made, readable as :attr:`authkey`). ``handshake_timeout``: seconds a new connection has, in
    all, to authenticate and make its request. ``max_unauthenticated``: connections allowed in
    their handshake at once; past it, new ones are closed at once.
    """

    def __init__(
        self,
        address: Any = "127.0.0.1:0",
        factory: Any = None,
        *,
        typeid: str = "pool",
        manager: type[BaseManager] | None = None,
        authkey: bytes | None = None,
        share: str = "hosted",
        handshake_timeout: float = 5.0,
        max_unauthenticated: int = DEFAULT_MAX_UNAUTHENTICATED,
        **options: Any,
    ) -> None:
        self._bind = check_address(address)
        self._handshake_timeout = check_handshake_timeout(handshake_timeout)
        self._max_unauthenticated = check_cap(max_unauthenticated)
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, got {type(authkey).__name__}")
        if authkey is None and not is_local(self._bind):
            raise ValueError(
                f"refusing to serve {format_address(self._bind)} to other hosts without an "
                f"authkey: anyone who can reach it could run code in the server. Pass authkey= "
                f"(e.g. from $SAFEPOOL_AUTHKEY), or listen on 127.0.0.1"
            )
        base = manager if manager is not None else PoolManager
        if not (isinstance(base, type) and issubclass(base, BaseManager)):
            raise TypeError(f"manager must be a PoolManager subclass, got {manager!r}")
        if factory is not None:
            base = type("ServedPoolManager", (base,), {})
            register_pool(base, typeid, factory, share=share, **options)
        elif options or share != "hosted":
            raise TypeError("pool options need a factory: PoolServer(address, factory, ...)")
        self._manager_cls = base
        self._authkey = authkey if authkey is not None else secrets.token_bytes(32)
        self._typeid = typeid if factory is not None else None
        # _lock guards _server and _stopped: start() and stop() may race from any threads.
        self._lock = threading.Lock()
        self._server: Any = None
        self._stopped = False

    @property
    def address(self) -> str:
        """Where it listens, as ``"HOST:PORT"``, ``"[IPv6]:PORT"`` or ``"unix:/path"`` (with the
        real port once started, if 0 was asked for)."""
        server = self._server
        return format_address(server.address if server is not None else self._bind)

    @property
    def authkey(self) -> bytes:
        return self._authkey

    @property
    def running(self) -> bool:
        server = self._server
        return server is not None and not server.stop_event.is_set()

    def start(self) -> PoolServer:
        """Listen and serve from threads of this process; returns at once. Once only."""
        with self._lock:
            if self._server is not None or self._stopped:
                raise RuntimeError("a PoolServer starts once; make a new one to serve again")
            manager = self._manager_cls(address=self._bind, authkey=self._authkey)
            server: Any = manager.get_server()  # a SafeServer (PoolManager.get_server)
            server.handshake_timeout = self._handshake_timeout
            server.max_unauthenticated = self._max_unauthenticated
            try:
                server.start_accepting()
            except BaseException:
                server.close()  # the listener, and a Unix socket's file
                raise
            self._server = server
        remember_authkey(server.address, self._authkey)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: no new connections; the pools close (and their items); every client
        connection ends; the server's threads are joined (for up to ``timeout`` seconds); a
        Unix socket's file is removed. Idempotent, from any thread."""
        with self._lock:
            self._stopped = True
            server = self._server
        if server is not None:
            server.close(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server is stopped (by :meth:`stop` or a client's ``shutdown``);
        True if it was."""
        server = self._server
        if server is None:
            raise RuntimeError("the server was not started")
        return bool(server.stop_event.wait(timeout))

    def __enter__(self) -> PoolServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else ("stopped" if self._stopped else "not started")
        pool = f" pool {self._typeid!r}" if self._typeid else ""
        return f"<PoolServer{pool} at {self.address} {state}>"
