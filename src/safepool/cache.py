"""ProcessLocal: one client per process (or per thread), rebuilt after fork, never shared.

A client cached in a module global (a ``requests.Session``, a database connection, a Redis
client) is copied into every child a ``fork()`` makes, socket and all: parent and child then
talk over one connection and their traffic scrambles, and a child that *closes* its copy can end
the parent's session. :class:`ProcessLocal` keeps one client per process instead:

* :meth:`ProcessLocal.get` returns this process's client, building it with the factory on first
  use. Warm, it reads one attribute: no lock, no system call.
* In a child made by ``fork()`` (raw ``os.fork()``, or multiprocessing's ``fork`` and
  ``forkserver`` start methods) the cache starts out empty. This is done by
  :mod:`safepool._fork`'s single ``os.register_at_fork`` hook, which CPython runs inside
  ``os.fork()`` before any other code runs in the child; that is why the fast path need not call
  ``os.getpid()`` (a system call, slower than the whole ``get()``). Under ``spawn`` nothing is
  inherited: the cache arrives pickled (its recipe, never its client) or is imported afresh.
* Inherited clients are *abandoned* in the child: never handed out, never closed, and kept
  referenced (``_fork.abandon``) so no garbage-collector finaliser closes them either.
* The hook takes no lock: it installs fresh state and a fresh lock, so a fork while another
  thread was inside the factory (holding the build lock) cannot hang the child.

``per_thread=True`` keeps one client per thread (for clients that are not thread-safe). Each
thread's client lives in a :class:`threading.local` *and* in a registry dict of the cache: CPython
frees the other threads' thread-local data in a forked child before any at-fork hook runs, and
the registry keeps those inherited clients alive until the hook abandons it. A thread that exits
has its client closed (see :func:`_thread_exited`).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

from . import _fork
from ._config import check_callable, check_name
from .dbapi import _close_inherited_sockets
from .errors import FactoryError
from .pool import close_item

__all__ = ["ProcessLocal", "per_process"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_numbers = itertools.count(1)


class _Unset:
    """The marker for "no client here yet" (a factory may legitimately return None)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class _Token:
    """Lives in one thread's thread-local data; its death means that thread's data was freed."""

    __slots__ = ("__weakref__",)


def _check_options(
    per_thread: object, close: object, after_fork: object, name: object
) -> str | None:
    """Validate the options shared by ProcessLocal and per_process; return the checked name."""
    if not isinstance(per_thread, bool):
        raise TypeError(
            f"per_thread must be a bool, got {type(per_thread).__name__} {per_thread!r}"
        )
    if close is not None:
        check_callable("close", close)
    if after_fork is not None:
        check_callable("after_fork", after_fork)
        if per_thread:
            raise ValueError(
                "after_fork cannot be combined with per_thread=True: a forked child inherits only "
                "the forking thread's client; use per_thread=False, or drop after_fork (each "
                "thread of the child then builds its own client)"
            )
    return None if name is None else check_name(name)


def _check_factory(factory: object) -> None:
    check_callable("factory", factory)
    try:
        signature = inspect.signature(factory)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return
    try:
        signature.bind()
    except TypeError:
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        label = getattr(factory, "__qualname__", type(factory).__name__)
        raise TypeError(
            f"factory must be callable with no arguments, but {label} requires "
            f"{', '.join(repr(n) for n in required)}; bind them first, e.g. "
            "functools.partial(factory, ...) or a lambda"
        ) from None


def _default_name(factory: Callable[..., object]) -> str:
    qualname = getattr(factory, "__qualname__", None)
    if isinstance(qualname, str) and qualname and "<lambda>" not in qualname:
        return qualname
    return f"process-local-{next(_numbers)}"


def _close_quietly(close: Callable[[Any], object], value: object, name: str) -> bool:
    """Run the close hook on one of this process's clients; log (never raise) a failure."""
    try:
        close(value)
    except Exception as exc:
        logger.warning(
            "process-local %r: closing a %s failed: %s: %s",
            name,
            type(value).__name__,
            type(exc).__name__,
            exc,
        )
        return False
    return True


