"""The parent side of a :class:`safepool.WorkerPool`: workers, the task queue, blame, limits.

One *manager thread* owns every worker: it sends a chunk of tasks to each idle worker over that
worker's own pipe, reads results, watches every worker's sentinel, enforces time limits, and
replaces workers that die or retire. Because the parent decides which worker runs which chunk,
and each worker records the task it starts in its slot (see :mod:`safepool._workerloop`), the
parent knows exactly which task a dead worker was running: that task fails with
:class:`~safepool.WorkerLost`, tasks of the chunk that had not started go back to the front of
the queue, and the pool carries on. No lock or queue is shared between processes.

State and locks. ``_lock`` guards ``_queue`` (chunks not yet sent), ``_state``, ``_next_seq``
and ``_wake_pending``; user threads take it to submit, close or terminate, the manager thread
to take work. Every other attribute (the workers, their chunks) belongs to the manager thread
alone. Results are delivered to sinks (the public AsyncResult-like objects) from the manager
thread, outside ``_lock``; a sink has its own lock. Lock order: ``_lock`` is never held while a
sink's lock is taken.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import os
import pickle
import selectors
import signal
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from typing import Any

from ._signals import daemon_thread, start_without_signals
from ._workerloop import (
    SLOT_LIMIT,
    SLOT_SEQ,
    SLOT_SIZE,
    SLOT_SOFT,
    SOFT_LIMIT_SIGNAL,
    slot_view,
    worker_main,
)
from ._workertasks import Chunk, Job, deliver, fail_chunks
from .errors import HardTimeLimitExceeded, PoolClosed, WorkerLost

__all__ = ["WorkerCore"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL

logger = logging.getLogger(__name__)
_CALL = operator.methodcaller("__call__")  # f -> f(), in C

RUN, CLOSE, TERMINATE, BROKEN = "running", "closed", "terminated", "broken"
# How often the manager thread looks at the slots of workers running tasks with time limits;
# a limit is measured from the first look that sees the task, so it fires up to this late.
LIMIT_POLL = 0.02


class _Worker:
    """One worker process, seen from the manager thread."""

    __slots__ = (
        "chunk",
        "conn",
        "done",
        "killed_for",
        "lost",
        "pid",
        "process",
        "retiring",
        "seen",
        "slot",
        "soft_sent",
        "tasks",
    )

    def __init__(self, process: Any, conn: Connection, slot: Any) -> None:
        self.process, self.conn, self.slot = process, conn, slot
        self.pid: int = process.pid
        self.chunk: Chunk | None = None
        self.done = 0  # tasks of the chunk delivered
        self.tasks = 0  # tasks this worker has run
        self.retiring = ""  # why it is being replaced (not a failure); its successor runs
        self.lost = False  # its pipe broke: its sentinel will say how it ended
        self.killed_for: tuple[int, float] | None = None  # (seq, hard limit) it was killed for
        self.soft_sent = 0  # seq the soft-limit signal was sent for
        self.seen = (0, 0.0)  # (seq, when the manager thread first saw it running)


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


class WorkerCore:
    """Workers, queue and manager thread of one pool (see the module docstring)."""

    def __init__(
        self,
        context: BaseContext,
        processes: int,
        *,
        initializer: Callable[..., object] | None,
        initargs: tuple[Any, ...],
        max_tasks_per_child: int | None,
        max_memory_per_child: int | None,
        terminate_grace: float,
        name: str,
    ) -> None:
        self._ctx = context
        self._size = processes
        self._init = (initializer, initargs)
        self._max_tasks = max_tasks_per_child
        self._max_memory = max_memory_per_child
        self.terminate_grace = terminate_grace
        self.name = name
        self._lock = threading.Lock()
        self._queue: collections.deque[Chunk] = collections.deque()
        self._state = RUN
        self._broken_reason = ""
        self._next_seq = 1
        self._wake_pending = False
        self._wake_r = self._wake_w = -1  # the wake-up pipe; -1 once closed (fds are reused)
        self._workers: list[_Worker] = []
        # What the manager thread waits on: the wake-up pipe, each worker's pipe and sentinel.
        # poll(), not epoll: nothing in the kernel that forked workers would share.
        self._selector = selectors.PollSelector()
        self._forked = False  # this is a copy in a forked child: touch no worker
        self.replaced = 0  # workers replaced after a death (not counting retirements)
        self.exits: collections.deque[tuple[int, int | None]] = collections.deque(maxlen=100)
        # The manager thread starts with signals blocked (a start cut short cannot leave it
        # half-made) and restores this thread's mask, which the workers it starts inherit.
        thread = daemon_thread(self._run, name=f"safepool-workers-{name}")
        # The pipe is made and kept by C code (list.extend consuming a map): no point between
        # the two where a signal handler could run and lose its descriptors.
        made: list[tuple[int, int]] = []
        try:  # cut short anywhere (a signal handler raising): nothing is left behind
            made.extend(map(_CALL, (os.pipe,)))
            self._wake_r, self._wake_w = made[0]
            os.set_blocking(self._wake_w, False)
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
            for _ in range(processes):
                self._add_worker()
            start_without_signals(thread)
        except BaseException:
            if made and self._wake_r < 0:  # made, not stored yet
                for fd in made[0]:
                    os.close(fd)
            self._abandon(started=thread.ident is not None)
            raise
        self._thread = thread

    def _abandon(self, *, started: bool) -> None:
        """The constructor was cut short: end the workers; a manager thread that started ends
        too (and closes the wake-up pipe), else the pipe is closed here."""
        with self._lock:
            self._state = TERMINATE
        if started:  # the manager thread ends them (and owns their pipes)
            for worker in list(self._workers):
                _kill(worker.pid, signal.SIGKILL)
            self._wake()
            return
        self._kill_all()
        for worker in self._workers:
            worker.conn.close()
            worker.process.close()
        self._selector.close()
        self._close_wakeup()

    # -- user threads ------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def size(self) -> int:
        return self._size

    def pids(self) -> list[int]:
        return [w.pid for w in list(self._workers)]

    def submit(self, job: Job, items: Sequence[Any], chunksize: int) -> None:
        """Queue a job's items in chunks of ``chunksize``; raises PoolClosed when not running."""
        with self._lock:
            self._check_running()
            seq = self._next_seq
            for start in range(0, len(items), chunksize):
                part = list(items[start : start + chunksize])
                self._queue.append(Chunk(job, start, part, seq))
                seq += len(part)
            self._next_seq = seq
            if not self._wake_pending:
                self._write_wakeup()

    def _check_running(self) -> None:
        if self._state == RUN:
            return
        if self._state == BROKEN:
            raise PoolClosed(f"worker pool {self.name!r} is broken: {self._broken_reason}")
        raise PoolClosed(f"worker pool {self.name!r} is {self._state}: it takes no new tasks")

    def close(self) -> None:
        """No new tasks; queued ones still run, then the workers exit."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
        self._wake()

    def terminate(self) -> None:
        """End every worker now (SIGTERM, then SIGKILL after ``terminate_grace``); every task
        not finished fails with PoolClosed."""
        with self._lock:
            if self._state in (RUN, CLOSE):
                self._state = TERMINATE
            dropped = list(self._queue)
            self._queue.clear()
        if self._forked:
            return  # the workers belong to the parent process
        fail_chunks(dropped, PoolClosed(f"worker pool {self.name!r} was terminated"))
        self._wake()
        if threading.current_thread() is self._thread:
            return  # a callback called terminate(): the manager thread ends when it returns
        self._thread.join(self.terminate_grace + 5.0)
        if self._thread.is_alive():  # pragma: no cover - stuck in a send to a stopped worker
            logger.warning(
                "safepool: pool %r: manager thread still busy; killing workers", self.name
            )
            self._kill_all()
            self._thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the manager thread (and so every worker) to end; whether it did."""
        if self._state == RUN:
            raise ValueError("join() needs close() or terminate() first")
        if self._forked:
            return True
        if threading.current_thread() is self._thread:
            raise RuntimeError("join() cannot be called from a result callback")
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wake(self) -> None:
        with self._lock:
            self._write_wakeup()

    def _write_wakeup(self) -> None:
        """Wake the manager thread (under ``_lock``, which also guards closing the pipe).

        The byte is written before ``_wake_pending`` is set, and with no Python-level context
        manager around the write: a caller interrupted here (a signal handler raising) must not
        leave the flag set with no byte written, or every later submit would skip its wake-up and
        the pool would hang."""
        if self._wake_w >= 0:
            try:  # noqa: SIM105 - contextlib.suppress's __enter__ is Python code: a gap
                os.write(self._wake_w, b"x")
            except BlockingIOError:
                pass  # full: the manager thread has plenty to wake it
        self._wake_pending = True

    def _after_fork_in_child(self) -> None:
        """In a child forked from the pool's process: the pool is the parent's; refuse work."""
        self._forked = True
        self._lock = threading.Lock()
        self._queue = collections.deque()
        self._state, self._broken_reason = BROKEN, "it belongs to the process that forked this one"
        self._wake_r = self._wake_w = -1  # the parent's: never write or close them here

    # -- workers -------------------------------------------------------------------------------

    def _start_worker(self) -> _Worker:
        """A new worker. Cut short (a signal handler raising), it closes its pipe and ends a
        worker it started (one forked but not yet recorded by ``Process.start()``, inside the
        standard library, is beyond reach)."""
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = None
        try:
            slot = self._ctx.RawArray("q", SLOT_SIZE)
            initializer, initargs = self._init
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=worker_main,
                args=(child_end, slot, initializer, initargs, self._max_memory),
                name=f"safepool-worker-{self.name}",
                daemon=True,
            )
            process.start()
            child_end.close()
            return _Worker(process, parent_end, slot_view(slot))
        except BaseException:
            child_end.close()
            parent_end.close()
            if process is not None and process.pid is not None:
                _kill(process.pid, signal.SIGKILL)
                process.join()
            raise

    def _add_worker(self) -> None:
        """Start a worker; the manager thread watches its pipe and its sentinel."""
        worker = self._start_worker()
        self._workers.append(worker)
        self._selector.register(worker.conn, selectors.EVENT_READ, (worker, True))
        self._selector.register(worker.process.sentinel, selectors.EVENT_READ, (worker, False))

    def _kill_all(self) -> None:
        for worker in self._workers:
            _kill(worker.pid, signal.SIGKILL)
        for worker in self._workers:
            worker.process.join()

    def _close_wakeup(self) -> None:
        with self._lock:
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    # -- the manager thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:  # not `while cond:` inside a try (CPython issue 108214; _poolstate)
                if not self._step():
                    break
        except BaseException as exc:  # a bug here must fail tasks, never hang them
            logger.exception("safepool: worker pool %r: manager thread failed", self.name)
            self._break(f"its manager thread failed: {exc!r}")
            self._end_workers(self.terminate_grace)
        finally:
            self._selector.close()
            self._close_wakeup()

    def _step(self) -> bool:
        state = self._state
        if state in (TERMINATE, BROKEN):
            self._end_workers(self.terminate_grace)
            return False
        self._dispatch()
        if state == CLOSE and not self._queue and all(w.chunk is None for w in self._workers):
            self._stop_workers()
            return False
        timeout = self._check_limits()
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with self._lock:
                    self._wake_pending = False
                    os.read(self._wake_r, 4096)
                continue
            worker, is_conn = key.data
            if worker not in self._workers:
                continue  # already handled as dead in this round
            if is_conn:
                self._receive(worker)
            else:
                self._on_exit(worker)
        return True

    def _take(self, worker: _Worker) -> Chunk | None:
        with self._lock:
            if not self._queue or self._state not in (RUN, CLOSE):
                return None
            chunk = self._queue.popleft()
            if self._max_tasks is not None:
                room = self._max_tasks - worker.tasks
                if len(chunk.items) > room:
                    self._queue.appendleft(chunk.rest(room))
                    chunk.items = chunk.items[:room]
            return chunk

    def _dispatch(self) -> None:
        for worker in list(self._workers):
            while worker.chunk is None and not (worker.retiring or worker.lost):
                chunk = self._take(worker)
                if chunk is None:
                    return
                if not chunk.claimed:
                    chunk.claimed = chunk.job.sink._claim(chunk.start, len(chunk.items))
                    if not chunk.claimed:
                        continue  # cancelled while it was queued
                self._send(worker, chunk)

    def _send(self, worker: _Worker, chunk: Chunk) -> None:
        job = chunk.job
        try:
            payload = pickle.dumps((job.fn, chunk.items, job.kwargs, job.star), _PROTOCOL)
        except Exception as exc:
            self._send_each(chunk, exc)
            return
        message = pickle.dumps((chunk.seq0, len(chunk.items), payload), _PROTOCOL)
        worker.slot[SLOT_SEQ] = 0  # idle, so not writing it: nothing of this chunk started
        try:
            worker.conn.send_bytes(message)
        except OSError:  # the worker died: its sentinel tells the rest
            with self._lock:
                self._queue.appendleft(chunk)
            worker.lost = True
            return
        worker.chunk, worker.done = chunk, 0
        worker.tasks += len(chunk.items)

    def _send_each(self, chunk: Chunk, exc: Exception) -> None:
        """The chunk does not pickle: fail the items that do not, queue the others alone."""
        job = chunk.job
        for offset, item in enumerate(chunk.items):
            single = Chunk(job, chunk.start + offset, [item], chunk.seq0 + offset)
            single.claimed = chunk.claimed
            try:
                pickle.dumps((job.fn, [item], job.kwargs, job.star), _PROTOCOL)
            except Exception as error:
                fail_chunks([single], error)
                continue
            with self._lock:
                self._queue.appendleft(single)

    def _receive(self, worker: _Worker, *, dying: bool = False) -> bool:
        """Read and handle one message of ``worker``; False at the end of its pipe."""
        try:
            kind, first, values, errors, reason = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError):
            # It died, perhaps in the middle of a message: the rest of the pipe is useless.
            if not dying:
                self._on_exit(worker)
            return False
        if kind == "init-failed":
            self._break(f"a worker's initializer raised {first}", detail=values)
            return True
        chunk = worker.chunk
        if chunk is not None and values:
            if first != chunk.seq0 + worker.done:  # pragma: no cover - a protocol bug
                raise RuntimeError(f"results out of order from worker {worker.pid}")
            deliver(chunk, worker.done, values, errors)
            worker.done += len(values)
        if kind == "done":
            if chunk is not None and worker.done < len(chunk.items):
                with self._lock:  # it stopped early: the rest has not started
                    self._queue.appendleft(chunk.rest(worker.done))
            worker.chunk = None
            if reason:
                self._retire(worker, f"memory: {reason}")
            elif self._max_tasks is not None and worker.tasks >= self._max_tasks:
                self._retire(worker, f"max_tasks_per_child ({self._max_tasks}) reached")
        return True

    def _retire(self, worker: _Worker, reason: str) -> None:
        """Replace a worker that is done (not a failure): stop it, start another."""
        logger.debug("safepool: pool %r: replacing worker %d: %s", self.name, worker.pid, reason)
        worker.retiring = reason
        with contextlib.suppress(OSError):
            worker.conn.send_bytes(pickle.dumps(None))
        if self._state in (RUN, CLOSE):
            self._add_worker()

    def _on_exit(self, worker: _Worker) -> None:
        """The worker's process ended: deliver what it sent, blame what it ran, replace it."""
        self._drain(worker)
        worker.process.join()
        self.exits.append((worker.pid, worker.process.exitcode))
        self._workers.remove(worker)
        self._selector.unregister(worker.conn)
        self._selector.unregister(worker.process.sentinel)
        worker.conn.close()
        chunk = worker.chunk
        if chunk is not None and worker.done < len(chunk.items):
            self._blame(worker, chunk)
        elif worker.retiring:
            return  # retired as planned: its successor is already running
        self.replaced += 1
        if self._state in (RUN, CLOSE):
            self._add_worker()

    def _drain(self, worker: _Worker) -> None:
        """Read what a dead worker sent before it died (results, its "done")."""
        try:
            while True:  # not `while cond:` inside a try (CPython issue 108214; _poolstate)
                if not (worker.conn.poll(0) and self._receive(worker, dying=True)):
                    break
        except OSError:
            pass

    def _blame(self, worker: _Worker, chunk: Chunk) -> None:
        """Fail the tasks the dead worker ran but did not deliver; requeue those not started."""
        seq = int(worker.slot[SLOT_SEQ])
        finished = seq < 0  # the chunk's last task had finished
        last = abs(seq) - chunk.seq0  # offset of the last task it started
        if last < worker.done:  # it had started nothing after what it delivered
            with self._lock:
                self._queue.appendleft(chunk.rest(worker.done))
            return
        first = worker.done
        errors: dict[int, BaseException] = {
            offset - first: self._lost(worker, chunk, offset, offset == last and not finished)
            for offset in range(first, last + 1)
        }
        worker.done = last + 1
        logger.warning(
            "safepool: pool %r: worker %d %s; %d task(s) failed, replacing it",
            self.name, worker.pid, _ended(worker), len(errors),
        )  # fmt: skip
        if worker.done < len(chunk.items):
            with self._lock:
                self._queue.appendleft(chunk.rest(worker.done))
        deliver(chunk, first, [None] * len(errors), errors)

    def _lost(self, worker: _Worker, chunk: Chunk, offset: int, running: bool) -> WorkerLost:
        """The error of one task of a dead worker."""
        what, how, exitcode = chunk.describe(offset), _ended(worker), worker.process.exitcode
        fields: dict[str, Any] = {
            "pid": worker.pid,
            "exitcode": exitcode,
            "signal": _signal_name(exitcode),
            "task": what,
            "reason": "running" if running else "undelivered",
        }
        killed = worker.killed_for
        if running and killed is not None and killed[0] == chunk.seq0 + offset:
            return HardTimeLimitExceeded(
                f"task {what} ran past its hard time limit of {killed[1]:g}s: worker process "
                f"{worker.pid} was killed (SIGKILL) and replaced",
                limit=killed[1],
                **fields,
            )
        if running:
            message = f"worker process {worker.pid} {how} while running task {what}"
        else:
            message = f"task {what} finished, but worker process {worker.pid} {how} first"
        return WorkerLost(message, **fields)

    def _check_limits(self) -> float | None:
        """Signal or kill workers over a limit; the seconds until the next look (None: no
        task with a limit is running)."""
        now = time.monotonic()
        timed = False
        for worker in self._workers:
            chunk = worker.chunk
            if chunk is None or worker.killed_for is not None:
                continue
            job = chunk.job
            if job.soft is None and job.hard is None:
                continue
            timed = True
            seq = int(worker.slot[SLOT_SEQ])
            if seq != worker.seen[0]:
                worker.seen = (seq, now)  # a task started since the last look
            if seq > 0 and worker.done <= seq - chunk.seq0 < len(chunk.items):
                self._limit_task(worker, job, seq, now - worker.seen[1])
        return LIMIT_POLL if timed else None

    def _limit_task(self, worker: _Worker, job: Job, seq: int, ran: float) -> None:
        """Apply the limits to the running task ``seq`` (it has run at least ``ran`` s)."""
        if job.hard is not None and ran >= job.hard:
            worker.killed_for = (seq, job.hard)
            _kill(worker.pid, signal.SIGKILL)
        elif job.soft is not None and ran >= job.soft and worker.soft_sent != seq:
            worker.slot[SLOT_LIMIT] = round(job.soft * 1e6)
            worker.slot[SLOT_SOFT] = seq
            worker.soft_sent = seq
            _kill(worker.pid, SOFT_LIMIT_SIGNAL)

    def _stop_workers(self) -> None:
        """After close(): every task is done; each worker is told to exit."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(pickle.dumps(None))
        for worker in self._workers:
            worker.process.join()
            self.exits.append((worker.pid, worker.process.exitcode))
            worker.conn.close()

    def _end_workers(self, grace: float) -> None:
        """terminate(): SIGTERM every worker, SIGKILL those still there after ``grace``."""
        workers = list(self._workers)
        for worker in workers:
            _kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        pending = {worker.process.sentinel for worker in workers}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pending -= set(wait(list(pending), left))
        for worker in workers:
            if worker.process.sentinel in pending:
                logger.warning(
                    "safepool: pool %r: worker %d ignored SIGTERM for %gs; SIGKILL",
                    self.name,
                    worker.pid,
                    grace,
                )
                _kill(worker.pid, signal.SIGKILL)
        if self._state == BROKEN:
            error = PoolClosed(f"worker pool {self.name!r} is broken: {self._broken_reason}")
        else:
            error = PoolClosed(f"worker pool {self.name!r} was terminated before the task finished")
        for worker in workers:
            worker.process.join()
            self.exits.append((worker.pid, worker.process.exitcode))
            self._drain(worker)
            worker.conn.close()
            if worker.chunk is not None and worker.done < len(worker.chunk.items):
                fail_chunks([worker.chunk.rest(worker.done)], error)
        self._workers.clear()
        # A dead worker's unstarted tasks may have been queued again after terminate() or
        # _break() emptied the queue (its exit was handled after the message that broke the
        # pool): nothing will run them now, so they fail too instead of waiting forever.
        with self._lock:
            dropped = list(self._queue)
            self._queue.clear()
        fail_chunks(dropped, error)

    def _break(self, reason: str, detail: str = "") -> None:
        """The pool cannot run tasks (a worker's initializer failed): fail everything."""
        with self._lock:
            self._state = BROKEN
            self._broken_reason = reason
            dropped = list(self._queue)
            self._queue.clear()
        logger.error("safepool: worker pool %r is broken: %s\n%s", self.name, reason, detail)
        fail_chunks(dropped, PoolClosed(f"worker pool {self.name!r} is broken: {reason}"))


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _ended(worker: _Worker) -> str:
    sig = _signal_name(worker.process.exitcode)
    return f"was killed by {sig}" if sig else f"exited with code {worker.process.exitcode}"
