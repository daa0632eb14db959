"""Worker helpers: give pool workers a lock, a semaphore or shared memory, and end them safely.

A ``multiprocessing.Lock`` reaches a worker process only while the worker starts: as a task
argument it fails ("Lock objects should only be shared between processes through inheritance"),
as a module global it is a different lock in every spawn or forkserver worker, and one made in a
fork context crashes a spawn worker on Python 3.10 and is refused by 3.11+. :class:`WorkerSetup`
makes the objects from the pool's own context and hands them to each worker through the pool's
initializer, where task code finds them with :func:`worker_resource`::

    setup = safepool.WorkerSetup(context="spawn")
    setup.lock("counter_lock")
    counter = setup.value("counter", "i", 0, lock=False)
    with setup.Pool(4) as pool:
        pool.map(task, range(100))

    def task(i):  # in a worker
        with safepool.worker_resource("counter_lock"):
            ...

``setup.Pool()`` and ``setup.executor()`` run on safepool's own process pool
(:mod:`safepool.workerpool`): a worker that dies fails only the task it was running, with
:class:`~safepool.WorkerLost`; ``terminate()`` escalates to SIGKILL; tasks can have time limits.
``pool_kwargs()`` hands the same set-up to a stdlib ``Pool`` or ``ProcessPoolExecutor``.

The same initializer makes workers signal-safe (see :mod:`safepool._signals`): SIGTERM ends a
worker through :class:`WorkerTerminated`, so ``Pool.terminate()`` cannot hang; Ctrl+C is left to
the parent; the parent's signal and atexit handlers do not run in workers. :func:`safe_task`
turns a ``SystemExit`` or ``KeyboardInterrupt`` raised by a task into an ordinary error result.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from multiprocessing import context as mp_context
from multiprocessing import heap, managers, queues, shared_memory, sharedctypes, synchronize
from multiprocessing.context import BaseContext
from typing import Any, Generic, NoReturn, ParamSpec, TypeVar

from ._config import check_callable, check_count, check_duration, check_name
from ._signals import TERMINATED_EXIT_CODE, WorkerTerminated, make_worker_signal_safe
from .errors import TaskAborted, WorkerResourceError
from .workerpool import DEFAULT_TERMINATE_GRACE, WorkerExecutor, WorkerPool

__all__ = [
    "TERMINATED_EXIT_CODE",
    "WorkerSetup",
    "WorkerTerminated",
    "safe_task",
    "worker_resource",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# The resources of this worker process: set by the pool's initializer, None elsewhere.
_worker_resources: dict[str, object] | None = None

# Types that synchronise threads of one process, never processes.
_THREAD_MODULES = frozenset({"_thread", "threading", "queue", "_queue", "asyncio.locks",
                             "asyncio.queues"})  # fmt: skip
_CTYPES = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)
_ACCEPTED = (
    "multiprocessing synchronisation objects (Lock, RLock, Semaphore, BoundedSemaphore, "
    "Condition, Event, Barrier), shared memory (Value, Array, RawValue, RawArray, "
    "shared_memory.SharedMemory), multiprocessing queues, or Manager proxies"
)
_get_spawning_popen: Callable[[], Any] = getattr(mp_context, "get_spawning_popen")  # noqa: B009


def _describe(value: object) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


def _resolve_context(context: object) -> BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if context is None:
        return multiprocessing.get_context(multiprocessing.get_start_method())
    if isinstance(context, str):
        if context not in methods:
            raise ValueError(f"context must be one of {methods} or a context, got {context!r}")
        return multiprocessing.get_context(context)
    if isinstance(context, BaseContext):
        return multiprocessing.get_context(context.get_start_method())
    raise TypeError(
        "context must be a start method name, a multiprocessing context "
        f"(multiprocessing.get_context(...)) or None, got a {type(context).__name__}"
    )


def _semlocks(obj: object, depth: int = 0) -> Iterator[synchronize.SemLock]:
    """The SemLocks inside a multiprocessing object (a Queue holds three, an Event two...)."""
    if isinstance(obj, synchronize.SemLock):
        yield obj
        return
    if depth >= 3 or not type(obj).__module__.startswith("multiprocessing"):
        return
    for value in getattr(obj, "__dict__", {}).values():
        yield from _semlocks(value, depth + 1)


def _made_for_fork(lock: synchronize.SemLock) -> bool:
    """Whether ``lock`` was created in a fork context, on CPython 3.10-3.13.

    3.11+ record it as ``_is_fork_ctx``. On every version a fork-context SemLock is unlinked at
    once and has no name, which is what a spawn or forkserver worker would need to open it.
    """
    if sys.platform == "win32":  # pragma: no cover - there is no fork there
        return False
    if getattr(lock, "_is_fork_ctx", False):
        return True
    return getattr(getattr(lock, "_semlock", None), "name", "") is None


def _check_shareable(name: str, obj: object) -> None:
    """``obj`` must be shared between processes, not merely copied: TypeError otherwise."""
    module = type(obj).__module__
    if module in _THREAD_MODULES:
        kind = f"{module.lstrip('_')}.{type(obj).__name__}".replace("thread.lock", "threading.Lock")
        raise TypeError(
            f"resource {name!r}: a {kind} synchronises the threads of one process; each worker "
            "process would get its own copy (fork) or fail to receive it (spawn, forkserver). "
            f"Use the multiprocessing equivalent from this setup's context, e.g. "
            f"setup.lock({name!r}) or setup.add({name!r}, setup.context.Lock())"
        )
    if isinstance(
        obj,
        (synchronize.SemLock, synchronize.Condition, synchronize.Event, synchronize.Barrier,
         sharedctypes.SynchronizedBase, queues.Queue, queues.SimpleQueue, managers.BaseProxy,
         shared_memory.SharedMemory),
    ):  # fmt: skip
        return
    if isinstance(obj, _CTYPES):
        if isinstance(getattr(obj, "_wrapper", None), heap.BufferWrapper):
            return  # RawValue / RawArray: in shared memory
        raise TypeError(
            f"resource {name!r}: this {type(obj).__name__} is ordinary process memory, so each "
            f"worker would see its own copy; make it with setup.value({name!r}, ...) or "
            f"setup.array({name!r}, ...)"
        )
    raise TypeError(
        f"resource {name!r}: add() takes {_ACCEPTED}; got a {_describe(obj)}. Plain data is "
        "copied into each worker, not shared: pass it in initargs or in task arguments"
    )


class WorkerSetup:
    """Locks, semaphores and shared memory for the workers of a pool, and how workers start.

    :param context: the multiprocessing context every object is made in and the pool must use:
        a start method name (``"fork"``, ``"spawn"``, ``"forkserver"``), a context object, or
        ``None`` for the default context (fixed here, as creating any multiprocessing object
        fixes it).

    Each resource has a unique name (a non-empty str). The methods named after a
    multiprocessing type make one from :attr:`context` and return it, for the parent's own use;
    :meth:`add` takes one made elsewhere and validates it. Then :meth:`Pool`, :meth:`executor`,
    or :meth:`pool_kwargs` for a pool you create, hand the resources to every worker, where
    :func:`worker_resource` returns them. A pool gets the resources that exist when it is set
    up. Not picklable: a task uses :func:`worker_resource`, not the setup.
    """

    # _lock guards _resources: names unique, every value validated for this context.
    _lock: threading.Lock
    _resources: dict[str, object]

    def __init__(self, *, context: str | BaseContext | None = None) -> None:
        self._context = _resolve_context(context)
        self.start_method: str = self._context.get_start_method()
        self._lock = threading.Lock()
        self._resources = {}

    @property
    def context(self) -> BaseContext:
        """The context of the resources; the pool must be created from it."""
        return self._context

    @property
    def resources(self) -> Mapping[str, object]:
        """A read-only snapshot of the resources, by name."""
        with self._lock:
            return types.MappingProxyType(dict(self._resources))

    # -- making resources -----------------------------------------------------------------------

    def lock(self, name: str) -> synchronize.Lock:
        """A new ``Lock`` shared by the workers (and this process)."""
        self._check_free(name)
        return self._register(name, self._context.Lock())

    def rlock(self, name: str) -> synchronize.RLock:
        """A new ``RLock``: the process (thread) holding it may acquire it again."""
        self._check_free(name)
        return self._register(name, self._context.RLock())

    def semaphore(self, name: str, value: int = 1) -> synchronize.Semaphore:
        """A new ``Semaphore`` with ``value`` permits."""
        self._check_free(name)
        check_count("value", value, minimum=0)
        return self._register(name, self._context.Semaphore(value))

    def bounded_semaphore(self, name: str, value: int = 1) -> synchronize.BoundedSemaphore:
        """A new ``BoundedSemaphore``: releasing more than ``value`` permits raises."""
        self._check_free(name)
        check_count("value", value, minimum=0)
        return self._register(name, self._context.BoundedSemaphore(value))

    def condition(self, name: str, lock: object = None) -> synchronize.Condition:
        """A new ``Condition``, over ``lock`` (a Lock or RLock of this context) or a new RLock."""
        self._check_free(name)
        if lock is not None:
            self._check_lock_arg(name, lock)
        return self._register(name, self._context.Condition(lock))  # type: ignore[arg-type]

    def event(self, name: str) -> synchronize.Event:
        """A new ``Event``."""
        self._check_free(name)
        return self._register(name, self._context.Event())

    def barrier(
        self, name: str, parties: int, *, timeout: float | None = None
    ) -> synchronize.Barrier:
        """A new ``Barrier`` for ``parties`` processes (a worker blocks in it: mind pool size)."""
        self._check_free(name)
        check_count("parties", parties, minimum=1)
        if timeout is not None:
            check_duration("timeout", timeout, allow_zero=False, allow_inf=False)
        return self._register(name, self._context.Barrier(parties, timeout=timeout))

    def value(self, name: str, typecode_or_type: Any, *args: Any, lock: object = True) -> Any:
        """A ctypes value in shared memory, as ``multiprocessing.Value`` makes it.

        ``lock=True`` wraps it with a new RLock of this context (``get_lock()``); ``False``
        returns the raw value (no lock: guard it with a lock of your own); a Lock or RLock of
        this context is used as the wrapper's lock.
        """
        self._check_free(name)
        _check_ctype(typecode_or_type)
        if not isinstance(lock, bool):
            self._check_lock_arg(name, lock)
        made = self._context.Value(typecode_or_type, *args, lock=lock)  # type: ignore[call-overload]
        return self._register(name, made)

    def array(
        self, name: str, typecode_or_type: Any, size_or_initializer: Any, *, lock: object = True
    ) -> Any:
        """A ctypes array in shared memory, as ``multiprocessing.Array`` makes it (see value())."""
        self._check_free(name)
        _check_ctype(typecode_or_type)
        if isinstance(size_or_initializer, int):
            check_count("size_or_initializer", size_or_initializer, minimum=0)
        if not isinstance(lock, bool):
            self._check_lock_arg(name, lock)
        made = self._context.Array(
            typecode_or_type,
            size_or_initializer,
            lock=lock,  # type: ignore[call-overload]
        )
        return self._register(name, made)

    def queue(self, name: str, maxsize: int = 0) -> queues.Queue[Any]:
        """A new ``multiprocessing.Queue`` (0: unbounded)."""
        self._check_free(name)
        check_count("maxsize", maxsize, minimum=0)
        made: queues.Queue[Any] = self._context.Queue(maxsize)
        return self._register(name, made)

    def add(self, name: str, obj: R) -> R:
        """Share an existing object with the workers; returns it.

        Accepts multiprocessing synchronisation objects, shared memory, multiprocessing queues
        and Manager proxies. A ``threading`` object raises TypeError; an object whose locks were
        made in a fork context, given to a spawn or forkserver setup, raises ValueError (its
        workers could not use them).
        """
        self._check_free(name)
        _check_shareable(name, obj)
        self._check_context(f"resource {name!r}", name, obj)
        return self._register(name, obj)

    # -- handing them to a pool -----------------------------------------------------------------

    def pool_kwargs(
        self,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] | list[Any] = (),
        signal_safe: bool = True,
    ) -> dict[str, Any]:
        """``initializer`` and ``initargs`` for ``Pool(...)`` or ``ProcessPoolExecutor(...)``.

        The pool must come from :attr:`context` (``setup.context.Pool(4, **kwargs)``,
        ``ProcessPoolExecutor(4, mp_context=setup.context, **kwargs)``). In each worker the
        initializer makes the worker signal-safe (unless ``signal_safe=False``), makes the
        resources available to :func:`worker_resource`, then calls ``initializer(*initargs)``.
        """
        if initializer is not None:
            check_callable("initializer", initializer)
        if not isinstance(initargs, (tuple, list)):
            raise TypeError(f"initargs must be a tuple, got a {type(initargs).__name__}")
        if initargs and initializer is None:
            raise ValueError("initargs were given without an initializer to receive them")
        _check_bool("signal_safe", signal_safe)
        with self._lock:
            shipment = _Shipment(self.start_method, dict(self._resources))
        return {
            "initializer": _init_worker,
            "initargs": (shipment, signal_safe, initializer, tuple(initargs)),
        }

    def Pool(
        self,
        processes: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] | list[Any] = (),
        maxtasksperchild: int | None = None,
        max_memory_per_child: int | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        terminate_grace: float = DEFAULT_TERMINATE_GRACE,
        signal_safe: bool = True,
        name: str | None = None,
    ) -> WorkerPool:
        """A :class:`~safepool.WorkerPool` (the ``multiprocessing.Pool`` interface) of this
        context whose workers get the resources; a dead worker fails only its task.

        ``processes`` defaults to the CPU count. ``maxtasksperchild`` and
        ``max_memory_per_child`` (bytes of resident memory, checked between tasks) replace a
        worker without losing queued tasks; ``soft_time_limit`` and ``time_limit`` (seconds)
        are the default limits of every task (each call can set its own); ``terminate_grace``
        is the time between SIGTERM and SIGKILL in ``terminate()``.
        """
        kwargs = self.pool_kwargs(
            initializer=initializer, initargs=initargs, signal_safe=signal_safe
        )
        return WorkerPool(processes, context=self._context, max_tasks_per_child=maxtasksperchild,
                          max_memory_per_child=max_memory_per_child,
                          soft_time_limit=soft_time_limit, time_limit=time_limit,
                          terminate_grace=terminate_grace, name=name, **kwargs)  # fmt: skip

    def executor(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] | list[Any] = (),
        max_tasks_per_child: int | None = None,
        max_memory_per_child: int | None = None,
        soft_time_limit: float | None = None,
        time_limit: float | None = None,
        terminate_grace: float = DEFAULT_TERMINATE_GRACE,
        signal_safe: bool = True,
        name: str | None = None,
    ) -> WorkerExecutor:
        """A :class:`~safepool.WorkerExecutor` (a ``concurrent.futures.Executor``) of this
        context whose workers get the resources; a dead worker fails only its task's future,
        never the executor. Options as for :meth:`Pool`."""
        kwargs = self.pool_kwargs(
            initializer=initializer, initargs=initargs, signal_safe=signal_safe
        )
        return WorkerExecutor(max_workers, context=self._context,
                              max_tasks_per_child=max_tasks_per_child,
                              max_memory_per_child=max_memory_per_child,
                              soft_time_limit=soft_time_limit, time_limit=time_limit,
                              terminate_grace=terminate_grace, name=name, **kwargs)  # fmt: skip

    def __repr__(self) -> str:
        with self._lock:
            names = sorted(self._resources)
        return f"<{type(self).__name__} {self.start_method!r} resources={names}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError(
            "a WorkerSetup stays in the process that made it; in a task, get a resource with "
            "safepool.worker_resource(name)"
        )

    # -- internals ------------------------------------------------------------------------------

    def _check_free(self, name: object) -> None:
        check_name(name)
        with self._lock:
            if name in self._resources:
                raise ValueError(
                    f"a resource named {name!r} already exists in this WorkerSetup "
                    f"({type(self._resources[name]).__name__}); choose another name"
                )

    def _register(self, name: str, obj: T) -> T:
        with self._lock:
            if name in self._resources:  # another thread took the name meanwhile
                raise ValueError(f"a resource named {name!r} already exists in this WorkerSetup")
            self._resources[name] = obj
        return obj

    def _check_lock_arg(self, name: str, lock: object) -> None:
        if not isinstance(lock, (synchronize.Lock, synchronize.RLock, managers.BaseProxy)):
            raise TypeError(
                f"lock must be a Lock or RLock of this setup's context (or True/False for a "
                f"value), got a {_describe(lock)}; make one with setup.lock()"
            )
        self._check_context(f"the lock given for {name!r}", name, lock)

    def _check_context(self, what: str, name: str, obj: object) -> None:
        if self.start_method == "fork":
            return  # a forked worker inherits every lock, whatever context made it
        if any(_made_for_fork(lock) for lock in _semlocks(obj)):
            raise ValueError(
                f"{what} was made in the 'fork' context (multiprocessing.Lock() and friends use "
                "the default context, which is 'fork' on Linux before Python 3.14), but this "
                f"WorkerSetup uses the {self.start_method!r} context: its workers cannot open it "
                "(Python 3.10 workers crash on it, 3.11+ refuse it). Make it with this setup "
                f"(e.g. setup.lock({name!r})) or from setup.context"
            )


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got a {type(value).__name__}")


def _check_ctype(typecode_or_type: object) -> None:
    if isinstance(typecode_or_type, str):
        codes: Mapping[str, object] = getattr(sharedctypes, "typecode_to_type")  # noqa: B009
        if typecode_or_type not in codes:
            raise ValueError(
                f"typecode_or_type must be an array-module typecode ({''.join(sorted(codes))}) "
                f"or a ctypes type, got {typecode_or_type!r}"
            )
    elif not (isinstance(typecode_or_type, type) and issubclass(typecode_or_type, _CTYPES)):
        raise TypeError(
            "typecode_or_type must be a typecode such as 'i' or 'd', or a ctypes type, "
            f"got {typecode_or_type!r}"
        )


class _Shipment:
    """The resources on their way to a worker, in the initializer's arguments."""

    __slots__ = ("objects", "start_method")

    def __init__(self, start_method: str, objects: dict[str, object]) -> None:
        self.start_method = start_method
        self.objects = objects

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled only while a spawn or forkserver worker starts (a forked worker inherits it).
        popen = _get_spawning_popen()
        if popen is None:
            raise RuntimeError(
                "safepool worker resources reach a worker only as it starts, through the "
                "initializer of pool_kwargs(); they cannot be pickled otherwise (e.g. in task "
                "arguments)"
            )
        forked = sorted(
            name
            for name, obj in self.objects.items()
            if any(_made_for_fork(lock) for lock in _semlocks(obj))
        )
        if forked:
            method = getattr(popen, "method", type(popen).__module__)
            raise ValueError(
                f"resources {forked} of a WorkerSetup(context={self.start_method!r}) are being "
                f"sent to a worker started with {method!r}, which cannot open locks made for "
                "fork. Create the pool from the setup: setup.Pool(), setup.executor(), "
                "setup.context.Pool(..., **setup.pool_kwargs()) or "
                "ProcessPoolExecutor(..., mp_context=setup.context, **setup.pool_kwargs())"
            )
        return (_Shipment, (self.start_method, self.objects))


