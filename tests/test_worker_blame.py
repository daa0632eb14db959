"""Per-task blame: a worker that dies fails exactly the task it ran, promptly; nothing hangs.

The fault-injection sweep kills workers (SIGKILL, SIGTERM) at seeded delays during a map of
200 tasks, under fork, spawn and forkserver, and checks the invariants after each round. Each
hazard is shown first with the plain stdlib ``Pool`` (the control), bounded by a timeout.
"""

from __future__ import annotations

import functools
import gc
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import workerpool_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, seeded, sweep_size, wait_until
from safepool import PoolClosed, TaskAborted, WorkerLost, WorkerPool, WorkerSetup

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(300)]

TASKS = 200
BLAME_BOUND = 1.0  # a dead worker's task fails within this (seconds)
HANG_BOUND = 0.5  # how long a control waits to show that a result never arrives


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


def blame_setup(method: str, workers: int = 2) -> tuple[WorkerSetup, dict[str, Any]]:
    setup = WorkerSetup(context=method)
    arrays = {
        "runs": setup.array("runs", "i", TASKS, lock=False),
        "ran_on": setup.array("ran_on", "q", TASKS, lock=False),
        "done": setup.array("done", "i", TASKS, lock=False),
    }
    setup.barrier("barrier", workers, timeout=LONG)
    return setup, arrays


def full_capacity(pool: WorkerPool, workers: int) -> None:
    """Every worker slot is usable: ``workers`` live workers meet at the barrier."""
    pids = pool.map(targets.at_barrier, range(workers), chunksize=1)
    assert len(set(pids)) == workers


class Killer(threading.Thread):
    """Kills a worker of ``pool`` after each delay, preferring one that has run a task (not a
    replacement still starting); records (pid, time) of every kill."""

    def __init__(self, pool: WorkerPool, arrays: dict[str, Any], sig: int, delays: list[float],
                 rng: Any) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.pool, self.ran_on, self.sig, self.delays, self.rng = (
            pool, arrays["ran_on"], sig, delays, rng
        )  # fmt: skip
        self.kills: dict[int, float] = {}

    def run(self) -> None:
        for delay in self.delays:
            time.sleep(delay)  # the swept interruption point, not a synchronisation
            # Never the same worker twice: a second SIGTERM kills at once (by design), which
            # would not be the first one's outcome.
            pids = sorted(set(self.pool.pids) - set(self.kills))
            if not pids:
                continue
            busy = sorted(set(self.ran_on[:]) & set(pids))
            pid = self.rng.choice(busy or pids)
            self.kills[pid] = time.monotonic()
            os.kill(pid, self.sig)


def run_round(pool: WorkerPool, arrays: dict[str, Any], sig: int, rng: Any) -> dict[str, Any]:
    """One map of TASKS tasks with kills at seeded delays; every outcome and when it came."""
    for array in arrays.values():
        array[:] = [0] * TASKS
    seconds = rng.choice([0.001, 0.002, 0.004])
    payload = rng.choice([0, 0, 300_000])  # large results: kills land inside a send
    chunksize = rng.choice([1, 5, 25])
    span = TASKS * seconds / 2  # about how long the map runs on 2 workers
    delays = [rng.uniform(0.0, 0.5 * span) for _ in range(rng.choice([1, 2]))]
    killer = Killer(pool, arrays, sig, delays, rng)
    task = functools.partial(targets.recorded, seconds=seconds, payload=payload)
    # Unordered, so that each outcome is timed when it arrives (an ordered imap would hold a
    # failure back until the tasks before it, requeued on a replacement, have run).
    results = pool.imap_unordered(task, range(TASKS), chunksize)
    killer.start()
    outcomes: dict[int, Any] = {}
    arrived: dict[int, float] = {}
    for _ in range(TASKS):
        try:
            square, _payload = results.next(LONG)
            i = math.isqrt(square)
            outcomes[i] = square
        except WorkerLost as exc:
            i = int(re.search(r"task #(\d+) of its job", exc.task).group(1))  # type: ignore[union-attr]
            outcomes[i] = exc
        assert i not in arrived, f"task {i} reported twice"
        arrived[i] = time.monotonic()
    killer.join(LONG)
    return {"outcomes": outcomes, "arrived": arrived, "kills": killer.kills,
            "params": (seconds, payload, chunksize, delays)}  # fmt: skip


EXTRA_ROUNDS = 8


