"""Tasks, initializers and driver scripts for tests/test_workers.py.

Module-level so that spawn and forkserver workers can import them. The ``main()`` drivers run in
a child Python process of their own (``python -m workers_targets <scenario> ...``), for scenarios
that signal a whole process group or that hang on purpose: they print one JSON object per line
on stdout ({"ready": [...]} once the workers are busy, then the outcome).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from safepool.workers import WorkerSetup, safe_task, worker_resource

LONG = 60.0
# The helper ends workers well within this; the stdlib hazard does not end them at all.
TERMINATE_BOUND = 2.0
# How long the Ctrl+C driver lets workers report before it terminates them.
CTRL_C_GRACE = 1.0

# A module-level lock (seed 004): made when this module is imported. Fork workers inherit the
# parent's; spawn and forkserver workers import the module again and each make their own.
MODULE_LOCK = multiprocessing.Lock()

# Set by init_stdlib_lock (the stdlib way: a lock passed in initargs, kept in a global).
_stdlib_lock: Any = None

# Set by user_initializer (composition test).
_user_tag: str | None = None

# The unguarded, import-time atexit registration of the atexit test (the parent's main module
# registering its shutdown logic at top level; spawn re-imports it in every worker).
if os.environ.get("WORKERS_TARGETS_ATEXIT_DIR"):

    def _atexit_marker() -> None:
        directory = Path(os.environ["WORKERS_TARGETS_ATEXIT_DIR"])
        (directory / f"atexit-{os.getpid()}").touch()

    atexit.register(_atexit_marker)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- tasks ----------------------------------------------------------------------------------------


def count(n: int, lock_kind: str, spread: int) -> int:
    """Add 1 to the raw shared ``counter`` n times, once every worker is at the start barrier.

    The read and the write are ``spread`` loop iterations apart, so that two processes that
    interleave lose updates unless a lock shared by both serialises them.
    """
    counter = worker_resource("counter")
    if lock_kind == "shared":
        lock = worker_resource("lock")
    elif lock_kind == "module":
        lock = MODULE_LOCK
    else:
        lock = None
    worker_resource("start").wait(LONG)
    for _ in range(n):
        if lock is not None and not lock.acquire(timeout=LONG):
            raise TimeoutError(f"worker {os.getpid()}: lock not acquired in {LONG}s")
        value = counter.value
        for _ in range(spread):
            pass
        counter.value = value + 1
        if lock is not None:
            lock.release()
    return os.getpid()


def try_acquire(name: str) -> bool:
    """Whether the lock ``name`` is free here (acquired without blocking, then released)."""
    lock = worker_resource(name)
    if lock.acquire(False):
        lock.release()
        return True
    return False


def report_and_block(i: int) -> None:
    """Report this worker's pid on ``ready``, block on ``never``; record how the block ended."""
    pid = os.getpid()
    how = "returned"
    try:
        worker_resource("ready").put(pid)
        worker_resource("never").wait(LONG)
    except BaseException as exc:
        how = type(exc).__name__
        raise
    finally:
        worker_resource("cleaned").put((pid, how))


def _main_thread_blocked_reading(fd: int) -> bool:
    """Whether this process's main thread is inside a system call on ``fd`` (e.g. read)."""
    tid = threading.main_thread().native_id
    try:
        fields = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] != "running" and int(fields[1], 16) == fd


def sigterm_while_main_thread_blocked(_: object = None) -> None:
    """Make a SIGTERM's C-level handler run in another thread while the main thread is blocked
    in read(): the Python handler cannot run until something interrupts that read.

    This is the lost-SIGTERM race made deterministic (normally the signal lands just before the
    main thread blocks). A helper thread waits until the main thread is in the read, then sends
    SIGTERM to itself and reports "sent".
    """
    pid = os.getpid()
    read_fd, _write_fd = os.pipe()  # nothing is ever written: the read blocks

    def send() -> None:
        deadline = time.monotonic() + LONG
        while not _main_thread_blocked_reading(read_fd):
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        worker_resource("sent").put(pid)

    threading.Thread(target=send, daemon=True).start()
    how = "returned"
    try:
        os.read(read_fd, 1)
    except BaseException as exc:
        how = type(exc).__name__
        raise
    finally:
        worker_resource("cleaned").put((pid, how))


