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
import itertools
import logging
import pickle
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from . import _sessions
from ._fastpool import TablePool, eligible
from ._protocol import POOL_METHODS
from ._records import LeaseRecord
from ._revoke import (
    RevokedLeases,
    busy_error,
    check_action,
    check_lease_id,
    revoked_error,
    unknown_error,
)
from ._served import ServerChannel, current_channel
from ._sessions import SessionInfo
from .errors import HostedItemError, LeaseError, SafePoolError, TaskAborted
from .pool import SafeConnectionPool, check_pool_options
from .stats import LeaseInfo, PoolStats

__all__ = [
    "SHARE_MODES",
    "HostedPool",
    "NamedPoolFactory",
    "check_fast_path",
    "check_share",
    "close_all",
    "close_pools",
    "forget_named",
    "pack_options",
    "reap_all",
]

logger = logging.getLogger(__name__)

SHARE_MODES = ("hosted", "value")


def check_share(share: Any) -> None:
    if share not in SHARE_MODES:
        raise ValueError(
            f"share must be 'hosted' (items stay in the server) or 'value' (clients get "
            f"copies of picklable items), got {share!r}"
        )


class _Option:
    """A pool option on its way to the server, pickled on its own so that a server that cannot
    unpickle it can say which option it was."""

    __slots__ = ("data", "name")

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpack_option, (self.name, self.data))


def pack_options(options: dict[str, Any]) -> dict[str, Any]:
    """Pool options as they travel to the server (unpacked there as they are unpickled)."""
    return {name: _Option(name, value) for name, value in options.items()}


