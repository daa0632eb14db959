"""The main loop of a :class:`safepool.WorkerPool` worker process (the parent side is in
:mod:`safepool._workercore`).

A worker owns two things no other process writes: the child end of its own duplex pipe, and its
*slot*, a few doubles in shared memory. Nothing else is shared, so a worker killed at any
instruction cannot leave anything locked for the others (the stdlib ``Pool`` shares one task
queue whose read lock a dead worker can hold; pebble shares a channel lock, pebble#163). A
message the worker was writing when it died is cut short in its own pipe, which only the parent
reads, and only until it sees the worker's death.

Protocol. The parent sends one chunk at a time, and only to an idle worker: ``(seq0, count,
payload)``, where ``payload`` pickles ``(fn, items, kwargs, star)`` (the function once
per chunk, as ``multiprocessing.Pool`` sends ``map`` chunks) and the tasks have the sequence
numbers ``seq0 ...``; or ``None`` to stop. The worker runs the chunk and answers one ``("done",
first, values, errors, reason)`` (``errors`` maps an offset in ``values`` to the exception;
``reason`` is empty, or says why the worker retires: it then exits, and the parent queues the
tasks it did not run again). Before each task the worker writes the task's sequence number into
its slot, and ``-seq`` of the last one when the chunk is over: if it dies, the parent reads
which task was running and blames exactly that one; the tasks before it finished but their
results died with the worker (they fail too, as undelivered); those after it never started and
run elsewhere. That one store is the whole per-task cost of blame. A worker ended by SIGTERM
sends the results it has (``"results"``) before it exits.

Soft time limit: the parent writes the task's ``seq`` and the limit into the slot, then sends
:data:`SOFT_LIMIT_SIGNAL`; the handler raises :class:`~safepool.SoftTimeLimitExceeded` if that
task is still running in this worker, and does nothing otherwise (see ``_Runner._run`` for the
moment between two tasks). Nothing is armed per task; the parent times tasks by watching the
slot.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.pool import ExceptionWithTraceback  # type: ignore[attr-defined]
from types import FrameType
from typing import Any

from ._signals import WorkerTerminated, terminate_requested
from .errors import SoftTimeLimitExceeded, TaskAborted

__all__ = [
    "SLOT_LIMIT",
    "SLOT_SEQ",
    "SLOT_SIZE",
    "SLOT_SOFT",
    "SOFT_LIMIT_SIGNAL",
    "slot_view",
    "worker_main",
]

SOFT_LIMIT_SIGNAL = signal.SIGUSR1
# The slot: int64 cells in shared memory, written by the worker (SEQ) or the parent (SOFT, and
# LIMIT in microseconds).
SLOT_SEQ, SLOT_SOFT, SLOT_LIMIT = 0, 1, 2
SLOT_SIZE = 3


def slot_view(memory: Any) -> Any:
    """The slot's int64 cells as a memoryview (a store costs ~70 ns on CPython 3.11; an int
    store ~10% less than a double, and less than through ctypes)."""
    return memoryview(memory).cast("B").cast("q")


class _State:
    """What the soft-limit handler needs to know about the running task."""

    __slots__ = ("fn", "slot")

    def __init__(self, slot: Any) -> None:
        self.slot = slot
        self.fn: object = None


_state: _State | None = None


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    state = _state
    if state is None:
        return
    slot = state.slot
    if slot[SLOT_SOFT] != slot[SLOT_SEQ]:
        return  # meant for a task that has finished since
    slot[SLOT_SOFT] = -1
    limit = slot[SLOT_LIMIT] / 1e6
    name = getattr(state.fn, "__qualname__", None) or repr(state.fn)
    raise SoftTimeLimitExceeded(
        f"task {name} ran past its soft time limit of {limit:g}s in worker process {os.getpid()}",
        limit=limit,
    )


def _rss_bytes() -> int:
    """This process's resident set size, in bytes (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _aborted(fn: object, exc: BaseException) -> TaskAborted:
    kind = type(exc)
    builtin = kind.__module__ == "builtins"
    type_name = kind.__qualname__ if builtin else f"{kind.__module__}.{kind.__qualname__}"
    detail = f": {exc}" if str(exc) else ""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TaskAborted(
        f"task {name} raised {type_name}{detail} in worker process {os.getpid()}",
        exc_type=type_name,
        exc_message=str(exc),
    )


def _error(fn: object, exc: BaseException) -> BaseException:
    """The task's exception as the parent will see it: with the worker's traceback as its
    cause; a ``SystemExit``, ``KeyboardInterrupt`` or other ``BaseException`` as TaskAborted."""
    if not isinstance(exc, Exception):
        exc = _aborted(fn, exc)
    return ExceptionWithTraceback(exc, exc.__traceback__)  # type: ignore[no-any-return]


def _caller(
    fn: Callable[..., Any], star: bool, kwargs: dict[str, Any] | None
) -> Callable[[Any], Any]:
    """How to call ``fn`` with one item: ``fn(item)`` (map), or ``fn(*item, **kwargs)``."""
    if not star:
        return fn
    if kwargs:
        return lambda item: fn(*item, **kwargs)
    return lambda item: fn(*item)


