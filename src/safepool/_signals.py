"""Signal and exit handling for pool worker processes (used by :mod:`safepool.workers`).

What :func:`make_worker_signal_safe` does in a worker, and why:

* **SIGTERM raises** :class:`WorkerTerminated`, a :class:`SystemExit` subclass. ``Pool.worker``
  catches ``Exception`` around each task, so a handler that raises an ``Exception`` subclass is
  taken for a failed task and the worker waits for more work while ``Pool.terminate()`` waits for
  it to exit: a deadlock. A ``SystemExit`` passes every ``except Exception``, runs ``finally``
  blocks and ``__exit__`` methods (a ``with pool.lease()`` gives its item back), and
  ``Process._bootstrap`` turns it into a quiet exit with code :data:`TERMINATED_EXIT_CODE`
  (128 + SIGTERM, the shell's convention), without the traceback a bare ``BaseException``
  prints. After the first SIGTERM the default action is back, so a second one kills the worker
  at once (for a cleanup that hangs, or for code that swallowed the exception).
* **A SIGTERM is never lost.** CPython runs a Python-level handler only when the main thread
  returns to the interpreter. A SIGTERM that arrives just before the main thread blocks in a
  system call (the idle worker's ``sem_wait`` on the task queue's lock, or its ``read``) is
  recorded but its handler never runs, and the worker waits forever: we saw it in about 1 of 30
  ``terminate()`` calls with four fork workers. So each worker also routes signals into a pipe
  (``signal.set_wakeup_fd``, written by the C-level handler at delivery) that a small daemon
  thread reads; when a SIGTERM comes in and the handler has not run, the thread interrupts the
  main thread with the no-op SIGINT (the blocked call fails with EINTR, CPython runs the pending
  handlers, the SIGTERM one raises), backing off, and if the handler still has not run after
  :data:`HANDLER_GRACE` seconds (the main thread is stuck in C code that retries EINTR itself) it
  ends the worker with ``os._exit(143)``, as the default action would have ended it at once.
  A child the worker forks starts its own thread. Python 3.12+ warns when a multi-threaded
  process calls ``os.fork()``, so a task that forks sees that warning.
* **SIGINT does nothing** (a Python-level no-op handler): Ctrl+C reaches the whole foreground
  process group, and it is the parent's to act on; the parent then ends the workers. A no-op
  handler rather than ``SIG_IGN``, because an ignored signal stays ignored in every program the
  worker runs with ``subprocess``; a handler is reset to the default by ``exec``.
* **Other Python-level handlers are reset to the default.** Under fork a worker inherits the
  parent's handlers (a SIGHUP handler that reloads, a SIGUSR1 handler that removes a pidfile)
  and the parent's ``signal.set_wakeup_fd`` descriptor: a signal the worker gets is written into
  the parent's event loop, which then runs *its* handler (asyncio on Python 3.10 and 3.11). After
  the reset a worker behaves as under spawn and forkserver: a fresh interpreter's defaults (and
  its wakeup fd is its own pipe). Ignored signals (Python ignores SIGPIPE and SIGXFSZ) stay
  ignored.
* **A SIGTERM swallowed by a finalizer still ends the worker.** The handler raises wherever
  the main thread is; if that is inside a ``__del__`` or a weakref callback (the decref round
  trip a Manager proxy makes when a task's arguments are dropped), CPython reports the
  exception through ``sys.unraisablehook`` ("Exception ignored in ...") and carries on, and the
  worker would go back to waiting for tasks. A signal-safe worker's unraisable hook recognises
  :class:`WorkerTerminated`, re-arms the handler and sends the SIGTERM again, so it is raised
  at the next point where it can propagate (outside the finalizer); a worker whose finalizers
  swallow it :data:`SWALLOW_LIMIT` times is ended with ``os._exit(143)``.
* **A worker that is already exiting dies of SIGTERM** (the default action), as a stdlib worker
  does, instead of raising inside its exit code (finalizers, atexit callbacks): the handler
  raises only while the interrupted frame is inside the worker's ``Process.run()``.
* **atexit handlers registered before the worker was set up are dropped.** A fork worker never
  runs the parent's (3.10-3.12 end it with ``os._exit``; 3.13 clears atexit after the fork and
  runs only what the worker registers). A spawn worker, and a forkserver worker from Python 3.13,
  runs those registered while it imported modules, including the parent's main module (imported
  again as ``__mp_main__``): a top-level ``atexit.register(remove_pidfile)`` would run in every
  worker. multiprocessing's own exit function, and ``logging.shutdown`` when logging is loaded,
  are registered again; handlers registered later (by the initializer or by tasks) run.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found] # (no stubs: the C module behind signal)
import atexit
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing import util
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from ._waiting import Flag
from .errors import TaskAborted

__all__ = [
    "HANDLER_GRACE",
    "SWALLOW_LIMIT",
    "TERMINATED_EXIT_CODE",
    "WorkerTerminated",
    "daemon_thread",
    "make_worker_signal_safe",
    "start_daemon",
    "start_without_signals",
    "terminate_requested",
]


_ALL_SIGNALS = signal.valid_signals()
# signal.pthread_sigmask is a Python wrapper of this C function (see start_without_signals).
_sigmask: Callable[[int, Iterable[int]], set[int]] = _signal.pthread_sigmask


def start_without_signals(thread: threading.Thread) -> None:
    """Start ``thread`` with every signal blocked, a mask it inherits and keeps: the kernel then
    delivers signals to the main thread (where a blocked system call fails with EINTR and
    handlers run). A thread-directed signal that arrives meanwhile waits until ``start()`` has
    returned: a handler raising inside ``Thread.start()`` can leave the threading module's
    bookkeeping of the new thread half-made.

    The caller's mask is read (changing nothing) before the ``try``, and blocked inside it: a
    handler raising as the blocking call returns still finds the mask restored by ``finally``
    (read and blocked in one call, before the ``try``, it could leave this thread with every
    signal blocked for good)."""
    mask = _sigmask(signal.SIG_BLOCK, ())
    try:
        _sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
        thread.start()
    finally:
        # The C function, not signal.pthread_sigmask: that is Python code, and a handler could
        # run at its first instruction (for a signal another thread took) and skip the restore.
        _sigmask(signal.SIG_SETMASK, mask)


def start_daemon(target: Callable[..., object], *args: object, name: str) -> threading.Thread:
    """Start a daemon thread running ``target(*args)`` (see :func:`start_without_signals`) that
    restores the caller's signal mask before it runs ``target``: for threads that run the
    user's code (hooks, callbacks), and threads they start, which inherit the mask.

    The thread is returned once started. Cut short (an exception from a signal handler in the
    caller, before or after the start), it may or may not have started: callers keep the
    thread they start only when this returns, and treat one that is not alive as gone."""
    thread = daemon_thread(target, *args, name=name)
    start_without_signals(thread)
    return thread


def daemon_thread(target: Callable[..., object], *args: object, name: str) -> threading.Thread:
    """The thread :func:`start_daemon` starts, made but not started: for a caller that must
    know, after an interruption, whether it started (``thread.ident is not None``)."""
    mask = _sigmask(signal.SIG_BLOCK, ())
    return threading.Thread(target=_masked, args=(mask, target, args), name=name, daemon=True)


def _masked(mask: set[int], target: Callable[..., object], args: tuple[object, ...]) -> None:
    _sigmask(signal.SIG_SETMASK, mask)
    target(*args)


logger = logging.getLogger(__name__)

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143
# Seconds the watcher thread keeps interrupting a main thread that has not run the SIGTERM
# handler, before it ends the worker without cleanup.
HANDLER_GRACE = 1.0
# How many times finalizers may swallow WorkerTerminated before the worker exits without cleanup.
SWALLOW_LIMIT = 3


class WorkerTerminated(SystemExit):
    """Raised in a worker process by safepool's SIGTERM handler, to end the worker.

    A :class:`SystemExit`, not an ``Exception``: ``except Exception`` (in ``Pool.worker``, or in
    task code) does not stop it, ``finally`` blocks and ``__exit__`` methods run, and the worker
    exits with code :data:`TERMINATED_EXIT_CODE` (143). It is deliberately not a
    :class:`~safepool.SafePoolError`: ``except SafePoolError`` must not swallow it either.

    Sent to another process (``ProcessPoolExecutor`` reports every ``BaseException`` a task
    raises as that task's result), it arrives as a :class:`~safepool.TaskAborted`: a
    ``SystemExit`` must never be re-raised in the parent, where it would end the parent.
    """

    def __init__(self, message: str = "the worker process received SIGTERM") -> None:
        super().__init__(message)
        self.code = TERMINATED_EXIT_CODE

    def __reduce__(self) -> tuple[Any, ...]:
        message = f"the task was interrupted: {self}"
        state = {"exc_type": "safepool.WorkerTerminated", "exc_message": str(self)}
        return (TaskAborted, (message,), state)


_RUN_CODE = BaseProcess.run.__code__


def _in_run(frame: FrameType | None) -> bool:
    """Whether ``frame`` is inside the worker's ``Process.run()`` (not yet exiting)."""
    while frame is not None:
        if frame.f_code is _RUN_CODE:
            return True
        frame = frame.f_back
    return False


# Set by the SIGTERM handler: this worker was asked to end (read by the worker pool's loop,
# which exits between tasks even if task code swallowed WorkerTerminated). And how many times a
# finalizer swallowed the exception (see _on_unraisable).
_terminating = False
_swallowed = 0


def terminate_requested() -> bool:
    """Whether this process received SIGTERM through safepool's handler."""
    return _terminating


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM takes the default action: it ends a worker whose cleanup hangs, or one
    # whose code swallowed the exception.
    global _terminating
    _terminating = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watcher = _watcher
    if watcher is not None:
        watcher.handled.set()
    if not _in_run(frame):
        # run() is over: the worker is exiting (finalizers, atexit callbacks). Die of the
        # signal, as a stdlib worker would, rather than raise inside that exit code.
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise WorkerTerminated(f"worker process {os.getpid()} received SIGTERM")


_previous_unraisablehook: Callable[[Any], object] = sys.unraisablehook
_in_hook = False  # the main thread is inside _on_unraisable


def _on_unraisable(unraisable: Any) -> None:
    """``sys.unraisablehook`` of a signal-safe worker: a WorkerTerminated that a finalizer
    swallowed (raised inside a ``__del__`` or a weakref callback) is raised again, outside it."""
    global _in_hook
    if not isinstance(unraisable.exc_value, WorkerTerminated):
        _previous_unraisablehook(unraisable)
        return
    _in_hook = True
    try:
        _raise_again()
    finally:
        _in_hook = False


def _raise_again() -> None:
    global _swallowed
    _swallowed += 1
    if _swallowed >= SWALLOW_LIMIT:
        os.write(
            2,
            f"safepool: worker process {os.getpid()}: finalizers swallowed WorkerTerminated "
            f"{_swallowed} times; exiting without cleanup\n".encode(),
        )
        os._exit(TERMINATED_EXIT_CODE)
    # Sent from another thread once this hook has returned: a signal sent from here would run
    # the handler inside the hook, where its exception would be swallowed too.
    signal.signal(signal.SIGTERM, _on_sigterm)
    watcher = _watcher
    if watcher is not None:
        watcher.rearm()
    main = threading.main_thread().ident or 0
    threading.Thread(target=_resend_sigterm, args=(main, time.monotonic() + HANDLER_GRACE),
                     name="safepool-sigterm-resend", daemon=True).start()  # fmt: skip


def _resend_sigterm(main: int, deadline: float) -> None:
    """SIGTERM the main thread again once it is out of the unraisable hook (and so out of the
    finalizer), where the handler's exception propagates."""
    while _in_hook and time.monotonic() < deadline:
        time.sleep(0.001)
    signal.pthread_kill(main, signal.SIGTERM)


def _ignore_sigint(signum: int, frame: FrameType | None) -> None:
    """Ctrl+C is for the parent process; the parent ends its workers."""


class _Watcher:
    """Makes sure the main thread runs the SIGTERM handler (see "A SIGTERM is never lost")."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # set_wakeup_fd requires it
        self.handled = Flag()  # set by _on_sigterm, in the main thread (a signal handler)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = self._start_thread()

    def _start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="safepool-sigterm-watcher", daemon=True)
        start_without_signals(thread)
        return thread

    def rearm(self) -> None:
        """Watch for the next SIGTERM too (the handler was re-installed after a swallow)."""
        self.handled.clear()
        if not self.thread.is_alive():
            self.thread = self._start_thread()

    def _run(self) -> None:
        try:
            while True:
                data = os.read(self.read_fd, 512)
                if not data or self.handled.is_set():
                    return
                if signal.SIGTERM in data and signal.getsignal(signal.SIGTERM) is _on_sigterm:
                    self._ensure_handled()
                    return
        except OSError:  # pragma: no cover - the pipe was closed under us
            return

    def _ensure_handled(self) -> None:
        if self.handled.wait(0.005):  # the usual case: the main thread ran it at once
            return
        main = threading.main_thread().ident
        deadline = time.monotonic() + HANDLER_GRACE
        delay = 0.005
        while time.monotonic() < deadline:
            # A no-op SIGINT makes a blocked system call in the main thread fail with EINTR;
            # CPython then runs the pending handlers in signal-number order (SIGINT's no-op,
            # then SIGTERM's, which raises). Never if SIGINT's handler is not our no-op.
            if main is not None and signal.getsignal(signal.SIGINT) is _ignore_sigint:
                signal.pthread_kill(main, signal.SIGINT)
            if self.handled.wait(delay):
                return
            delay = min(delay * 2, 0.1)
        os.write(
            2,
            f"safepool: worker process {os.getpid()} did not run its SIGTERM handler within "
            f"{HANDLER_GRACE}s; exiting without cleanup\n".encode(),
        )
        os._exit(TERMINATED_EXIT_CODE)

    def forget(self) -> None:
        """In a forked child: the thread is gone; close the inherited pipe."""
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


# The watcher of this worker process, None outside signal-safe workers; and the process it is for.
_watcher: _Watcher | None = None
_watcher_pid = 0


def _after_fork_in_child() -> None:
    """A child forked by a signal-safe worker (a task's os.fork(), a nested pool) gets its own
    watcher, as long as it keeps safepool's SIGTERM handler.

    Registered twice: at import, and again when a worker is set up, so that it also runs after
    the at-fork hooks of modules imported in between (asyncio's, on 3.12+, clears the wakeup fd
    in every forked child). The first run in a child makes the watcher; a later run only sets
    the wakeup fd back to it.
    """
    global _watcher, _watcher_pid
    if _watcher is None:
        return
    if _watcher_pid == os.getpid():
        signal.set_wakeup_fd(_watcher.write_fd, warn_on_full_buffer=False)
        return
    old, _watcher = _watcher, None
    old.forget()
    if signal.getsignal(signal.SIGTERM) is _on_sigterm:
        _watcher, _watcher_pid = _Watcher(), os.getpid()
    else:  # pragma: no cover - the handler was replaced before the fork
        signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _reset_inherited_handlers() -> list[str]:
    """Set every Python-level handler (inherited under fork) back to the default action."""
    reset = []
    for signum in sorted(signal.valid_signals()):
        if signum in (signal.SIGINT, signal.SIGTERM):
            continue
        try:
            handler = signal.getsignal(signum)
            if callable(handler):
                signal.signal(signum, signal.SIG_DFL)
                reset.append(signal.Signals(signum).name)
        except (OSError, ValueError):  # pragma: no cover - signals Python cannot handle
            continue
    return reset


def _drop_atexit_handlers() -> None:
    clear: Callable[[], None] | None = getattr(atexit, "_clear", None)
    if clear is None:  # pragma: no cover - CPython 3.10-3.13 all have it
        logger.debug("atexit._clear() is missing; atexit handlers are left as they are")
        return
    clear()
    atexit.register(getattr(util, "_exit_function"))  # noqa: B009 - not in typeshed
    logging_module = sys.modules.get("logging")
    if logging_module is not None:
        atexit.register(logging_module.shutdown)


def make_worker_signal_safe() -> None:
    """Set up signal and exit handling in a pool worker process (see the module docstring).

    Runs in the worker's main thread, as ``Pool`` and ``ProcessPoolExecutor`` initializers do.
    In another thread (a ``ThreadPool`` initializer) there is no worker process to set up: the
    call logs a warning and changes nothing. In the main thread of a process that is not a
    multiprocessing child it raises, since it would disable Ctrl+C for the whole program.
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning(
            "safepool: signal_safe=True has no effect in thread %r: signal handling belongs to "
            "processes (pass signal_safe=False for a ThreadPool)",
            threading.current_thread().name,
        )
        return
    if multiprocessing.parent_process() is None:
        raise RuntimeError(
            "safepool's signal-safe worker setup runs in pool worker processes; this process "
            f"(pid {os.getpid()}) is not a multiprocessing child, and the setup would disable "
            "Ctrl+C in it. Pass it to a Pool or ProcessPoolExecutor as its initializer."
        )
    global _watcher, _watcher_pid
    reset = _reset_inherited_handlers()
    signal.signal(signal.SIGINT, _ignore_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    if _watcher is None:
        _watcher = _Watcher()  # also replaces a wakeup fd inherited from the parent
        _watcher_pid = os.getpid()
        # Run (again) after the at-fork hooks of everything imported so far: see above.
        os.register_at_fork(after_in_child=_after_fork_in_child)
    global _previous_unraisablehook
    if sys.unraisablehook is not _on_unraisable:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _on_unraisable
    _drop_atexit_handlers()
    if reset:
        logger.debug("safepool: worker %d reset inherited signal handlers: %s", os.getpid(), reset)