def _unpack_option(name: str, data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise TypeError(
            f"the server could not unpickle the pool option {name!r} ({type(exc).__name__}: {exc})"
        ) from None


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


class HostedPool:
    """A :class:`SafeConnectionPool` in a manager server, leased by token.

    Only the methods listed in :attr:`EXPOSED` can be called by clients; each is one round trip.
    Each lease is one :class:`~safepool._records.LeaseRecord` (see there for the lock order).
    """

    EXPOSED = POOL_METHODS

    # _lock guards _leases (token -> record). The pool has its own lock; never hold both.
    def __init__(self, *, share: str = "hosted", fast_path: bool = True, **options: Any) -> None:
        check_share(share)
        check_fast_path(fast_path)
        self._fast_reason = _why_not_fast(share, fast_path, options)
        self._pool: Any
        if self._fast_reason is None:
            check_pool_options(**options)
            self._pool = TablePool(**options)
            dispose = self._pool.dispose
        else:
            self._pool = SafeConnectionPool(**options)
            dispose = self._pool.close
        self._table = isinstance(self._pool, TablePool)
        self._leak_timeout: float | None = options.get("leak_timeout")
        self._tracks_holders = self._leak_timeout is not None
        self._share = share
        self._lock = threading.Lock()
        self._leases: dict[int, LeaseRecord] = {}
        self._revoked = RevokedLeases()  # guarded by _lock, like _leases
        self._lease_ids = itertools.count(1)
        # Tokens are random so a stale or stray one never matches a live lease by accident.
        self._tokens = random.Random()
        # When the last proxy goes, the server drops this object: close the pool's items then.
        self._finalizer = weakref.finalize(self, dispose)
        _alive.add(self)
        for hook in tuple(on_new_pool):  # e.g. a metrics collector of every hosted pool
            hook(self)

    @property
    def name(self) -> str:
        name: str = self._pool.name
        return name

    # -- exposed ----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> tuple[int, bytes | None]:
        """Lease an item: ``(token, pickled copy)`` by value, ``(token, None)`` hosted."""
        channel = current_channel()
        item = self._lease_item(timeout, channel)
        try:
            payload = self._dump_value(item) if self._share == "value" else None
            record = self._grant(item, channel)
        except BaseException:
            self._pool.release(item)
            raise
        if channel is not None:
            channel.unacked = record  # given back if the client never takes the reply
        return record.token, payload

    def release(self, token: int, discard: bool = False) -> None:
        """Return the item leased under ``token`` (closing it if ``discard``)."""
        with self._lock:
            record = self._owned(token)
            del self._leases[token]
        self._end(record, discard=discard)

    def reclaim(self, record: LeaseRecord, holder: SessionInfo | None) -> None:
        """Return a lease whose holder process died (called by the server)."""
        if self._remove(record):
            self._end(record, discard=False)
            self._pool._count_reclaimed()
            logger.warning(
                "pool %r: %s ended holding a lease; it is back in the pool",
                self.name,
                holder.describe() if holder else "a client",
            )

    # -- the same-host fast path (by-value pools in a shared table: see safepool._fastpool) --

    def fast_path(self) -> dict[str, Any] | None:
        """What a same-host client needs to lease from the table; None without a table."""
        return self._pool.descriptor() if self._table else None

    def fill(self, reg: int, gen: int, pid: int) -> tuple[int, int] | None:
        """A new item for a fast-path client (see TablePool.fill); given back if the client
        never takes the reply."""
        granted = self._table_pool().fill(reg, gen, pid)
        channel = current_channel()
        if granted is not None and channel is not None:
            channel.unacked = TableGrant(self, *granted)
        return granted

    def release_slot(self, slot: int, token: int, discard: bool = False) -> None:
        self._table_pool().release_slot(slot, token, discard)

    def value(self, slot: int, token: int) -> bytes:
        return self._table_pool().value(slot, token)

    def reap(self) -> None:
        """A client session ended: take back what dead fast-path clients held in the table."""
        if self._table:
            self._pool.reap()

    def _table_pool(self) -> TablePool:
        if not self._table:
            raise LeaseError(f"pool {self.name!r} has no fast path")
        pool: TablePool = self._pool
        return pool

    def cancel_grant(self, record: LeaseRecord | TableGrant) -> None:
        """Take back a lease whose reply the client never took (it was interrupted)."""
        if isinstance(record, TableGrant):
            self._table_pool().take_back(record.slot, record.token)
            return
        if self._remove(record):
            self._end(record, discard=False)
            logger.debug("pool %r: lease %s was never taken; it is back", self.name, record.token)

    def call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Lease an item, run ``func(item, *args, **kwargs)`` here, release: one round trip."""
        item = self._lease_item(timeout, current_channel())
        try:
            result = _run(func, item, args, kwargs, self.name)
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
            record = self._owned(token)
            if record.call_lock is None:
                record.call_lock = threading.Lock()
            call_lock = record.call_lock
        with call_lock:
            if record.dead:
                if record.revoked is not None:
                    raise revoked_error(self.name, record.id, record.revoked)
                raise self._unknown(token)
            try:
                result = _run(func, record.item, args, kwargs, self.name)
            except Exception as exc:
                raise self._sendable(exc, record.item) from None
        return self._dump_result(result, record.item, func)

    def stats(self) -> PoolStats:
        stats: PoolStats = self._pool.stats()
        return stats

    def revoke(self, lease_id: int, action: str = "close") -> LeaseInfo:
        """Take lease ``lease_id`` back from its holder (stopped, hung): ``action="close"``
        closes the item, ``"reset"`` returns it to the pool after the pool's reset hook. The
        holder's later use or release raises LeaseRevoked. Returns the lease as it was."""
        check_lease_id(lease_id)
        check_action(action)
        now = time.time()
        with self._lock:
            record = self._locked_revoke(lease_id, action)
        holder = _sessions.registry.info(record.session)
        try:
            self._end(record, discard=action == "close")
        finally:
            self._pool._count_revoked()  # revoked it is, even if closing or reset was cut short
        info = self._lease_info(record.since, holder, record.id, now)
        logger.warning(
            "pool %r: lease %d held for %.1fs by %s was revoked by an operator; its item was %s",
            self.name,
            record.id,
            info.held_for,
            info.holder,
            "closed" if action == "close" else "returned to the pool",
        )
        return info

    def leases(self) -> list[LeaseInfo]:
        """Who holds each lease, and since when (oldest first)."""
        now = time.time()
        with self._lock:
            records = [(r.since, r.session, r.id) for r in self._leases.values()]
        held: list[tuple[float, SessionInfo | None, int | None]] = [
            (since, _sessions.registry.info(session), lease_id)
            for since, session, lease_id in records
        ]
        if self._table:  # and the leases same-host clients took in the table themselves
            by_pid = {info.pid: info for info in _sessions.registry.sessions()}
            for pid, since, _, by_server in self._pool.holders():
                if not by_server:
                    held.append((since, by_pid.get(pid) or _bare(pid), None))
        held.sort(key=lambda h: h[0])
        return [self._lease_info(since, info, lease_id, now) for since, info, lease_id in held]

    def _lease_info(
        self, since: float, info: SessionInfo | None, lease_id: int | None, now: float
    ) -> LeaseInfo:
        held_for = now - since
        return LeaseInfo(
            holder=info.describe() if info else "a client without a session",
            since=since,
            held_for=held_for,
            pid=info.pid if info else None,
            host=info.host if info else None,
            lease_id=lease_id,
            process=info.process if info else None,
            leaked=self._leak_timeout is not None and held_for >= self._leak_timeout,
        )

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> dict[str, Any]:
        stats = self._pool.stats()
        return {
            "name": stats.name,
            "share": self._share,
            "max_size": stats.max_size,
            "fast_path": self._table,
            "fast_path_reason": self._fast_reason,
        }

    # -- internals --------------------------------------------------------------------------

    def _lease_item(self, timeout: float | None, channel: ServerChannel | None) -> Any:
        """Lease from the pool; a wait is cancelled if the client goes away meanwhile."""
        claim = self._pool._new_claim()
        try:
            return self._pool._acquire_into(claim, timeout, channel)
        except BaseException:
            self._pool._settle(claim)
            raise

    def _grant(self, item: Any, channel: ServerChannel | None) -> LeaseRecord:
        """A new lease record for ``item``, registered with the pool and the holder's session."""
        session = channel.session if channel is not None else None
        token = self._tokens.getrandbits(63)
        record = LeaseRecord(self, token, item, session, next(self._lease_ids))
        with self._lock:
            if token in self._leases:  # pragma: no cover - one in 2**63
                record.token = token = max(self._leases) + 1
            self._leases[token] = record
        if session is not None:
            if not _sessions.registry.add_lease(record):
                # The client's process ended while it waited: the item goes straight back.
                if self._remove(record):
                    self._end(record, discard=False)
                raise SafePoolError("the client's session ended before its lease was granted")
            if self._tracks_holders:
                info = _sessions.registry.info(session)
                if info is not None:
                    self._pool._set_holder(item, info.describe())
        return record

    def _owned(self, token: int) -> LeaseRecord:
        """Under _lock: the lease ``token``, if the calling process holds it."""
        record = self._leases.get(token)
        channel = current_channel()
        session = channel.session if channel is not None else None
        if record is None:
            raise self._revoked.error(self.name, token, session) or self._unknown(token)
        if record.session is not None and session is not None and record.session != session:
            raise LeaseError(
                f"pool {self.name!r}: lease {token!r} is held by another process; a lease can "
                "only be used and released by the process that took it"
            )
        return record

    def _locked_revoke(self, lease_id: int, action: str) -> LeaseRecord:
        """Under _lock: the transition that revokes lease ``lease_id``. Raises, changing
        nothing, if it is not held or a call on its item is running (see safepool._revoke)."""
        record = next((r for r in self._leases.values() if r.id == lease_id), None)
        if record is None:
            raise unknown_error(self.name, lease_id, sorted(r.id for r in self._leases.values()))
        call_lock = record.call_lock
        if call_lock is not None and call_lock.locked():
            raise busy_error(self.name, lease_id)
        self._revoked.add(record.token, record.id, action, record.session)
        record.revoked = action
        del self._leases[record.token]
        return record

    def _remove(self, record: LeaseRecord) -> bool:
        """Take ``record`` out of _leases; False if it had ended already."""
        with self._lock:
            if self._leases.get(record.token) is not record:
                return False
            del self._leases[record.token]
            return True

    def _end(self, record: LeaseRecord, *, discard: bool) -> None:
        """A lease removed from _leases ends: after any call in flight, its item goes back."""
        try:
            record.finish()
            if record.session is not None:
                _sessions.registry.remove_lease(record)
        finally:
            self._pool.release(record.item, discard=discard)

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


def _run(
    func: Callable[..., Any],
    item: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any] | None,
    pool: str,
) -> Any:
    """Run a client's function on a hosted item. A ``SystemExit``, ``KeyboardInterrupt`` or
    other ``BaseException`` it raises becomes a :class:`TaskAborted`: it must neither end a
    server thread (the client would see a dead server) nor reach the client as itself."""
    try:
        return func(item, *args, **(kwargs or {}))
    except Exception:
        raise
    except BaseException as exc:
        what = getattr(func, "__qualname__", type(func).__name__)
        raise TaskAborted(
            f"pool {pool!r}: {what}() raised {type(exc).__name__}({exc}) in the server; "
            "the server keeps serving",
            exc_type=type(exc).__qualname__,
            exc_message=str(exc),
        ) from None


