"""Worker helpers: locks shared with pool workers, and tasks that raise SystemExit.

Every hazard the helpers fix is first shown with the stdlib alone (a control that would make
the real test meaningless if it did not fail), under fork, spawn and forkserver. Signal
handling is in test_worker_signals.py.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import multiprocessing.pool
import os
import pickle
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import workers_targets
from helpers import FORK_WARNING, LONG, START_METHODS, wait_until
from safepool import errors
from safepool.errors import TaskAborted, WorkerResourceError
from safepool.workers import (
    TERMINATED_EXIT_CODE,
    WorkerSetup,
    WorkerTerminated,
    safe_task,
    worker_resource,
)
from workers_targets import alive

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(300)]

SPREAD = 2000  # loop iterations between a worker's read and write of the counter
ATTEMPTS = 5  # runs of the no-lock control before we give up on seeing a lost update
NON_FORK = [m for m in START_METHODS if m != "fork"]


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Finalise each test's dead pools and locks here, at a safe point. Left to a later garbage
    collection, their semaphores' finalisers can run inside a resource-tracker call, which
    CPython 3.11.7+ reports as "Reentrant call into the multiprocessing resource tracker" (an
    unraisable warning, so a failure under -W error; we saw it on 3.12)."""
    yield
    gc.collect()


# -- sharing a lock: the counter --------------------------------------------------------------


def counter_setup(method: str, parties: int = 4) -> tuple[WorkerSetup, Any]:
    setup = WorkerSetup(context=method)
    counter = setup.value("counter", "i", 0, lock=False)  # raw: no lock of its own
    setup.lock("lock")
    setup.barrier("start", parties, timeout=LONG)
    return setup, counter


def run_counter(setup: WorkerSetup, counter: Any, lock_kind: str, attempts: int = 1) -> list[int]:
    """4 workers x 1,000 increments; returns the total of each run (stops at the first loss)."""
    totals = []
    with setup.Pool(4) as pool:
        for _ in range(attempts):
            counter.value = 0
            pids = pool.starmap(workers_targets.count, [(1000, lock_kind, SPREAD)] * 4, chunksize=1)
            assert len(set(pids)) == 4  # four processes, released together by the barrier
            totals.append(counter.value)
            if counter.value < 4000:
                break
    return totals


@pytest.mark.parametrize("method", START_METHODS)
def test_shared_lock_gives_exactly_4000(method: str) -> None:
    setup, counter = counter_setup(method)
    assert run_counter(setup, counter, "shared") == [4000]


@pytest.mark.parametrize("method", START_METHODS)
def test_control_without_a_lock_updates_are_lost(method: str) -> None:
    setup, counter = counter_setup(method)
    totals = run_counter(setup, counter, "none", attempts=ATTEMPTS)
    assert min(totals) < 4000, f"no update lost in {ATTEMPTS} runs: {totals}"


@pytest.mark.parametrize("method", START_METHODS)
def test_control_module_level_lock_works_only_under_fork(method: str) -> None:
    """Seed 004: a module-level lock is inherited under fork, a new one per worker otherwise."""
    setup, counter = counter_setup(method)
    if method == "fork":
        assert run_counter(setup, counter, "module") == [4000]
    else:
        totals = run_counter(setup, counter, "module", attempts=ATTEMPTS)
        assert min(totals) < 4000, f"no update lost in {ATTEMPTS} runs: {totals}"


@pytest.mark.parametrize("method", START_METHODS)
def test_executor_workers_share_the_lock(method: str) -> None:
    setup, counter = counter_setup(method, parties=2)
    with setup.executor(2) as executor:
        pids = list(executor.map(workers_targets.count, [1000] * 2, ["shared"] * 2, [SPREAD] * 2))
    assert len(set(pids)) == 2
    assert counter.value == 2000


@pytest.mark.parametrize("method", START_METHODS)
def test_worker_holds_the_very_lock_of_the_parent(method: str) -> None:
    setup = WorkerSetup(context=method)
    lock = setup.lock("lock")
    with setup.Pool(1) as pool:
        assert pool.apply(workers_targets.try_acquire, ("lock",)) is True
        with lock:
            assert pool.apply(workers_targets.try_acquire, ("lock",)) is False
        assert pool.apply(workers_targets.try_acquire, ("lock",)) is True