def _thread_exited(
    threads: dict[weakref.ref[_Token], Any],
    pid: int,
    close: Callable[[Any], object],
    name: str,
    ref: weakref.ref[_Token],
    _getpid: Callable[[], int] = os.getpid,
    _finalizing: Callable[[], bool] = sys.is_finalizing,
) -> None:
    """Weakref callback: a thread's thread-local data was freed, so its token died.

    Normally that thread exited (the callback runs in it, as it ends): close its client. But
    CPython also frees the *other* threads' data in a forked child, before any at-fork hook has
    run: then this pid is not the one that built the client, which is inherited and must be left
    alone (the hook abandons ``threads`` right after). No lock here: in that child, the cache's
    lock may be held by a thread that no longer exists. ``dict.pop`` is atomic, and a client
    already taken by :meth:`ProcessLocal.clear` is not found, so it is closed exactly once.
    """
    if _getpid() != pid or _finalizing():
        return
    value = threads.pop(ref, _UNSET)
    if value is not _UNSET:
        _close_quietly(close, value, name)


def _restore(factory: Callable[[], Any], options: dict[str, Any]) -> ProcessLocal[Any]:
    """Unpickle a ProcessLocal: the same recipe, no client (the receiver builds its own)."""
    return ProcessLocal(factory, **options)