# Every HostedPool of this (server) process, for close_all() at shutdown.
_alive: weakref.WeakSet[HostedPool] = weakref.WeakSet()
# Called with each new HostedPool of this process (safepool.metrics observes them from birth).
on_new_pool: list[Callable[[HostedPool], None]] = []


class TableGrant:
    """A lease a ``fill`` reply carried, until the client takes the reply (see _served)."""

    __slots__ = ("pool", "slot", "token")

    def __init__(self, pool: HostedPool, slot: int, token: int) -> None:
        self.pool = pool
        self.slot = slot
        self.token = token

    def take_back(self) -> None:
        """The client never took the reply: the slot goes back to the pool."""
        self.pool.cancel_grant(self)


def check_fast_path(fast_path: Any) -> None:
    if not isinstance(fast_path, bool):
        raise TypeError(f"fast_path must be a bool, got {type(fast_path).__name__}")


def _why_not_fast(share: str, fast_path: bool, options: dict[str, Any]) -> str | None:
    if share != "value":
        return "hosted items stay in the server: every lease is a round trip"
    if not fast_path:
        return "turned off (fast_path=False)"
    return eligible(options)


def _bare(pid: int) -> SessionInfo:
    return SessionInfo("", pid, socket.gethostname(), "a same-host process", 0.0)


