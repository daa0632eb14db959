"""terminate() always terminates; soft and hard time limits; recycling workers.

Each hazard is shown first with the plain stdlib ``Pool`` (the control), bounded by a timeout,
under fork, spawn and forkserver.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import manager_targets
import workerpool_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, wait_until
from safepool import (
    HardTimeLimitExceeded,
    PoolManager,
    SoftTimeLimitExceeded,
    WorkerLost,
    WorkerSetup,
)

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(300)]

GRACE = 0.5  # terminate_grace in these tests
HANG_BOUND = 0.5  # how long a control waits to show that terminate() does not return
RECLAIM_BOUND = 1.0  # a killed holder's lease is back within this (process-bound leases)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


def limits_setup(method: str) -> tuple[WorkerSetup, Any, Any]:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    return setup, ready, cleaned


def within(action: Callable[[], object], bound: float) -> tuple[bool, float]:
    """Run ``action`` in a thread; whether it returned within ``bound`` s, and how long."""
    started = time.monotonic()
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    thread.join(bound)
    return not thread.is_alive(), time.monotonic() - started


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- terminate() ---------------------------------------------------------------------------------

STUCK = {
    # task, its argument, how the worker ends: 143 = SIGTERM handled, -9 = SIGKILL after grace
    "slow-finalizer": (targets.take, "finalizer", 143),
    "c-call": (targets.c_sleep, 60, 143),
    "sigterm-ignored": (targets.ignore_sigterm_and_sleep, LONG, -signal.SIGKILL),
    "sigterm-blocked": (targets.sigterm_blocked_sleep, LONG, -signal.SIGKILL),
}


@pytest.mark.parametrize("case", sorted(STUCK))
@pytest.mark.parametrize("method", START_METHODS)
def test_terminate_ends_a_stuck_worker_within_the_grace_period(method: str, case: str) -> None:
    task, arg, exitcode = STUCK[case]
    setup, ready, cleaned = limits_setup(method)
    pool = setup.Pool(1, terminate_grace=GRACE)
    argument = targets.SlowFinalizer() if arg == "finalizer" else arg
    result = pool.apply_async(task, (argument,))
    del argument
    pid = ready.get(timeout=LONG)  # in the finalizer / the C call / the ignoring task
    worker = pool.pids[0]
    assert worker == pid
    finished, seconds = within(pool.terminate, GRACE + SHORT)
    assert finished, f"terminate() did not return within {GRACE + SHORT}s"
    assert seconds < GRACE + 1.0
    if exitcode == 143:
        assert seconds < GRACE  # SIGTERM did it: no need for SIGKILL
    else:
        assert seconds >= GRACE * 0.9  # it waited the grace period, then killed
    result.wait(SHORT)  # its result, or PoolClosed: it never waits forever
    assert result.ready()
    if case == "c-call":  # reachable: the task's finally ran
        assert cleaned.get() == (pid, "WorkerTerminated")
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), SHORT, "the worker is gone")


@pytest.mark.parametrize("method", START_METHODS)
def test_control_stdlib_terminate_hangs_when_sigterm_is_ignored(method: str) -> None:
    setup, ready, _ = limits_setup(method)
    pool = setup.context.Pool(1, **setup.pool_kwargs(signal_safe=False))
    pool.apply_async(targets.ignore_sigterm_and_sleep, (LONG,))
    pid = ready.get(timeout=LONG)
    finished, _ = within(lambda: (pool.terminate(), pool.join()), HANG_BOUND)
    kill_all([pid])  # let the stuck terminate() return
    assert not finished


@pytest.mark.parametrize("method", START_METHODS)
def test_control_a_finalizer_swallows_a_sigterm_handlers_exception(method: str) -> None:
    """A correct handler (SystemExit) raised inside __del__ is discarded: the stdlib worker goes
    back for work and terminate() never returns. With safepool's worker set-up, even in the
    stdlib Pool, the unraisable hook raises it again outside the finalizer: prompt."""
    for helper in (False, True):
        setup, ready, _ = limits_setup(method)
        if helper:
            pool = setup.context.Pool(1, **setup.pool_kwargs())
        else:
            kwargs = setup.pool_kwargs(
                initializer=targets.install_system_exit_sigterm_handler, signal_safe=False
            )
            pool = setup.context.Pool(1, **kwargs)
        pool.apply_async(targets.take, (targets.SlowFinalizer(),))
        pid = ready.get(timeout=LONG)
        finished, _ = within(lambda pool=pool: (pool.terminate(), pool.join()), HANG_BOUND)
        kill_all([pid])
        assert finished is helper, f"helper={helper}"


# -- time limits -------------------------------------------------------------------------------


@pytest.fixture(params=START_METHODS)
def leased(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    """A PoolManager pool of one item (process-bound leases), and the start method."""
    ctx = multiprocessing.get_context(request.param)
    with PoolManager(ctx=ctx) as manager:
        pool = manager.SafeConnectionPool(
            factory=manager_targets.TokenFactory(), max_size=1, share="value"
        )
        yield request.param, pool


@pytest.mark.parametrize("method", START_METHODS)
def test_control_stdlib_pool_has_no_time_limit(method: str) -> None:
    """A timeout on get() only stops the wait: the task keeps running and keeps its worker."""
    setup, ready, cleaned = limits_setup(method)
    pool = setup.context.Pool(1, **setup.pool_kwargs())
    try:
        result = pool.apply_async(targets.report_and_sleep_long, (LONG,))
        pid = ready.get(timeout=LONG)
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(HANG_BOUND)
        assert not result.ready() and cleaned.empty()  # still running, in the same worker
        assert os.path.exists(f"/proc/{pid}")
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.parametrize("use_with", [True, False], ids=["with-lease", "acquire"])
def test_soft_limit_raises_in_the_task_and_the_lease_comes_back(
    leased: tuple[str, Any], use_with: bool
) -> None:
    method, leases = leased
    setup, ready, _ = limits_setup(method)
    with setup.Pool(1, soft_time_limit=0.3) as pool:
        result = pool.apply_async(targets.lease_and_sleep, (leases, LONG, use_with))
        pid = ready.get(timeout=LONG)
        with pytest.raises(SoftTimeLimitExceeded, match=r"soft time limit of 0\.3s") as info:
            result.get(SHORT)
        assert info.value.limit == 0.3
        assert pool.pids == [pid]  # the worker lives on
        if use_with:  # the with block gave it back; the worker is alive, nothing reclaimed
            assert leases.stats().leased == 0 and leases.stats().reclaimed == 0
        else:  # a plain acquire is the task's to release: still held by the live worker
            assert leases.stats().leased == 1
        assert pool.apply(targets.square, (4,)) == 16


@pytest.mark.parametrize("use_with", [True, False], ids=["with-lease", "acquire"])
def test_hard_limit_kills_the_worker_and_its_lease_comes_back(
    leased: tuple[str, Any], use_with: bool
) -> None:
    method, leases = leased
    setup, ready, _ = limits_setup(method)
    with setup.Pool(1) as pool:
        result = pool.apply_async(targets.lease_and_sleep, (leases, LONG, use_with),
                                  time_limit=0.5)  # fmt: skip
        pid = ready.get(timeout=LONG)
        with pytest.raises(HardTimeLimitExceeded, match=r"hard time limit of 0\.5s") as info:
            result.get(SHORT)
        killed = time.monotonic()
        assert isinstance(info.value, WorkerLost) and isinstance(info.value, TimeoutError)
        assert (info.value.pid, info.value.signal, info.value.limit) == (pid, "SIGKILL", 0.5)
        item = leases.acquire(timeout=LONG)  # the server reclaims the dead worker's lease
        assert time.monotonic() - killed < RECLAIM_BOUND
        leases.release(item)
        assert leases.stats().reclaimed == 1
        assert pool.apply(targets.getpid) != pid  # replaced


@pytest.mark.parametrize("method", START_METHODS)
def test_a_task_that_swallows_the_soft_limit_meets_the_hard_one(method: str) -> None:
    setup, ready, cleaned = limits_setup(method)
    with setup.Pool(1, soft_time_limit=0.2, time_limit=0.6) as pool:
        result = pool.apply_async(targets.swallow_soft_limit, (LONG,))
        pid = ready.get(timeout=LONG)
        with pytest.raises(HardTimeLimitExceeded):
            result.get(SHORT)
        assert cleaned.get() == (pid, "SoftTimeLimitExceeded")
        # Per call: no limit at all overrides the defaults.
        assert pool.apply(targets.sleep_for, (0.7,), soft_time_limit=None, time_limit=None) > 0


def test_limits_apply_per_task_of_a_map_and_a_fast_task_is_never_hit() -> None:
    with WorkerSetup(context="fork").Pool(2, time_limit=0.5) as pool:
        results = pool.imap(targets.sleep_for, [0.01, SHORT, 0.01, 0.01])
        got: list[Any] = []
        for _ in range(4):
            try:
                got.append(results.next(LONG))
            except HardTimeLimitExceeded as exc:
                got.append(exc)
        assert [type(x).__name__ for x in got] == ["int", "HardTimeLimitExceeded", "int", "int"]
        assert pool.map(targets.square, range(1000)) == [x * x for x in range(1000)]


def test_limits_and_options_are_checked_up_front() -> None:
    setup = WorkerSetup(context="fork")
    with pytest.raises(ValueError, match=r"soft_time_limit .* must be less than time_limit"):
        setup.Pool(1, soft_time_limit=2, time_limit=1)
    with pytest.raises(ValueError, match="time_limit must be > 0 seconds"):
        setup.Pool(1, time_limit=0)
    with pytest.raises(ValueError, match="terminate_grace must be >= 0"):
        setup.executor(1, terminate_grace=-1)
    with pytest.raises(ValueError, match="max_memory_per_child must be >= 1"):
        setup.Pool(1, max_memory_per_child=0)
    with setup.Pool(1) as pool:
        with pytest.raises(TypeError, match="soft_time_limit must be a number of seconds"):
            pool.apply(targets.square, (1,), soft_time_limit="1")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            pool.map(targets.square, [1], chunksize=0)
        assert pool.apply(targets.square, (5,)) == 25  # nothing changed


# -- recycling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_max_tasks_per_child_replaces_workers_and_loses_no_task(method: str) -> None:
    with WorkerSetup(context=method).Pool(2, maxtasksperchild=3) as pool:
        pids = pool.map(targets.getpid, range(9), chunksize=2)
        assert len(pids) == 9
        assert max(pids.count(pid) for pid in set(pids)) <= 3
        assert len(set(pids)) >= 3
        assert pool.replaced == 0  # retirements are not failures
    with WorkerSetup(context=method).executor(1, max_tasks_per_child=2) as executor:
        pids = list(executor.map(targets.getpid, range(4)))
        assert [pids.count(pid) for pid in dict.fromkeys(pids)] == [2, 2]


@pytest.mark.parametrize("method", START_METHODS)
def test_max_memory_per_child_replaces_a_worker_that_grew(method: str) -> None:
    setup = WorkerSetup(context=method)
    with setup.Pool(1) as probe:
        baseline = probe.apply(targets.rss)
    # Wide margins both ways: a fresh worker's resident set is the parent's at its fork, which
    # moves by megabytes between the probe and the pool (the parent runs other tests).
    with setup.Pool(1, max_memory_per_child=baseline + (64 << 20)) as pool:
        pids = pool.map(targets.leak, [48] * 6, chunksize=2)
        assert len(pids) == 6
        assert len(set(pids)) == 3  # 96 MiB per chunk: replaced after each chunk
        assert pool.replaced == 0
        assert pool.map(targets.square, range(10)) == [x * x for x in range(10)]


@pytest.mark.parametrize("method", START_METHODS)
def test_executor_shutdown_with_cancel_is_bounded(method: str) -> None:
    setup, ready, _ = limits_setup(method)
    executor = setup.executor(1, terminate_grace=GRACE)
    running = executor.submit(targets.ignore_sigterm_and_sleep, LONG)
    queued = executor.submit(targets.square, 3)
    ready.get(timeout=LONG)
    finished, seconds = within(lambda: executor.shutdown(wait=True, cancel_futures=True),
                               GRACE + SHORT)  # fmt: skip
    assert finished and seconds < GRACE + 1.0
    assert queued.cancelled()
    assert running.exception(SHORT) is not None