class ProcessLocal(Generic[T]):
    """This process's client, built by ``factory`` on first use; a forked child builds its own.

    ``cache.get()`` (or ``cache()``) returns the client of the calling process, and with
    ``per_thread=True`` of the calling thread. Concurrent first calls build it exactly once.

    :param factory: called with no arguments to build a client (e.g. ``requests.Session``).
    :param per_thread: keep one client per thread instead of one per process, for clients that
        are not thread-safe (sqlite3 connections, psycopg connections used without care). A
        thread's client is closed when the thread exits.
    :param close: how :meth:`clear` closes a client; default: its ``close()`` method, if any.
        Never called on a client inherited across ``fork()``.
    :param after_fork: called in a forked child, at its first :meth:`get` (never inside the fork
        itself), with the client inherited from the parent. Return the client this process should
        use (e.g. the same SQLAlchemy engine after ``engine.dispose(close=False)``), or ``None``
        to abandon it and build a new one with ``factory``. Not with ``per_thread=True``.
    :param name: used in log messages, errors and the repr (default: the factory's name).
    """

    # Slots keep get()'s one attribute read specialised; __dict__ is for functools.wraps (the
    # per_process decorator) and __weakref__ for _fork's registry.
    __slots__ = (
        "__dict__", "__weakref__", "_after_fork", "_building", "_close", "_factory",
        "_inherited", "_local", "_lock", "_per_thread", "_threads", "_value", "name",
    )  # fmt: skip

    # _lock guards the *writes* of _value, _local and _threads (reads are lock-free: each is
    # replaced by one atomic store). While _lock is free:
    #   per_thread=False: _value is this process's client or _UNSET; _local is None; _threads {}
    #   per_thread=True: _value is _UNSET; every live thread's client is in _threads (keyed by
    #     a weakref to the token in that thread's _local) and in _local.value of that thread
    # The process-wide factory runs under _lock (so it runs once); per-thread factories don't.
    _lock: threading.Lock
    _value: T  # or _UNSET
    _local: threading.local | None
    _threads: dict[weakref.ref[_Token], T]
    _building: set[int]  # idents of threads inside the factory: a recursive get() is an error
    # The client inherited across fork(), kept for after_fork until the first get() here.
    _inherited: T  # or _UNSET

    def __init__(
        self,
        factory: Callable[[], T],
        *,
        per_thread: bool = False,
        close: Callable[[T], object] | None = None,
        after_fork: Callable[[T], T | None] | None = None,
        name: str | None = None,
    ) -> None:
        _check_factory(factory)
        checked_name = _check_options(per_thread, close, after_fork, name)
        self.name = checked_name if checked_name is not None else _default_name(factory)
        self._factory = factory
        self._per_thread = per_thread
        self._close: Callable[[T], object] = close if close is not None else close_item
        self._after_fork = after_fork
        self._inherited = _UNSET
        self._init_state()
        _fork.register(self)

    def _init_state(self) -> None:
        """Fresh, empty state: at construction, and in a forked child (so: no lock taken)."""
        self._lock = threading.Lock()
        self._value = _UNSET
        self._local = threading.local() if self._per_thread else None
        self._threads = {}
        self._building = set()

    # -- the fast path ----------------------------------------------------------------------

    def get(self) -> T:
        """This process's client (this thread's, with ``per_thread=True``), built on first use.

        Raises :class:`~safepool.FactoryError` (chained to the cause) if the factory or the
        ``after_fork`` hook raised; nothing is cached then, and the next call tries again.
        """
        value = self._value
        if value is not _UNSET:
            return value
        local = self._local
        if local is not None:
            try:
                return local.value  # type: ignore[no-any-return]
            except AttributeError:
                return self._build_for_thread()
        return self._build()

    __call__ = get

    # -- building (slow paths) --------------------------------------------------------------

    def _build(self) -> T:
        ident = threading.get_ident()
        if ident in self._building:
            raise self._recursion_error()
        with self._lock:
            value = self._value
            if value is not _UNSET:  # another thread built it while we waited
                return value
            self._building.add(ident)
            try:
                inherited = self._inherited
                if inherited is not _UNSET:
                    self._inherited = _UNSET  # after_fork sees each inherited client once
                    value = self._adopt(inherited)
                if value is _UNSET:
                    value = self._call_factory()
            finally:
                self._building.discard(ident)
            self._value = value
        logger.debug("process-local %r: built a client in process %d", self.name, os.getpid())
        return value

    def _build_for_thread(self) -> T:
        ident = threading.get_ident()
        if ident in self._building:
            raise self._recursion_error()
        # Outside the lock: each thread builds its own client, so there is nothing to race for.
        self._building.add(ident)
        try:
            value = self._call_factory()
        finally:
            self._building.discard(ident)
        token, pid = _Token(), os.getpid()
        with self._lock:
            local, threads = self._local, self._threads
            on_exit = functools.partial(_thread_exited, threads, pid, self._close, self.name)
            ref = weakref.ref(token, on_exit)
            threads[ref] = value
            local.token = token  # type: ignore[union-attr]
            local.value = value  # type: ignore[union-attr]
        return value

    def _call_factory(self) -> T:
        try:
            return self._factory()
        except Exception as exc:
            raise FactoryError(
                f"process-local {self.name!r}: the factory raised {type(exc).__name__}"
            ) from exc

    def _adopt(self, inherited: T) -> T:
        """Under the lock, in a forked child: offer the inherited client to after_fork."""
        hook = self._after_fork
        if hook is None:  # pragma: no cover - _inherited is only kept when there is a hook
            return _UNSET  # type: ignore[no-any-return]
        try:
            adopted = hook(inherited)
        except Exception as exc:
            raise FactoryError(
                f"process-local {self.name!r}: the after_fork hook raised {type(exc).__name__}; "
                "the inherited client stays abandoned and the next get() calls the factory"
            ) from exc
        return _UNSET if adopted is None else adopted

    def _recursion_error(self) -> RuntimeError:
        return RuntimeError(
            f"process-local {self.name!r}: get() was called from inside its own factory "
            "(directly or indirectly); the factory must build the client without it"
        )

    # -- clearing ---------------------------------------------------------------------------

    def clear(self) -> int:
        """Close this process's clients (every thread's, with ``per_thread=True``) and forget
        them; the next :meth:`get` builds anew. Returns how many clients were closed.

        Clients inherited across ``fork()`` are never closed. Closing runs outside the lock;
        a close that raises is logged and the rest are still closed. Do not clear while other
        threads are still using their clients.
        """
        with self._lock:
            value, self._value = self._value, _UNSET
            values: list[T] = [] if value is _UNSET else [value]
            threads, old_local = self._threads, self._local
            if self._per_thread:
                self._threads = {}
                self._local = threading.local()  # every thread's next get() builds anew
            values.extend(threads.values())
            threads.clear()  # thread-exit callbacks of these clients now find nothing to close
        # Freeing the old thread-local data (which may run weakref callbacks) and closing both
        # happen outside the lock.
        del old_local
        closed = sum(_close_quietly(self._close, value, self.name) for value in values)
        if values:
            logger.debug("process-local %r: cleared %d client(s)", self.name, len(values))
        return closed

    # -- introspection ----------------------------------------------------------------------

    @property
    def built(self) -> bool:
        """Whether this process (this thread, with ``per_thread=True``) has a client now."""
        local = self._local
        if local is not None:
            return hasattr(local, "value")
        return self._value is not _UNSET

    @property
    def per_thread(self) -> bool:
        return self._per_thread

    def __repr__(self) -> str:
        # Never the factory or the client: either may hold credentials.
        if self._per_thread:
            state = f"per_thread clients={len(self._threads)}"
        else:
            state = "built" if self._value is not _UNSET else "empty"
        return f"<{type(self).__name__} {self.name!r} {state} pid={os.getpid()}>"

    def __reduce__(self) -> str | tuple[Any, ...]:
        """Pickle the recipe, never a client: the receiving process builds its own.

        A cache made by :func:`per_process` at module level pickles by reference, like a
        function, so a spawned child uses the cache its own import of that module created.
        """
        qualname = self.__dict__.get("__qualname__")
        module = sys.modules.get(self.__dict__.get("__module__", ""))
        if qualname is not None and module is not None:
            found: object = module
            for part in qualname.split("."):
                found = getattr(found, part, None)
            if found is self:
                return str(qualname)
        options = {
            "per_thread": self._per_thread,
            "close": None if self._close is close_item else self._close,
            "after_fork": self._after_fork,
            "name": self.name,
        }
        return (_restore, (self._factory, options))

    # -- fork -------------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """In a forked child, before any other code runs there: start empty. No lock taken.

        Every inherited client (and the containers that may hold one) is abandoned: kept
        referenced for the life of this process, never used, never closed. Unless an
        ``after_fork`` callback receives it, the child's copy of a database server connection's
        socket is closed (see :func:`safepool.dbapi._close_inherited_sockets`).
        """
        inherited = self._value
        if inherited is not _UNSET or self._per_thread:
            _fork.abandon((inherited, self._local, self._threads))
        if inherited is not _UNSET and self._after_fork is not None:
            self._inherited = inherited  # the after_fork callback decides what becomes of it
        else:  # never used here: the child's copies of database connections' sockets go
            _close_inherited_sockets([inherited, *self._threads.values()])
        self._init_state()


@overload
def per_process(factory: Callable[[], T], /) -> ProcessLocal[T]: ...


@overload
def per_process(
    *,
    per_thread: bool = False,
    close: Callable[[Any], object] | None = None,
    after_fork: Callable[[Any], Any] | None = None,
    name: str | None = None,
) -> Callable[[Callable[[], T]], ProcessLocal[T]]: ...


def per_process(
    factory: Callable[[], T] | None = None,
    /,
    *,
    per_thread: bool = False,
    close: Callable[[Any], object] | None = None,
    after_fork: Callable[[Any], Any] | None = None,
    name: str | None = None,
) -> ProcessLocal[T] | Callable[[Callable[[], T]], ProcessLocal[T]]:
    """Turn a zero-argument factory function into a :class:`ProcessLocal`.

    Use it bare (``@per_process``) or with the options of :class:`ProcessLocal`
    (``@per_process(per_thread=True, close=...)``). Calling the result returns the calling
    process's client; ``.clear()`` and the rest of :class:`ProcessLocal` are there too. The
    function's name, docstring and module are kept, and a module-level cache pickles by
    reference.
    """
    if factory is not None and not callable(factory):
        raise TypeError(
            "per_process takes the function to decorate, got a "
            f"{type(factory).__name__} object; pass options by keyword, e.g. "
            "@per_process(per_thread=True)"
        )
    _check_options(per_thread, close, after_fork, name)

    def decorate(function: Callable[[], T]) -> ProcessLocal[T]:
        cache = ProcessLocal(
            function, per_thread=per_thread, close=close, after_fork=after_fork, name=name
        )
        functools.update_wrapper(cache, function, updated=())
        return cache

    return decorate if factory is None else decorate(factory)