def reap_all() -> None:
    """A session ended: let every table pool take back what dead clients held."""
    for pool in list(_alive):
        try:
            pool.reap()
        except Exception:
            logger.exception("pool %r: reaping dead clients failed", pool.name)


def close_all() -> None:
    """Close every pool this server hosts, and so their items (at server shutdown)."""
    close_pools(list(_alive))
    with _named_lock:
        _named.clear()


def close_pools(objects: list[Any]) -> None:
    """Close the hosted pools among ``objects`` (one server's, when it is stopped)."""
    for pool in objects:
        if not isinstance(pool, HostedPool):
            continue
        try:
            pool.close()
            pool._finalizer()  # a table pool also removes its table from the host
            if pool._table:  # and, the server stopping, this process's descriptor of it
                pool._pool._table.segment.close()
        except Exception:
            logger.exception("closing pool %r at shutdown failed", pool.name)


def forget_named(typeids: list[str]) -> list[HostedPool]:
    """Remove the named pools of ``typeids`` (a stopped server's): a server started later in
    this process makes new ones. Returns them, to be closed."""
    with _named_lock:
        return [pool for typeid in typeids if (pool := _named.pop(typeid, None)) is not None]


# Named pools registered with register_pool(): one per typeid per server process.
_named: dict[str, HostedPool] = {}
_named_lock = threading.Lock()


class NamedPoolFactory:
    """The picklable callable ``register_pool`` registers: the server's one pool of a typeid."""

    def __init__(
        self, typeid: str, share: str, options: dict[str, Any], fast_path: bool = True
    ) -> None:
        self.typeid = typeid
        self.share = share
        self.options = options
        self.fast_path = fast_path

    def __call__(self) -> HostedPool:
        with _named_lock:
            pool = _named.get(self.typeid)
            if pool is None:
                options = {"name": self.typeid, **self.options}
                pool = _named[self.typeid] = HostedPool(
                    share=self.share, fast_path=self.fast_path, **options
                )
            return pool

    def __repr__(self) -> str:
        return f"NamedPoolFactory({self.typeid!r}, share={self.share!r})"