def check_round(found: dict[str, Any], arrays: dict[str, Any], sig: int, where: str) -> int:
    outcomes, arrived, kills = found["outcomes"], found["arrived"], found["kills"]
    runs, ran_on, done = list(arrays["runs"]), list(arrays["ran_on"]), list(arrays["done"])
    failed = {i for i, o in outcomes.items() if isinstance(o, WorkerLost)}
    for i, outcome in outcomes.items():
        if i in failed:
            assert outcome.pid in kills, (where, i, outcome)
            assert ran_on[i] in (0, outcome.pid), (where, i)  # 0: killed before it wrote
            assert runs[i] <= 1, (where, i)
            if sig == signal.SIGKILL:
                assert (outcome.exitcode, outcome.signal) == (-signal.SIGKILL, "SIGKILL"), where
            else:  # safepool's handler: WorkerTerminated, finally blocks, exit 143
                assert outcome.exitcode == 143, (where, outcome)
            assert f"#{i} of its job" in outcome.task and "recorded" in outcome.task
            assert arrived[i] - kills[outcome.pid] <= BLAME_BOUND, (where, i)
        else:
            assert outcome == i * i, (where, i, outcome)
            assert runs[i] == 1, (where, i)  # ran once: nothing ran twice, nothing was lost
        if ran_on[i] in kills and not done[i]:
            assert i in failed, (where, i)  # it was running when its worker was killed
    return len(failed)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("method", START_METHODS)
def test_killed_workers_fail_exactly_their_tasks_during_a_map(method: str, sig: int) -> None:
    name = f"blame-{method}-{signal.Signals(sig).name}"
    rng = seeded(name)
    rounds = sweep_size(3, other_versions=2, long=200)
    setup, arrays = blame_setup(method)
    failures = 0
    with setup.Pool(2) as pool:
        n = 0
        # The planned rounds; then, on a machine so loaded that no kill landed on a running
        # task yet, a few more (seeded too), so that the sweep always tests something.
        while n < rounds or (failures == 0 and n < rounds + EXTRA_ROUNDS):
            found = run_round(pool, arrays, sig, rng)
            where = f"{name} round {n} (seed sweep {name!r}, params {found['params']})"
            failures += check_round(found, arrays, sig, where)
            full_capacity(pool, 2)
            n += 1
    assert failures > 0, "no kill landed on a running task: the sweep tested nothing"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("method", START_METHODS)
def test_control_stdlib_pool_never_delivers_a_killed_workers_task(method: str, sig: int) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.add("cleaned", setup.context.SimpleQueue())
    with setup.context.Pool(2, **setup.pool_kwargs(signal_safe=False)) as pool:
        result = pool.map_async(targets.report_and_sleep, [LONG, 0.0, 0.0], chunksize=1)
        pid = ready.get(timeout=LONG)
        os.kill(pid, sig)
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(HANG_BOUND)  # without a timeout: forever (gh-66587)
        assert (
            pool.apply(
                targets.getpid,
                (None,),
            )
            != pid
        )  # replaced; the task is lost


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("method", START_METHODS)
def test_map_raises_worker_lost_instead_of_hanging(method: str, sig: int) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    cleaned = setup.add("cleaned", setup.context.SimpleQueue())
    setup.barrier("barrier", 2, timeout=LONG)
    with setup.Pool(2) as pool:
        full_capacity(pool, 2)  # both workers are up: the quick tasks do not wait for one
        result = pool.map_async(targets.report_and_sleep, [LONG, 0.0, 0.0], chunksize=1)
        pid = ready.get(timeout=LONG)
        killed = time.monotonic()
        os.kill(pid, sig)
        with pytest.raises(WorkerLost, match=rf"worker process {pid} .*report_and_sleep") as info:
            result.get(LONG)
        assert time.monotonic() - killed < BLAME_BOUND
        assert info.value.pid == pid and info.value.reason == "running"
        if sig == signal.SIGTERM:  # the task's finally ran before the worker exited
            assert info.value.exitcode == 143
            wait_until(lambda: not cleaned.empty(), SHORT, "the finally block's report")
            assert (pid, "WorkerTerminated") in [cleaned.get() for _ in range(3)]
        assert pool.map(targets.square, range(4)) == [0, 1, 4, 9]
        assert pid not in pool.pids and len(pool.pids) == 2
        assert pool.replaced == 1


@pytest.mark.parametrize("method", START_METHODS)
def test_executor_fails_only_the_future_of_a_dead_worker(method: str) -> None:
    setup = WorkerSetup(context=method)
    ready = setup.queue("ready")
    setup.add("cleaned", setup.context.SimpleQueue())
    with setup.executor(2) as executor:
        doomed = executor.submit(targets.report_and_sleep, LONG)
        pid = ready.get(timeout=LONG)
        others = [executor.submit(targets.square, i) for i in range(10)]
        os.kill(pid, signal.SIGKILL)
        error = doomed.exception(LONG)
        assert isinstance(error, WorkerLost) and error.signal == "SIGKILL"
        assert [f.result(LONG) for f in others] == [i * i for i in range(10)]
        assert list(executor.map(targets.square, range(3))) == [0, 1, 4]  # not broken


