"""The main loop of a :class:`safepool.WorkerPool` worker process (the parent side is in
:mod:`safepool._workercore`).

A worker owns two things no other process writes: the child end of its own duplex pipe, and its
*slot*, a few doubles in shared memory. Nothing else is shared, so a worker killed at any
instruction cannot leave anything locked for the others (the stdlib ``Pool`` shares one task
queue whose read lock a dead worker can hold; pebble shares a channel lock, pebble#163). A
message the worker was writing when it died is cut short in its own pipe, which only the parent
reads, and only until it sees the worker's death.

Protocol. The parent sends one chunk at a time, and only to an idle worker: ``(seqs, payload,
timed)`` where ``payload`` pickles ``[(fn, args, kwargs), ...]`` (one pickle per chunk, so a
function is pickled once) and ``timed`` says the tasks have time limits; or ``None`` to stop.
The worker answers ``("results", [(seq, ok, value), ...], "")`` messages while it works, and
one ``("done", [...], reason)`` when it stops working on the chunk: ``reason`` is empty, or says
why it retires (over its memory ceiling); then it exits, and the unstarted rest of the chunk
goes back to the queue. Before each task the worker writes the task's start time, then its
``seq``, into its slot: the parent reads them to blame exactly that task if the worker dies, and
to enforce time limits. A task that ended with an error, or any task of a timed chunk, is then
marked finished (``-seq``), so that its limits no longer apply to it. Results are sent at the end
of the chunk, or before the next task once :data:`FLUSH_INTERVAL` has passed since the last
send: tiny tasks travel in one message per chunk, and a task that takes longer is delivered as
soon as it ends.

Soft time limit: the parent writes the task's ``seq`` and the limit into the slot, then sends
:data:`SOFT_LIMIT_SIGNAL`; the handler raises :class:`~safepool.SoftTimeLimitExceeded` if that
task is still running in this worker, and does nothing otherwise. Nothing is armed per task, so
a limit costs nothing while tasks finish in time.
"""

from __future__ import annotations

import os
import pickle
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.pool import ExceptionWithTraceback  # type: ignore[attr-defined]
from types import FrameType
from typing import Any

from ._signals import WorkerTerminated, terminate_requested
from .errors import SoftTimeLimitExceeded, TaskAborted

__all__ = [
    "FLUSH_INTERVAL",
    "SLOT_LIMIT",
    "SLOT_SEQ",
    "SLOT_SIZE",
    "SLOT_SOFT",
    "SLOT_STARTED",
    "SOFT_LIMIT_SIGNAL",
    "slot_view",
    "worker_main",
]

# Results wait in the worker at most this long (seconds) before they are sent, unless the task
# that is running when it passes takes longer.
FLUSH_INTERVAL = 0.001
SOFT_LIMIT_SIGNAL = signal.SIGUSR1
# The slot: doubles in shared memory, written by the worker (SEQ, STARTED) or the parent (SOFT,
# LIMIT). The worker writes STARTED before SEQ, so a SEQ that is read names a started task.
SLOT_SEQ, SLOT_STARTED, SLOT_SOFT, SLOT_LIMIT = 0, 1, 2, 3
SLOT_SIZE = 4


def slot_view(memory: Any) -> Any:
    """The slot's doubles, as a memoryview (a store is ~3x cheaper than through ctypes)."""
    return memoryview(memory).cast("B").cast("d")


class _State:
    """What the soft-limit handler needs to know about the running task."""

    __slots__ = ("fn", "in_task", "slot")

    def __init__(self, slot: Any) -> None:
        self.slot = slot
        self.in_task = False
        self.fn: object = None


_state: _State | None = None


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    state = _state
    if state is None or not state.in_task:
        return
    slot = state.slot
    if slot[SLOT_SOFT] != slot[SLOT_SEQ]:
        return  # meant for a task that has finished since
    slot[SLOT_SOFT] = -1.0
    limit = slot[SLOT_LIMIT]
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
    type_name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else (f"{kind.__module__}.{kind.__qualname__}")
    )
    detail = f": {exc}" if str(exc) else ""
    name = getattr(fn, "__qualname__", None) or repr(fn)
    return TaskAborted(
        f"task {name} raised {type_name}{detail} in worker process {os.getpid()}",
        exc_type=type_name,
        exc_message=str(exc),
    )