def _init_worker(
    shipment: _Shipment,
    signal_safe: bool,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    """The initializer of every worker set up by a WorkerSetup (see pool_kwargs())."""
    global _worker_resources
    if signal_safe:
        make_worker_signal_safe()
    _worker_resources = shipment.objects
    if initializer is not None:
        initializer(*initargs)


def worker_resource(name: str) -> Any:
    """In a worker of a pool set up by a :class:`WorkerSetup`: the resource named ``name``.

    Raises :class:`~safepool.WorkerResourceError` (a ``LookupError``) in any other process, or
    for a name the setup did not have when the pool was created.
    """
    check_name(name)
    resources = _worker_resources
    if resources is None:
        raise WorkerResourceError(
            f"worker_resource({name!r}): process {os.getpid()} is not a pool worker set up by "
            "safepool.WorkerSetup. Create the pool with setup.Pool() or setup.executor(), or pass "
            "**setup.pool_kwargs() to it, and call worker_resource() from task code"
        )
    try:
        return resources[name]
    except KeyError:
        raise WorkerResourceError(
            f"worker_resource({name!r}): this worker has no resource of that name; it has "
            f"{sorted(resources)}. Add it to the WorkerSetup (setup.lock({name!r}), "
            f"setup.add({name!r}, obj), ...) before the pool is created"
        ) from None


class _SafeTask(Generic[P, R]):
    """A task function whose ``SystemExit``/``KeyboardInterrupt``/... becomes TaskAborted."""

    __module__: str
    __qualname__: str

    def __init__(self, fn: Callable[P, R]) -> None:
        self.__wrapped__ = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return self.__wrapped__(*args, **kwargs)
        except BaseException as exc:
            if isinstance(exc, (Exception, WorkerTerminated)):
                raise
            if multiprocessing.parent_process() is None:
                raise  # not in a worker: Ctrl+C and sys.exit() keep their meaning
            raise _aborted(self, exc) from exc

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Decorated at module level: the module attribute is this object; pickle it by name,
        # as pickle does the function. Wrapped at the call site: pickle the function inside.
        target: Any = sys.modules.get(self.__module__)
        for part in self.__qualname__.split("."):
            target = getattr(target, part, None)
        if target is self:
            return str(self.__qualname__)
        return (_SafeTask, (self.__wrapped__,))

    def __repr__(self) -> str:
        return f"<safe_task {self.__module__}.{self.__qualname__}>"


def _aborted(task: _SafeTask[Any, Any], exc: BaseException) -> TaskAborted:
    kind = type(exc)
    type_name = kind.__qualname__ if kind.__module__ == "builtins" else _describe(exc)
    detail = f": {exc}" if str(exc) else ""
    name = getattr(task.__wrapped__, "__qualname__", None) or repr(task.__wrapped__)
    return TaskAborted(
        f"task {name} raised {type_name}{detail} in worker process {os.getpid()}",
        exc_type=type_name,
        exc_message=str(exc),
    )


def safe_task(fn: Callable[P, R]) -> Callable[P, R]:
    """Make a task's ``SystemExit``, ``KeyboardInterrupt`` and other ``BaseException`` an error.

    Without it, a task that raises one in a ``multiprocessing.Pool`` worker ends the worker and
    its result never arrives (``map()`` and ``get()`` without a timeout wait forever); in a
    ``ProcessPoolExecutor`` the exception is re-raised in the parent by ``result()``, where a
    ``SystemExit`` ends the parent. Wrapped, the task raises :class:`~safepool.TaskAborted`
    instead: an ordinary error result, and the pool stays usable. ``Exception`` subclasses and
    :class:`WorkerTerminated` pass unchanged, and outside a worker process nothing is converted.

    Use it as a decorator on a module-level function, or wrap at the call site
    (``pool.map(safe_task(fn), items)``); both pickle under every start method.
    """
    check_callable("fn", fn)
    return _SafeTask(fn)