def lease_and_block(_: object = None) -> None:
    """Hold a lease of a (worker-local) SafeConnectionPool while blocked; the pool's reset hook
    reports the release."""
    from safepool import SafeConnectionPool

    released = worker_resource("cleaned")

    def reset(item: object) -> bool:
        released.put((os.getpid(), "released"))
        return True

    pool: SafeConnectionPool[object] = SafeConnectionPool(factory=object, max_size=1, reset=reset)
    with pool.lease():
        worker_resource("ready").put(os.getpid())
        worker_resource("never").wait(LONG)


def fork_and_report(_: object = None) -> dict[str, Any]:
    """os.fork() in a task: what does the child inherit from a signal-safe worker?"""
    from safepool import _signals

    read_fd, write_fd = os.pipe()
    parent_watcher = _signals._watcher
    pid = os.fork()
    if pid == 0:  # the child
        try:
            watcher = _signals._watcher
            report = {
                "handler_is_ours": signal.getsignal(signal.SIGTERM) is _signals._on_sigterm,
                "new_watcher": watcher is not None and watcher is not parent_watcher,
                "thread_alive": watcher is not None and watcher.thread.is_alive(),
                "wakeup_is_its_pipe": watcher is not None
                and signal.set_wakeup_fd(watcher.write_fd) == watcher.write_fd,
            }
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    result: dict[str, Any] = json.loads(data)
    return result


def getpid(_: object = None) -> int:
    return os.getpid()


def exit_task(kind: str) -> str:
    """Report this worker's pid, then raise the BaseException named by ``kind``."""
    worker_resource("ready").put(os.getpid())
    if kind == "SystemExit":
        raise SystemExit(3)
    if kind == "KeyboardInterrupt":
        raise KeyboardInterrupt("raised by the task")
    if kind == "BaseException":
        raise BaseException("a bare BaseException")
    return kind


safe_exit_task = safe_task(exit_task)  # wrapped at module level, under another name


@safe_task
def decorated_exit(kind: str) -> str:
    if kind == "SystemExit":
        raise SystemExit("bye")
    if kind == "ValueError":
        raise ValueError("an ordinary error")
    return kind


def plain_exit() -> None:
    """No WorkerSetup involved: raise SystemExit (for the ProcessPoolExecutor control)."""
    raise SystemExit(3)


def lookup(name: str) -> object:
    return worker_resource(name)


def lookup_type(name: str) -> str:
    return type(worker_resource(name)).__name__


def use_lock_argument(lock: Any) -> bool:
    with lock:
        return True


def user_initializer(tag: str) -> None:
    """A user's initializer: runs after safepool's part, so resources are available."""
    global _user_tag
    worker_resource("lock")
    _user_tag = tag


def user_state(_: object = None) -> tuple[str | None, bool, str]:
    handler = signal.getsignal(signal.SIGINT)
    return (
        _user_tag,
        worker_resource("lock") is not None,
        getattr(handler, "__name__", str(handler)),
    )


def signal_state(_: object = None) -> dict[str, str]:
    """This worker's SIGINT/SIGTERM/SIGUSR1/SIGHUP handlers and wakeup fd."""
    state = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        handler = signal.getsignal(sig)
        if isinstance(handler, signal.Handlers):
            state[sig.name] = handler.name
        else:
            state[sig.name] = getattr(handler, "__qualname__", str(handler))
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    state["wakeup_fd"] = str(fd)
    return state


class HandlerError(Exception):
    """What a SIGTERM handler of seed 003 raises: an Exception subclass."""


def _raise_handler_error(signum: int, frame: object) -> None:
    raise HandlerError("SIGTERM")