class _Batch:
    """Results not sent yet: ``values`` of consecutive tasks from ``first``; ``errors`` by
    offset (the value there is None)."""

    __slots__ = ("errors", "first", "values")

    def __init__(self, first: int) -> None:
        self.first = first
        self.values: list[Any] = []
        self.errors: dict[int, BaseException] = {}

    def encode(self, kind: str, reason: str = "") -> bytes:
        """Pickle; a value or an error that cannot be pickled becomes an error."""
        message = (kind, self.first, self.values, self.errors, reason)
        try:
            return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        except Exception:  # find the culprits, below
            pass
        for offset, value in enumerate(self.values):
            what = "error" if offset in self.errors else "result"
            try:
                pickle.dumps(self.errors.get(offset, value), pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                error = TypeError(f"the task's {what} cannot be sent to the parent: {exc!r}")
                self.values[offset] = None
                self.errors[offset] = ExceptionWithTraceback(error, None)
        return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


class _Runner:
    """Runs chunks in the worker; decides when the worker must retire."""

    def __init__(self, conn: Connection, state: _State, max_memory: int | None) -> None:
        self.conn = conn
        self.state = state
        self.max_memory = max_memory
        self.retire_reason = ""

    def check_memory(self) -> None:
        if self.max_memory is not None and not self.retire_reason:
            rss = _rss_bytes()
            if rss > self.max_memory:
                self.retire_reason = (
                    f"resident set {rss:,} bytes > max_memory_per_child {self.max_memory:,}"
                )

    def run_chunk(self, seq0: int, count: int, payload: bytes) -> _Batch:
        """Run a chunk's tasks; return their results (not sent yet)."""
        batch = _Batch(seq0)
        try:
            fn, items, kwargs, star = pickle.loads(payload)
        except Exception as exc:  # e.g. the function cannot be imported here
            batch.values = [None] * count
            batch.errors = dict.fromkeys(range(count), _error(None, exc))
            return batch
        self.state.fn = fn
        call = _caller(fn, star, kwargs)
        tasks = enumerate(items, seq0)  # an iterator: the loop resumes where it stopped
        try:
            while True:  # `while cond:` here would let SIGTERM skip the handler on 3.13.0
                if not self._run(batch, fn, call, tasks):
                    break
        except WorkerTerminated:
            # What finished is delivered; the parent blames the running task.
            self.conn.send_bytes(batch.encode("results"))
            raise
        self.check_memory()
        return batch

    def _run(self, batch: _Batch, fn: Any, call: Callable[[Any], Any], tasks: Any) -> bool:
        """Run the tasks; True if a soft-limit exception stopped the loop (call again).

        Per task, one store in the slot: the whole cost of blame and time limits. The soft
        limit's exception is raised where the main thread is when the signal is handled: in
        the task (its error), or, if the task has just ended, in this loop between two tasks,
        where it is caught below and the loop goes on with the next task.
        """
        slot, values, errors = self.state.slot, batch.values, batch.errors
        append, seq0 = values.append, batch.first
        try:
            for seq, item in tasks:
                slot[SLOT_SEQ] = seq
                try:
                    append(call(item))
                except WorkerTerminated:
                    raise
                except BaseException as exc:
                    append(None)
                    errors[seq - seq0] = _error(fn, exc)
            if values:
                slot[SLOT_SEQ] = -(seq0 + len(values) - 1)  # the last one has finished
        except SoftTimeLimitExceeded as exc:
            # Raised outside the task's own frames: if it cut short the recording of the
            # task's outcome, record the soft limit as its error.
            started = int(slot[SLOT_SEQ]) - seq0 + 1
            for _missing in range(started - len(values)):
                append(None)
                errors[len(values) - 1] = _error(fn, exc)
            return True
        return False


def worker_main(
    conn: Connection,
    slot_memory: Any,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
    max_memory: int | None,
) -> None:
    """The target of every worker process: set up, then run chunks until told to stop."""
    global _state
    try:
        if initializer is not None:
            initializer(*initargs)
    except WorkerTerminated:
        raise  # SIGTERM while starting: an ordinary end (exit 143), not a broken initializer
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        summary = f"{type(exc).__name__}: {exc}"
        conn.send_bytes(pickle.dumps(("init-failed", summary, text, {}, "")))
        sys.exit(1)
    state = _state = _State(slot_view(slot_memory))
    signal.signal(SOFT_LIMIT_SIGNAL, _on_soft_limit)
    runner = _Runner(conn, state, max_memory)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone
        chunk = pickle.loads(message)
        if chunk is None:
            return
        batch = runner.run_chunk(*chunk)
        if terminate_requested():
            # SIGTERM arrived and task code swallowed WorkerTerminated: end as asked.
            conn.send_bytes(batch.encode("results"))
            raise WorkerTerminated(f"worker process {os.getpid()} received SIGTERM")
        conn.send_bytes(batch.encode("done", runner.retire_reason))
        if runner.retire_reason:
            return