@pytest.mark.parametrize("method", START_METHODS)
def test_user_initializer_runs_after_the_resources_are_set(method: str) -> None:
    setup = WorkerSetup(context=method)
    setup.lock("lock")
    with setup.Pool(1, initializer=workers_targets.user_initializer, initargs=("mine",)) as pool:
        assert pool.apply(workers_targets.user_state) == ("mine", True, "_ignore_sigint")
    kwargs = setup.pool_kwargs(
        initializer=workers_targets.user_initializer, initargs=["x"], signal_safe=False
    )
    with setup.context.Pool(1, **kwargs) as pool:
        tag, has_lock, sigint = pool.apply(workers_targets.user_state)
    assert (tag, has_lock) == ("x", True)
    assert sigint != "_ignore_sigint"


def test_worker_resource_outside_a_worker_says_how_to_set_it_up() -> None:
    with pytest.raises(WorkerResourceError, match=r"not a pool worker .* setup\.Pool\(\)"):
        worker_resource("lock")
    with pytest.raises(LookupError):
        worker_resource("lock")
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        worker_resource("")


@pytest.mark.parametrize("method", START_METHODS)
def test_unknown_resource_in_a_worker_lists_what_exists(method: str) -> None:
    setup = WorkerSetup(context=method)
    setup.lock("lock")
    setup.semaphore("slots", 2)
    with setup.Pool(1) as pool:
        with pytest.raises(WorkerResourceError, match=r"it has \['lock', 'slots'\]"):
            pool.apply(workers_targets.lookup_type, ("locks",))
        setup.event("late")  # added after this pool was set up: not in its workers
        with pytest.raises(WorkerResourceError, match="'late'"):
            pool.apply(workers_targets.lookup_type, ("late",))
    with setup.Pool(1) as pool:  # a new pool gets it
        assert pool.apply(workers_targets.lookup_type, ("late",)) == "Event"


# -- sharing a lock: the stdlib hazards and misuse ---------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_control_lock_as_task_argument_fails_in_stdlib(method: str) -> None:
    """Seed 001: a multiprocessing lock cannot travel in a task's arguments."""
    ctx = multiprocessing.get_context(method)
    with (
        ctx.Pool(1) as pool,
        pytest.raises(RuntimeError, match="only be shared between processes through inh"),
    ):
        pool.apply(workers_targets.use_lock_argument, (ctx.Lock(),))


@pytest.mark.parametrize("method", NON_FORK)
def test_control_fork_lock_in_a_non_fork_pool_fails_in_stdlib(method: str) -> None:
    """3.11+ refuse a fork-context lock in initargs; 3.10 hands it over and the worker's first
    acquire uses a dangling sem_t pointer: the behaviour is undefined (a segfault, an error exit,
    or a wait that never ends), so the only dependable fact is that the result never arrives."""
    lock = multiprocessing.get_context("fork").Lock()
    ctx = multiprocessing.get_context(method)
    kwargs: dict[str, Any] = {"initializer": workers_targets.init_stdlib_lock, "initargs": (lock,)}
    if sys.version_info >= (3, 11):
        with pytest.raises(RuntimeError, match="created in a fork context"):
            ctx.Pool(1, **kwargs)
        return
    with ctx.Pool(1, **kwargs) as pool:
        first = pool._pool[0]
        result = pool.apply_async(workers_targets.use_stdlib_lock)
        first.join(LONG)  # dies, or hangs on the garbage semaphore
        assert first.exitcode != 0
        assert not result.ready()


@pytest.mark.parametrize("method", NON_FORK)
def test_fork_setup_in_a_non_fork_pool_fails_at_creation(method: str) -> None:
    setup = WorkerSetup(context="fork")
    setup.lock("lock")
    with pytest.raises(ValueError, match=rf"\['lock'\].*'fork'.*'{method}'.*setup\.Pool\(\)"):
        multiprocessing.get_context(method).Pool(1, **setup.pool_kwargs())
    with (
        pytest.raises(ValueError, match=r"setup\.executor\(\)"),
        concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context(method), **setup.pool_kwargs()
        ) as executor,
    ):
        executor.submit(os.getpid).result(LONG)


def fork_made_objects() -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    return {
        "Lock": ctx.Lock(),
        "RLock": ctx.RLock(),
        "Semaphore": ctx.Semaphore(2),
        "BoundedSemaphore": ctx.BoundedSemaphore(2),
        "Condition": ctx.Condition(),
        "Event": ctx.Event(),
        "Barrier": ctx.Barrier(2),
        "Queue": ctx.Queue(),
        "JoinableQueue": ctx.JoinableQueue(),
        "SimpleQueue": ctx.SimpleQueue(),
        "Value": ctx.Value("i", 0),
        "Array": ctx.Array("i", 3),
    }


