"""The safepool exception tree.

Every error derives from :class:`SafePoolError`, and subclasses a builtin where one fits, so
callers can catch either (``except TimeoutError`` catches :class:`PoolTimeout`).

Every exception here is picklable: they cross the manager boundary, where the server pickles
the error and the client re-raises it with the same type. Extra attributes live in
``__dict__``, which :meth:`BaseException.__reduce__` carries across, and each ``__init__``
takes the message as its only positional argument so unpickling can call it again.
"""

from __future__ import annotations

from multiprocessing import AuthenticationError

__all__ = [
    "AuthkeyError",
    "BudgetTimeout",
    "BudgetUnavailable",
    "FactoryError",
    "HardTimeLimitExceeded",
    "HostedItemError",
    "LeaseError",
    "LeaseRevoked",
    "ManagerUnavailable",
    "PoolClosed",
    "PoolTimeout",
    "SafePoolError",
    "SoftTimeLimitExceeded",
    "TaskAborted",
    "TooManyWaiting",
    "WorkerLost",
    "WorkerResourceError",
]


class SafePoolError(Exception):
    """Base class of every error raised by safepool."""


class PoolTimeout(SafePoolError, TimeoutError):
    """No item became available within the timeout."""


class BudgetTimeout(PoolTimeout):
    """No permit of a budget came free within the timeout (a :class:`PoolTimeout` too, so a pool
    waiting on its budget raises something ``except PoolTimeout`` catches)."""


class BudgetUnavailable(SafePoolError, ConnectionError):
    """The engine that holds a budget (PostgreSQL, Redis, the host's kernel objects) cannot be
    reached or used; the message names the engine and the cause."""


class PoolClosed(SafePoolError):
    """The pool is closed: it hands out nothing more."""


class TooManyWaiting(SafePoolError):
    """``max_waiting`` callers are already waiting; this one was refused at once."""


class LeaseError(SafePoolError, ValueError):
    """An item was released that this pool did not lease, or was released twice."""


class LeaseRevoked(LeaseError):
    """An operator took this lease back (``pool.revoke()``, ``python -m safepool revoke``) while
    its holder was stopped or hung: the holder's later use or release of it raises this, and
    changes nothing. A :class:`LeaseError` (so a ``ValueError`` too).

    ``pool`` names the pool, ``lease_id`` is the lease's id as ``inspect`` shows it, and
    ``action`` says what became of the item: ``"close"`` (it was closed) or ``"reset"`` (it went
    back to the pool after the pool's ``reset`` hook, and may be another holder's by now).
    """

    def __init__(
        self, message: str, *, pool: str = "", lease_id: int = 0, action: str = ""
    ) -> None:
        super().__init__(message)
        self.pool = pool
        self.lease_id = lease_id
        self.action = action


class FactoryError(SafePoolError):
    """The pool's factory raised while making an item; the original error is the ``__cause__``."""


class ManagerUnavailable(SafePoolError, ConnectionError):
    """The manager server that hosts a pool cannot be reached (it died, or was shut down)."""


class AuthkeyError(SafePoolError, PermissionError, AuthenticationError):
    """The manager server refused this process's authkey.

    Also a :class:`multiprocessing.AuthenticationError`, so code written for
    ``BaseManager.connect()`` catches it."""


class HostedItemError(SafePoolError, TypeError):
    """Something that must stay in the server (a hosted item, a socket) would reach a client."""


class TaskAborted(SafePoolError):
    """A task, or a function run in a manager server, ended by a ``BaseException`` instead of
    returning or raising an ``Exception``.

    Raised in the parent for a task wrapped with :func:`safepool.safe_task` that raised
    ``SystemExit``, ``KeyboardInterrupt`` or another ``BaseException``, for a task whose
    worker was ended by SIGTERM while running it, and in a client for a function (or a pool's
    factory or hook) that raised one in a manager server, which keeps serving. ``exc_type``
    names the original exception's type (``"SystemExit"``, ``"safepool.WorkerTerminated"``),
    ``exc_message`` is its ``str()``.
    The original is the ``__cause__`` in the worker; the parent sees it in the remote traceback.
    """

    def __init__(self, message: str, *, exc_type: str = "", exc_message: str = "") -> None:
        super().__init__(message)
        self.exc_type = exc_type
        self.exc_message = exc_message


class WorkerResourceError(SafePoolError, LookupError):
    """:func:`safepool.worker_resource` was asked for a resource this process was not given."""


class WorkerLost(SafePoolError):
    """The worker process running a task ended before it delivered the task's result.

    Raised for that task only, by a :class:`safepool.WorkerPool` or
    :class:`safepool.WorkerExecutor`; the pool replaces the worker and carries on. ``pid`` is the
    worker's process id, ``exitcode`` its exit status as ``multiprocessing`` reports it (a
    negative number is the signal that ended it), ``signal`` that signal's name (``"SIGKILL"``)
    or ``""``, and ``task`` describes the task (function and position). ``reason`` says what is
    known: ``"running"`` (the worker died while running it) or ``"undelivered"`` (it finished,
    but its result was still in the worker when the worker died).
    """

    def __init__(
        self,
        message: str,
        *,
        pid: int = 0,
        exitcode: int | None = None,
        signal: str = "",
        task: str = "",
        reason: str = "",
    ) -> None:
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode
        self.signal = signal
        self.task = task
        self.reason = reason


class HardTimeLimitExceeded(WorkerLost, TimeoutError):
    """A task ran past its hard time limit: the pool killed its worker (SIGKILL), replaced it,
    and failed the task with this error. ``limit`` is the limit in seconds. A ``WorkerLost``
    (the worker is gone, with whatever it held) and a ``TimeoutError``."""

    def __init__(self, message: str, *, limit: float = 0.0, **fields: object) -> None:
        super().__init__(message, **fields)  # type: ignore[arg-type]
        self.limit = limit


class SoftTimeLimitExceeded(SafePoolError, TimeoutError):
    """Raised *inside* a task that ran past its soft time limit, so that its ``finally`` blocks
    and ``with`` blocks clean up; if the task lets it propagate, it is the task's error in the
    parent. The worker lives on. ``limit`` is the limit in seconds."""

    def __init__(self, message: str, *, limit: float = 0.0) -> None:
        super().__init__(message)
        self.limit = limit
