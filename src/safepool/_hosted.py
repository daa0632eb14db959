"""The server-side half of a shared pool: a SafeConnectionPool leased by token.

A :class:`HostedPool` lives in a manager server; clients reach it through
:class:`~safepool.proxy.PoolProxy`. Every lease gets a token (a random 63-bit integer), and
releases name the token, not the item: a by-value client holds only a copy, and a hosted item
never leaves the server at all. A forged, foreign or already-released token is a
:class:`~safepool.errors.LeaseError` and changes nothing.

Two ways to share items (``share=``):

``"hosted"`` (the default)
    Items stay in the server: database connections, sockets, anything unpicklable. Clients run
    functions on them server-side (``pool.call(func, ...)``, ``lease.call(func, ...)``) and get
    back the function's result.
``"value"``
    Items are plain data (tokens, ids, credentials, device numbers); a client receives a copy.

Whatever crosses to a client is pickled here with the plain :mod:`pickle` module, not the
multiprocessing pickler: that one would *duplicate file descriptors* of sockets and connections
into the client. Plain pickle refuses them, and the result pickler refuses the hosted item itself.
"""

from __future__ import annotations

import io
import logging
import pickle
import random
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .errors import HostedItemError, LeaseError
from .pool import SafeConnectionPool
from .stats import PoolStats

__all__ = ["SHARE_MODES", "HostedPool", "NamedPoolFactory", "check_share"]

logger = logging.getLogger(__name__)

SHARE_MODES = ("hosted", "value")


def check_share(share: Any) -> None:
    if share not in SHARE_MODES:
        raise ValueError(
            f"share must be 'hosted' (items stay in the server) or 'value' (clients get "
            f"copies of picklable items), got {share!r}"
        )


class _ResultPickler(pickle.Pickler):
    """Pickles a result for a client, refusing the hosted item wherever it appears in it."""

    def __init__(self, file: io.BytesIO, item: object) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self._item = item

    def reducer_override(self, obj: Any) -> Any:
        if obj is self._item:
            raise HostedItemError(
                "the result contains the hosted item itself; hosted items never leave the "
                "server: return plain data instead"
            )
        return NotImplemented


class _Lease:
    __slots__ = ("item", "lock")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.lock: threading.Lock | None = None  # made on first call_leased; serialises calls


