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
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _sessions
from ._sessions import SessionInfo, current_session
from .errors import HostedItemError, LeaseError, SafePoolError
from .pool import SafeConnectionPool
from .stats import LeaseInfo, PoolStats

__all__ = ["SHARE_MODES", "HostedPool", "NamedPoolFactory", "check_share", "close_all"]

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
    __slots__ = ("dead", "item", "lock", "session", "since")

    def __init__(self, item: Any, session: str | None) -> None:
        self.item = item
        self.session = session  # the holder process's session (None: a stdlib client)
        self.since = time.time()
        # Made on the first call_leased, under HostedPool._lock; serialises calls on this lease
        # and makes its end wait for a call in flight. dead: ended (set under lock, if any).
        self.lock: threading.Lock | None = None
        self.dead = False


class HostedPool:
    """A :class:`SafeConnectionPool` in a manager server, leased by token.

    Only the methods listed in :attr:`EXPOSED` can be called by clients; each is one round trip.
    """

    EXPOSED = (
        "acquire", "release", "call", "call_leased", "stats", "leases", "close", "describe",
    )  # fmt: skip

    # _lock guards _leases (token -> lease) and each lease's lock creation. The pool has its own
    # lock; never hold both. A lease ends (release, reclaim) by leaving _leases under _lock, then
    # being marked dead under its own lock, and only then is its item given back to the pool.
    def __init__(self, *, share: str = "hosted", **options: Any) -> None:
        check_share(share)
        self._pool: SafeConnectionPool[Any] = SafeConnectionPool(**options)
        self._tracks_holders = options.get("leak_timeout") is not None
        self._share = share
        self._lock = threading.Lock()
        self._leases: dict[int, _Lease] = {}
        # Tokens are random so a stale or stray one never matches a live lease by accident.
        self._tokens = random.Random()
        # When the last proxy goes, the server drops this object: close the pool's items then.
        self._finalizer = weakref.finalize(self, self._pool.close)
        _alive.add(self)

    @property
    def name(self) -> str:
        return self._pool.name

    # -- exposed ----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> tuple[int, bytes | None]:
        """Lease an item: ``(token, pickled copy)`` by value, ``(token, None)`` hosted."""
        item = self._pool.acquire(timeout)
        session = current_session()
        try:
            payload = self._dump_value(item) if self._share == "value" else None
            token = self._register(item, session)
        except BaseException:
            self._pool.release(item)
            raise
        if session is not None:
            if not _sessions.registry.add_lease(session, self, token):
                # The client's process ended while it waited: the item goes straight back.
                self._end(token, discard=False, reclaimed=True)
                raise SafePoolError("the client's session ended before its lease was granted")
            if self._tracks_holders:
                info = _sessions.registry.info(session)
                if info is not None:
                    self._pool._set_holder(item, info.describe())
        return token, payload

    def release(self, token: int, discard: bool = False) -> None:
        """Return the item leased under ``token`` (closing it if ``discard``)."""
        self._end(token, discard=discard, reclaimed=False)

    def reclaim(self, token: int, holder: SessionInfo | None) -> None:
        """Return a lease whose holder process died (called by the server)."""
        if self._end(token, discard=False, reclaimed=True):
            logger.warning(
                "pool %r: %s ended holding a lease; it is back in the pool",
                self.name,
                holder.describe() if holder else "a client",
            )

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
            lease = self._owned(token)
            if lease.lock is None:
                lease.lock = threading.Lock()
            lock = lease.lock
        with lock:
            if lease.dead:
                raise self._unknown(token)
            try:
                result = func(lease.item, *args, **(kwargs or {}))
            except Exception as exc:
                raise self._sendable(exc, lease.item) from None
        return self._dump_result(result, lease.item, func)

    def stats(self) -> PoolStats:
        return self._pool.stats()

    def leases(self) -> list[LeaseInfo]:
        """Who holds each lease taken with acquire(), and since when (oldest first)."""
        now = time.time()
        with self._lock:
            held = [(lease.since, lease.session) for lease in self._leases.values()]
        out = []
        for since, session in sorted(held, key=lambda h: h[0]):
            info = _sessions.registry.info(session)
            out.append(
                LeaseInfo(
                    holder=info.describe() if info else "a client without a session",
                    since=since,
                    held_for=now - since,
                    pid=info.pid if info else None,
                    host=info.host if info else None,
                )
            )
        return out

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> dict[str, Any]:
        stats = self._pool.stats()
        return {"name": stats.name, "share": self._share, "max_size": stats.max_size}

    # -- internals --------------------------------------------------------------------------

    def _register(self, item: Any, session: str | None) -> int:
        token = self._tokens.getrandbits(63)
        with self._lock:
            while token in self._leases:  # pragma: no cover - one in 2**63
                token = self._tokens.getrandbits(63)
            self._leases[token] = _Lease(item, session)
        return token

    def _owned(self, token: int) -> _Lease:
        """Under _lock: the lease ``token``, if the calling process holds it."""
        lease = self._leases.get(token)
        if lease is None:
            raise self._unknown(token)
        session = current_session()
        if lease.session is not None and session is not None and lease.session != session:
            raise LeaseError(
                f"pool {self.name!r}: lease {token!r} is held by another process; a lease can "
                "only be used and released by the process that took it"
            )
        return lease

    def _end(self, token: int, *, discard: bool, reclaimed: bool) -> bool:
        """End a lease and give its item back; False if there was no such lease to reclaim."""
        with self._lock:
            if reclaimed:
                lease = self._leases.pop(token, None)
                if lease is None:
                    return False
            else:
                lease = self._owned(token)
                del self._leases[token]
        if lease.lock is not None:
            with lease.lock:  # wait for a call in flight on this item
                lease.dead = True
        else:
            lease.dead = True
        if lease.session is not None:
            _sessions.registry.remove_lease(lease.session, self, token)
        self._pool.release(lease.item, discard=discard)
        if reclaimed:
            self._pool._count_reclaimed()
        return True

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


# Every HostedPool of this (server) process, for close_all() at shutdown.
_alive: weakref.WeakSet[HostedPool] = weakref.WeakSet()


def close_all() -> None:
    """Close every pool this server hosts, and so their items (at server shutdown)."""
    for pool in list(_alive):
        try:
            pool.close()
        except Exception:
            logger.exception("closing pool %r at shutdown failed", pool.name)


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