def _error(exc: BaseException) -> BaseException:
    """The exception as the parent will see it: with the worker's traceback as its cause."""
    return ExceptionWithTraceback(exc, exc.__traceback__)  # type: ignore[no-any-return]


def _encode(kind: str, results: list[tuple[int, bool, Any]], reason: str = "") -> bytes:
    """Pickle a message of results; a value or error that cannot be pickled becomes an error."""
    try:
        return pickle.dumps((kind, results, reason), pickle.HIGHEST_PROTOCOL)
    except Exception:
        fixed: list[tuple[int, bool, Any]] = []
        for seq, ok, value in results:
            try:
                pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                what = "result" if ok else "error"
                error = TypeError(f"the task's {what} cannot be sent to the parent: {exc!r}")
                fixed.append((seq, False, _error(error)))
            else:
                fixed.append((seq, ok, value))
        return pickle.dumps((kind, fixed, reason), pickle.HIGHEST_PROTOCOL)


class _Runner:
    """Runs chunks in the worker; sends results; decides when the worker must retire."""

    def __init__(self, conn: Connection, state: _State, max_memory: int | None) -> None:
        self.conn = conn
        self.state = state
        self.max_memory = max_memory
        self.retire_reason = ""

    def flush(self, pending: list[tuple[int, bool, Any]]) -> None:
        """Send the results so far (mid-chunk); check the memory ceiling."""
        if pending:
            self.conn.send_bytes(_encode("results", pending))
            pending.clear()
        self.check_memory()

    def check_memory(self) -> None:
        if self.max_memory is not None and not self.retire_reason:
            rss = _rss_bytes()
            if rss > self.max_memory:
                self.retire_reason = (
                    f"resident set {rss:,} bytes > max_memory_per_child {self.max_memory:,}"
                )

    def run_chunk(
        self, seqs: list[int], payload: bytes, timed: bool
    ) -> list[tuple[int, bool, Any]]:
        """Run a chunk's tasks; return the results not sent yet. Stops early (the rest has not
        started; the parent requeues it) when the worker must retire or was asked to end."""
        try:
            calls: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]
            calls = pickle.loads(payload)
        except Exception as exc:  # e.g. the function cannot be imported here
            error = _error(exc)
            return [(seq, False, error) for seq in seqs]
        state, slot, monotonic = self.state, self.state.slot, time.monotonic
        pending: list[tuple[int, bool, Any]] = []
        last = monotonic()
        for seq, (fn, args, kwargs) in zip(seqs, calls, strict=True):
            now = monotonic()
            if now - last >= FLUSH_INTERVAL:
                self.flush(pending)
                if self.retire_reason or terminate_requested():
                    break
                last = now = monotonic()
            slot[SLOT_STARTED] = now
            slot[SLOT_SEQ] = seq
            state.fn = fn
            state.in_task = True
            try:
                value = fn(*args, **kwargs)
                state.in_task = False
                if timed:  # finished: its time limits no longer apply
                    slot[SLOT_SEQ] = -seq
                pending.append((seq, True, value))
            except WorkerTerminated:
                state.in_task = False
                self.flush(pending)  # what finished is delivered; this task is blamed
                raise
            except Exception as exc:
                state.in_task = False
                slot[SLOT_SEQ] = -seq
                pending.append((seq, False, _error(exc)))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt from task code
                state.in_task = False
                slot[SLOT_SEQ] = -seq
                pending.append((seq, False, _error(_aborted(fn, exc))))
        self.check_memory()
        return pending


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
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        conn.send_bytes(pickle.dumps(("init-failed", f"{type(exc).__name__}: {exc}", text)))
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
        pending = runner.run_chunk(*chunk)
        if terminate_requested():
            # SIGTERM arrived and task code swallowed WorkerTerminated: end as asked.
            runner.flush(pending)
            raise WorkerTerminated(f"worker process {os.getpid()} received SIGTERM")
        conn.send_bytes(_encode("done", pending, runner.retire_reason))
        if runner.retire_reason:
            return