@pytest.mark.parametrize("method", NON_FORK)
@pytest.mark.parametrize("kind", sorted(fork_made_objects()))
def test_fork_made_objects_are_refused_by_a_non_fork_setup(method: str, kind: str) -> None:
    setup = WorkerSetup(context=method)
    obj = fork_made_objects()[kind]
    with pytest.raises(ValueError, match=rf"made in the 'fork' context.*'{method}' context"):
        setup.add("thing", obj)
    assert setup.resources == {}  # nothing changed
    fork_setup = WorkerSetup(context="fork")
    assert fork_setup.add("thing", obj) is obj  # the fork setup takes it


def test_fork_lock_given_as_the_lock_of_a_value_is_refused() -> None:
    setup = WorkerSetup(context="spawn")
    fork_lock = multiprocessing.get_context("fork").Lock()
    with pytest.raises(ValueError, match="the lock given for 'counter'"):
        setup.value("counter", "i", 0, lock=fork_lock)
    with pytest.raises(ValueError, match="the lock given for 'c'"):
        setup.condition("c", fork_lock)
    own = setup.lock("own")
    counter = setup.value("counter", "i", 0, lock=own)
    assert counter.get_lock() is own


@pytest.mark.parametrize(
    "make",
    [threading.Lock, threading.RLock, threading.Condition, threading.Semaphore,
     threading.Event, lambda: threading.Barrier(2), queue.Queue, queue.SimpleQueue],
    ids=["Lock", "RLock", "Condition", "Semaphore", "Event", "Barrier", "Queue", "SimpleQueue"],
)  # fmt: skip
def test_threading_objects_are_refused_with_the_fix(make: Any) -> None:
    setup = WorkerSetup(context="spawn")
    with pytest.raises(TypeError, match=r"threads of one process.*setup\.lock\('db'\)"):
        setup.add("db", make())
    assert setup.resources == {}