def install_exception_sigterm_handler() -> None:
    signal.signal(signal.SIGTERM, _raise_handler_error)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(143)


def install_system_exit_sigterm_handler() -> None:
    """A correct SIGTERM handler (it raises a BaseException), without safepool's watcher."""
    signal.signal(signal.SIGTERM, _raise_system_exit)


def init_stdlib_lock(lock: Any) -> None:
    """The stdlib recipe: a lock passed in initargs, kept in a module global."""
    global _stdlib_lock
    _stdlib_lock = lock


def use_stdlib_lock(_: object = None) -> bool:
    with _stdlib_lock:
        return True


# -- drivers (run as python -m workers_targets <scenario> ...) ------------------------------------


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _blocking_setup(method: str) -> tuple[WorkerSetup, Any, Any]:
    """A setup for report_and_block, with its ``ready`` and ``cleaned`` queues."""
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.event("never")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    return setup, ready, cleaned


def _pool(setup: WorkerSetup, signal_safe: str, **kwargs: Any) -> Any:
    """Two workers: safepool's WorkerPool ("1"), or the control, a stdlib Pool with the
    resources but not the signal handling ("0")."""
    if signal_safe == "1":
        return setup.Pool(2, **kwargs)
    return setup.context.Pool(2, **setup.pool_kwargs(signal_safe=False, **kwargs))


def _drain(simple_queue: Any) -> list[Any]:
    items = []
    while not simple_queue.empty():
        items.append(simple_queue.get())
    return items


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def drive_terminate(method: str, variant: str) -> None:
    """Busy workers, then terminate() + join(), bounded: did it finish, and how did tasks end?

    variant "exception-handler": stdlib signal handling plus an initializer that installs a
    SIGTERM handler raising an Exception subclass (seed 003). "helper": safepool's handling.
    """
    setup, ready, cleaned = _blocking_setup(method)
    if variant == "exception-handler":
        pool = _pool(setup, "0", initializer=install_exception_sigterm_handler)
    else:
        pool = setup.Pool(2)
    pool.map_async(report_and_block, range(2), chunksize=1)
    pids = [ready.get(timeout=LONG) for _ in range(2)]
    _emit(ready=pids)
    finished, seconds = _terminate_within(pool, TERMINATE_BOUND)
    ended = _drain(cleaned)
    if not finished:
        _kill(pids)  # they would wait forever; end them before this process goes
    _emit(finished=finished, seconds=seconds, cleaned=ended)
    if not finished:
        os._exit(0)  # not through exit handlers, which would join the (killed) pool


def _terminate_within(pool: Any, bound: float) -> tuple[bool, float]:
    """terminate() + join() in a thread; whether they returned within ``bound`` seconds."""
    started = time.monotonic()
    ender = threading.Thread(target=lambda: (pool.terminate(), pool.join()), daemon=True)
    ender.start()
    ender.join(bound)
    return not ender.is_alive(), time.monotonic() - started


def drive_asyncio_parent(method: str, signal_safe: str) -> None:
    """An asyncio parent with loop.add_signal_handler(SIGTERM, ...) and a pool."""
    # Imported here only: on 3.12+ importing asyncio resets the wakeup fd in every forked
    # child, which would hide the inherited wakeup fd from the other drivers.
    import asyncio

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ran: list[str] = []
        loop.add_signal_handler(signal.SIGTERM, ran.append, "the parent's SIGTERM handler")
        setup, ready, cleaned = _blocking_setup(method)
        pool = _pool(setup, signal_safe)
        pool.map_async(report_and_block, range(2), chunksize=1)
        pids = [ready.get(timeout=LONG) for _ in range(2)]
        _emit(ready=pids)
        finished, seconds = _terminate_within(pool, TERMINATE_BOUND)
        for _ in range(50):  # let the loop read its self-pipe (bounded: 0.5 s)
            await asyncio.sleep(0.01)
            if ran:
                break
        ended = _drain(cleaned)
        if not finished:
            _kill(pids)
        _emit(finished=finished, seconds=seconds, parent_handler_ran=bool(ran), cleaned=ended)
        if not finished:
            os._exit(0)

    asyncio.run(main())