class HostedPool:
    """A :class:`SafeConnectionPool` in a manager server, leased by token.

    Only the methods listed in :attr:`EXPOSED` can be called by clients; each is one round trip.
    """

    EXPOSED = ("acquire", "release", "call", "call_leased", "stats", "close", "describe")

    # _lock guards _leases (token -> lease). The pool has its own lock; never hold both.
    def __init__(self, *, share: str = "hosted", **options: Any) -> None:
        check_share(share)
        self._pool: SafeConnectionPool[Any] = SafeConnectionPool(**options)
        self._share = share
        self._lock = threading.Lock()
        self._leases: dict[int, _Lease] = {}
        # Tokens are random so a stale or stray one never matches a live lease by accident.
        self._tokens = random.Random()
        # When the last proxy goes, the server drops this object: close the pool's items then.
        self._finalizer = weakref.finalize(self, self._pool.close)

    @property
    def name(self) -> str:
        return self._pool.name

    # -- exposed ----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> tuple[int, bytes | None]:
        """Lease an item: ``(token, pickled copy)`` by value, ``(token, None)`` hosted."""
        item = self._pool.acquire(timeout)
        try:
            payload = self._dump_value(item) if self._share == "value" else None
            token = self._register(item)
        except BaseException:
            self._pool.release(item)
            raise
        return token, payload

    def release(self, token: int, discard: bool = False) -> None:
        """Return the item leased under ``token`` (closing it if ``discard``)."""
        with self._lock:
            lease = self._leases.pop(token, None)
        if lease is None:
            raise self._unknown(token)
        self._pool.release(lease.item, discard=discard)

    def call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Lease an item, run ``func(item, *args, **kwargs)`` here, release: one round trip."""
        item = self._pool.acquire(timeout)
        try:
            result = func(item, *args, **(kwargs or {}))
        except Exception as exc:
            raise self._sendable(exc, item) from None
        finally:
            self._pool.release(item)
        return self._dump_result(result, item, func)

    def call_leased(
        self,
        token: int,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> bytes:
        """Run ``func(item, *args, **kwargs)`` on the item leased under ``token``."""
        with self._lock:
            lease = self._leases.get(token)
            if lease is not None and lease.lock is None:
                lease.lock = threading.Lock()
        if lease is None or lease.lock is None:
            raise self._unknown(token)
        with lease.lock:
            try:
                result = func(lease.item, *args, **(kwargs or {}))
            except Exception as exc:
                raise self._sendable(exc, lease.item) from None
        return self._dump_result(result, lease.item, func)

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> dict[str, Any]:
        stats = self._pool.stats()
        return {"name": stats.name, "share": self._share, "max_size": stats.max_size}

    # -- internals --------------------------------------------------------------------------

    def _register(self, item: Any) -> int:
        token = self._tokens.getrandbits(63)
        with self._lock:
            while token in self._leases:  # pragma: no cover - one in 2**63
                token = self._tokens.getrandbits(63)
            self._leases[token] = _Lease(item)
        return token

    def _unknown(self, token: object) -> LeaseError:
        return LeaseError(
            f"pool {self.name!r}: no lease {token!r} is held (never leased from this pool, "
            "or already released)"
        )

    def _dump_value(self, item: Any) -> bytes:
        try:
            return pickle.dumps(item, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise HostedItemError(
                f"pool {self.name!r} shares items by value, but a {type(item).__name__} cannot "
                f"be copied to a client ({type(exc).__name__}: {exc}); create the pool with "
                "share='hosted' to keep items in the server"
            ) from None

    def _sendable(self, exc: Exception, item: Any) -> Exception:
        """``exc`` if it can cross to the client as is, else a SafePoolError describing it.

        The manager pickles errors with the multiprocessing pickler, which would duplicate the
        file descriptor of a socket carried in an exception's args into the client.
        """
        try:
            _ResultPickler(io.BytesIO(), item).dump(exc)
        except Exception:
            return HostedItemError(
                f"pool {self.name!r}: the function raised {type(exc).__name__}: {exc} "
                "(the exception itself holds something that cannot leave the server)"
            )
        return exc

    def _dump_result(self, result: Any, item: Any, func: Callable[..., Any]) -> bytes:
        what = getattr(func, "__qualname__", type(func).__name__)
        if result is item:
            raise HostedItemError(
                f"pool {self.name!r}: {what}() returned the hosted item itself; hosted items "
                "never leave the server: return plain data instead"
            )
        buffer = io.BytesIO()
        try:
            _ResultPickler(buffer, item).dump(result)
        except HostedItemError as exc:
            raise HostedItemError(f"pool {self.name!r}: {what}(): {exc}") from None
        except Exception as exc:
            raise HostedItemError(
                f"pool {self.name!r}: the result of {what}() cannot be sent to the client "
                f"({type(exc).__name__}: {exc}); return plain data, e.g. cursor.fetchall() "
                "rather than a cursor"
            ) from None
        return buffer.getvalue()

    def __repr__(self) -> str:
        return f"<HostedPool {self.name!r} share={self._share!r}>"


# Named pools registered with register_pool(): one per typeid per server process.
_named: dict[str, HostedPool] = {}
_named_lock = threading.Lock()


class NamedPoolFactory:
    """The picklable callable ``register_pool`` registers: the server's one pool of a typeid."""

    def __init__(self, typeid: str, share: str, options: dict[str, Any]) -> None:
        self.typeid = typeid
        self.share = share
        self.options = options

    def __call__(self) -> HostedPool:
        with _named_lock:
            pool = _named.get(self.typeid)
            if pool is None:
                options = {"name": self.typeid, **self.options}
                pool = _named[self.typeid] = HostedPool(share=self.share, **options)
            return pool

    def __repr__(self) -> str:
        return f"NamedPoolFactory({self.typeid!r}, share={self.share!r})"