@pytest.mark.parametrize(
    ("obj", "match"),
    [({"a": 1}, "Plain data is copied"), (object(), "add\\(\\) takes"),
     (__import__("ctypes").c_int(3), "ordinary process memory")],
    ids=["dict", "object", "ctypes"],
)  # fmt: skip
def test_objects_that_would_be_copied_are_refused(obj: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        WorkerSetup(context="spawn").add("x", obj)


def test_accepted_objects_from_any_non_fork_context() -> None:
    """A spawn-made lock works in forkserver and fork workers alike: accepted everywhere."""
    spawn = multiprocessing.get_context("spawn")
    for method in START_METHODS:
        setup = WorkerSetup(context=method)
        setup.add("lock", spawn.Lock())
        setup.add("raw", spawn.RawValue("d", 1.5))
        setup.add("raw_array", spawn.RawArray("i", 4))
        setup.add("queue", spawn.SimpleQueue())
        assert sorted(setup.resources) == ["lock", "queue", "raw", "raw_array"]


@pytest.mark.parametrize("method", START_METHODS)
def test_a_manager_lock_can_be_shared_too(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with ctx.Manager() as manager:
        setup = WorkerSetup(context=method)
        lock = setup.add("lock", manager.Lock())
        with setup.Pool(1) as pool:
            with lock:
                assert pool.apply(workers_targets.try_acquire, ("lock",)) is False
            assert pool.apply(workers_targets.try_acquire, ("lock",)) is True


def test_names_and_arguments_are_checked_at_once() -> None:
    setup = WorkerSetup(context="spawn")
    setup.lock("lock")
    with pytest.raises(ValueError, match="'lock' already exists"):
        setup.rlock("lock")
    for bad in (None, "", 3):
        with pytest.raises(TypeError, match="name must be a non-empty str"):
            setup.lock(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="value must be >= 0"):
        setup.semaphore("s", -1)
    with pytest.raises(ValueError, match="parties must be >= 1"):
        setup.barrier("b", 0)
    with pytest.raises(ValueError, match="array-module typecode"):
        setup.value("v", "zz", 0)
    with pytest.raises(TypeError, match="ctypes type"):
        setup.array("a", int, 3)
    with pytest.raises(TypeError, match="lock must be a Lock or RLock"):
        setup.value("v", "i", 0, lock=threading.Lock())
    assert list(setup.resources) == ["lock"]  # nothing else was added
    with pytest.raises(TypeError, match="initializer must be callable"):
        setup.pool_kwargs(initializer=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="initargs must be a tuple"):
        setup.pool_kwargs(initializer=print, initargs="ab")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without an initializer"):
        setup.pool_kwargs(initargs=(1,))
    with pytest.raises(TypeError, match="signal_safe must be a bool"):
        setup.pool_kwargs(signal_safe=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="processes must be >= 1"):
        setup.Pool(0)
    with pytest.raises(ValueError, match="context must be one of"):
        WorkerSetup(context="threads")
    with pytest.raises(TypeError, match="context must be a start method name"):
        WorkerSetup(context=3)  # type: ignore[arg-type]


def test_context_forms_and_what_is_not_picklable() -> None:
    assert WorkerSetup(context=multiprocessing.get_context("spawn")).start_method == "spawn"
    default = WorkerSetup()
    assert default.start_method == multiprocessing.get_start_method()
    assert repr(WorkerSetup(context="spawn")) == "<WorkerSetup 'spawn' resources=[]>"
    setup = WorkerSetup(context="spawn")
    setup.lock("lock")
    with pytest.raises(TypeError, match="worker_resource"):
        pickle.dumps(setup)
    with pytest.raises(RuntimeError, match="only as it starts"):
        pickle.dumps(setup.pool_kwargs())


# -- tasks that raise SystemExit / KeyboardInterrupt --------------------------------------------


KINDS = ["SystemExit", "KeyboardInterrupt", "BaseException"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", START_METHODS)
def test_control_stdlib_pool_loses_the_result_of_such_a_task(method: str, kind: str) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    with setup.context.Pool(1, **setup.pool_kwargs()) as pool:
        lost = pool.apply_async(workers_targets.exit_task, (kind,))
        pid = ready.get(timeout=LONG)
        wait_until(lambda: not alive(pid), LONG, "the worker that ran the task ended")
        # The pool replaced the worker and works, but the task's result can never arrive: the
        # only process that ran it is gone, and results of later tasks come back first.
        assert pool.apply(os.getpid) != pid
        assert not lost.ready()
    with setup.Pool(1) as safe_pool:  # safepool's own pool reports it without safe_task
        with pytest.raises(TaskAborted, match=f"exit_task raised {kind}"):
            safe_pool.apply(workers_targets.exit_task, (kind,))
        assert safe_pool.apply(os.getpid) == ready.get(timeout=LONG)  # the same worker


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", START_METHODS)
def test_safe_task_turns_it_into_an_error_and_the_pool_stays_usable(method: str, kind: str) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    with setup.Pool(1) as pool:
        with pytest.raises(TaskAborted, match=f"exit_task raised {kind}") as info:
            pool.apply(workers_targets.safe_exit_task, (kind,))
        assert info.value.exc_type == kind
        pid = ready.get(timeout=LONG)
        assert pool.apply(os.getpid) == pid  # the same worker, still there
        assert pool.apply(safe_task(workers_targets.getpid)) == pid  # wrapped at the call site
        with pytest.raises(ValueError, match="an ordinary error"):
            pool.apply(workers_targets.decorated_exit, ("ValueError",))
        assert pool.apply(workers_targets.decorated_exit, ("fine",)) == "fine"


@pytest.mark.parametrize("method", START_METHODS)
def test_control_executor_reraises_systemexit_in_the_parent(method: str) -> None:
    ctx = multiprocessing.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as executor:
        future = executor.submit(workers_targets.plain_exit)
        assert type(future.exception(LONG)) is SystemExit  # result() would end the parent
    setup = WorkerSetup(context=method)
    with setup.executor(1) as executor:
        future = executor.submit(safe_task(workers_targets.plain_exit))
        with pytest.raises(TaskAborted, match="raised SystemExit: 3") as info:
            future.result(LONG)
        assert (info.value.exc_type, info.value.exc_message) == ("SystemExit", "3")


def test_safe_task_changes_nothing_outside_a_worker() -> None:
    with pytest.raises(SystemExit):
        workers_targets.decorated_exit("SystemExit")
    assert workers_targets.decorated_exit("ok") == "ok"
    assert workers_targets.decorated_exit.__name__ == "decorated_exit"
    assert pickle.loads(pickle.dumps(workers_targets.decorated_exit)) is (
        workers_targets.decorated_exit
    )
    wrapped = safe_task(workers_targets.getpid)
    assert pickle.loads(pickle.dumps(wrapped))() == os.getpid()
    with pytest.raises(TypeError, match="fn must be callable"):
        safe_task(3)  # type: ignore[arg-type]


def test_worker_terminated_is_a_quiet_exit_and_crosses_processes_as_task_aborted() -> None:
    exc = WorkerTerminated("worker process 7 received SIGTERM")
    assert isinstance(exc, SystemExit)
    assert not isinstance(exc, Exception)
    assert exc.code == TERMINATED_EXIT_CODE == 143
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is TaskAborted
    assert copy.exc_type == "safepool.WorkerTerminated"
    assert copy.exc_message == "worker process 7 received SIGTERM"
    assert "TaskAborted" in errors.__all__ and "WorkerResourceError" in errors.__all__