def drive_ctrl_c(method: str, signal_safe: str) -> None:
    """Busy workers; the test sends SIGINT to the whole process group."""
    # As a program started from a terminal: Ctrl+C raises KeyboardInterrupt, whatever the
    # disposition inherited from the test process. Python leaves an ignored SIGINT ignored, and
    # a test run started in the background by a non-interactive shell (`.ci/run &`) has SIGINT
    # and SIGQUIT ignored throughout (POSIX: asynchronous lists ignore both).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup, ready, cleaned = _blocking_setup(method)
    before: list[Any] = []
    try:
        with _pool(setup, signal_safe) as pool:
            result = pool.map_async(report_and_block, range(2), chunksize=1)
            pids = [ready.get(timeout=LONG) for _ in range(2)]
            try:
                _emit(ready=pids)  # the test sends Ctrl+C once it has read this
                result.get(LONG)
            except KeyboardInterrupt:
                # Before the with block terminates the workers: did Ctrl+C reach them? (Bounded:
                # signal-safe workers report nothing until they are terminated. The control's
                # workers do, within a second on an idle machine; longer under load.)
                grace = CTRL_C_GRACE if signal_safe == "1" else 5 * CTRL_C_GRACE
                deadline = time.monotonic() + grace
                while len(before) < len(pids) and time.monotonic() < deadline:
                    before.extend(_drain(cleaned))
                    time.sleep(0.01)
                raise
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    _emit(outcome=outcome, before_terminate=before, cleaned=before + _drain(cleaned))


def drive_parent_handlers(method: str, signal_safe: str, directory: str) -> None:
    """The parent has a SIGTERM handler that removes its pidfile, and a wakeup fd."""
    parent = os.getpid()
    pidfile = Path(directory) / "service.pid"
    pidfile.write_text(str(parent))

    def remove_pidfile_and_exit(signum: int, frame: object) -> None:
        (Path(directory) / f"handler-ran-in-{os.getpid()}").touch()
        pidfile.unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, remove_pidfile_and_exit)
    signal.signal(signal.SIGHUP, remove_pidfile_and_exit)
    signal.signal(signal.SIGUSR1, remove_pidfile_and_exit)
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_r, False)
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    setup, ready, cleaned = _blocking_setup(method)
    pool = _pool(setup, signal_safe)
    states = pool.map(signal_state, range(4), chunksize=1)
    pool.map_async(report_and_block, range(2), chunksize=1)
    pids = [ready.get(timeout=LONG) for _ in range(2)]
    _emit(ready=pids)
    pool.terminate()
    pool.join()
    try:
        woken = list(os.read(wakeup_r, 1024))
    except BlockingIOError:
        woken = []
    _emit(
        parent_wakeup_fd=wakeup_w,
        worker_states=states,
        pidfile_exists=pidfile.exists(),
        handler_ran_in=sorted(p.name for p in Path(directory).glob("handler-ran-in-*")),
        wakeup_bytes=woken,
        cleaned=_drain(cleaned),
    )


def drive_atexit(method: str, signal_safe: str, how: str) -> None:
    """Workers of the main module that registered an atexit handler at import time."""
    setup = WorkerSetup(context=method)
    setup.lock("lock")
    pool = _pool(setup, signal_safe)
    pids = sorted(set(pool.map(getpid, range(8), chunksize=1)))
    if how == "terminate":
        pool.terminate()
    else:
        pool.close()
    pool.join()
    _emit(parent=os.getpid(), workers=pids)


def main(argv: list[str]) -> None:
    scenario, *args = argv
    drivers = {
        "terminate": drive_terminate,
        "ctrl-c": drive_ctrl_c,
        "parent-handlers": drive_parent_handlers,
        "atexit": drive_atexit,
        "asyncio-parent": drive_asyncio_parent,
    }
    drivers[scenario](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