@pytest.mark.parametrize("method", START_METHODS)
def test_exits_and_task_errors_are_reported_per_task(method: str) -> None:
    with WorkerSetup(context=method).Pool(1) as pool:
        with pytest.raises(WorkerLost, match=r"exited with code 7 while running task") as info:
            pool.apply(targets.exit_now, (7,))
        assert (info.value.exitcode, info.value.signal) == (7, "")
        with pytest.raises(TaskAborted, match="raised SystemExit: 5"):
            pool.apply(targets.raise_system_exit)  # the worker survives it
        with pytest.raises(TypeError, match="cannot be sent to the parent"):
            pool.apply(targets.unpicklable_result)
        with pytest.raises(Exception, match=r"pickle|attribute lookup|local object"):
            pool.apply(lambda: None)  # cannot be sent to a worker: fails alone
        assert pool.map(targets.square, range(3)) == [0, 1, 4]
        assert pool.replaced == 1


def test_the_pool_interface_matches_multiprocessing() -> None:
    calls: list[Any] = []
    with WorkerSetup(context="fork").Pool(2) as pool:
        assert pool.apply(divmod, (7, 2)) == (3, 1)
        assert pool.apply(int, ("ff",), {"base": 16}) == 255
        async_result = pool.apply_async(targets.square, (3,), callback=calls.append)
        assert async_result.get(LONG) == 9 and async_result.successful()
        assert pool.starmap(divmod, [(7, 2), (9, 4)]) == [(3, 1), (2, 1)]
        assert sorted(pool.imap_unordered(targets.square, range(5))) == [0, 1, 4, 9, 16]
        assert list(pool.imap(targets.square, range(5), 2)) == [0, 1, 4, 9, 16]
        assert pool.map(targets.square, []) == []
        errors: list[BaseException] = []
        failing = pool.map_async(int, ["1", "x"], error_callback=errors.append)
        with pytest.raises(ValueError, match="invalid literal"):
            failing.get(LONG)
        assert len(errors) == 1 and not failing.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            pool.apply_async(targets.sleep_for, (0.5,)).get(0.01)
        pool.close()
        with pytest.raises(PoolClosed, match="closed: it takes no new tasks"):
            pool.apply(targets.square, (1,))
        pool.join(LONG)
    assert calls == [9]
    with pytest.raises(ValueError, match=r"join\(\) needs close\(\) or terminate\(\) first"):
        WorkerSetup(context="fork").Pool(1).join()


def test_tasks_queued_when_terminate_is_called_fail_with_pool_closed() -> None:
    pool = WorkerSetup(context="fork").Pool(1)
    running = pool.apply_async(targets.sleep_for, (LONG,))
    queued = pool.apply_async(targets.square, (2,))
    pool.terminate()
    for result in (running, queued):
        with pytest.raises(PoolClosed, match="terminated"):
            result.get(SHORT)
    pool.join(SHORT)


@pytest.mark.parametrize("method", START_METHODS)
def test_a_failing_initializer_breaks_the_pool_with_its_error(method: str) -> None:
    setup = WorkerSetup(context=method)
    with setup.Pool(1, initializer=targets.failing_initializer) as pool:
        for _ in range(2):  # sent before the failure was known, or refused after it
            with pytest.raises(PoolClosed, match=r"initializer raised RuntimeError: no database"):
                pool.apply(targets.square, (2,))


@pytest.mark.parametrize("method", START_METHODS)
def test_tasks_in_flight_when_an_initializer_fails_never_hang(method: str) -> None:
    """The failing worker's exit can be handled after the message that broke the pool; the
    task it had been sent is queued again then, and must still fail (it once waited forever).
    Repeated, because it depends on whether both arrive in one round of the manager thread."""
    setup = WorkerSetup(context=method)
    for _ in range(sweep_size(10, other_versions=4)):
        with setup.Pool(1, initializer=targets.failing_initializer) as pool:
            results, refused = [], []
            for n in range(3):
                try:
                    results.append(pool.apply_async(targets.square, (n,)))
                except PoolClosed as exc:  # refused: the failure was known by then
                    refused.append(str(exc))
            assert all("initializer raised RuntimeError" in text for text in refused), refused
            for result in results:
                with pytest.raises(PoolClosed, match=r"initializer raised RuntimeError"):
                    result.get(timeout=LONG)
