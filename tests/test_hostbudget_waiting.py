"""Waiting for a permit: timeouts never early, FIFO hand-off across threads and processes,
interrupted waiters leave the queue and lose nothing."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import hostbudget_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, seeded, sweep_size, wait_until
from safepool import BudgetTimeout, HostBudget

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]


@pytest.fixture
def name() -> Iterator[str]:
    n = f"hbw-{uuid.uuid4().hex[:12]}"
    yield n
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/safepool-budget-{n}")


@pytest.mark.parametrize("timeout", [0.001, 0.005, 0.02, 0.1])
def test_a_timeout_is_never_early(name: str, timeout: float) -> None:
    budget = HostBudget(name, 1)
    held = budget.acquire()
    for _ in range(5):
        start = time.monotonic()
        with pytest.raises(BudgetTimeout, match="within the timeout"):
            budget.acquire(timeout=timeout)
        assert time.monotonic() - start >= timeout
    stats = budget.stats()
    assert (stats.timeouts, stats.waiting, stats.in_use) == (5, 0, 1)
    budget.release(held)
    budget.close()


def test_waiters_are_served_first_come_first_served_across_threads(name: str) -> None:
    budget = HostBudget(name, 1)
    held = budget.acquire()
    order: list[int] = []
    threads = []
    for i in range(6):

        def wait(i: int = i) -> None:
            permit = budget.acquire(timeout=LONG)
            order.append(i)
            budget.release(permit)

        t = threading.Thread(target=wait)
        t.start()
        threads.append(t)
        wait_until(lambda i=i: budget.stats().waiting == i + 1, what=f"waiter {i} queued")
    budget.release(held)
    for t in threads:
        t.join(LONG)
    assert order == list(range(6))
    assert budget.stats().in_use == 0
    budget.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_waiters_are_served_first_come_first_served_across_processes(
    name: str, method: str
) -> None:
    ctx = multiprocessing.get_context(method)
    budget = HostBudget(name, 1)
    held = budget.acquire()
    children = []
    for i in range(3):
        reader, writer = ctx.Pipe()
        proc = ctx.Process(target=targets.wait_for_permit, args=(name, 1, LONG, writer))
        proc.start()
        assert reader.poll(LONG) and reader.recv() == "waiting"
        wait_until(lambda i=i: budget.stats().waiting == i + 1, LONG, f"child {i} queued")
        children.append((proc, reader))
    budget.release(held)
    tokens = []
    for proc, reader in children:  # each is served in turn, when the previous one releases
        assert reader.poll(LONG)
        kind, token, _ = reader.recv()
        assert kind == "ok"
        tokens.append(token)
        reader.send("release")
        proc.join(LONG)
    assert tokens == sorted(tokens) and tokens[0] == held.token + 1
    budget.close()


def test_a_newcomer_does_not_overtake_a_waiter(name: str) -> None:
    """While anyone waits, a fresh acquire(timeout=0) gets nothing, even at the moment a permit
    is released: the permit is handed to the waiter."""
    budget = HostBudget(name, 1)
    held = budget.acquire()
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(budget.acquire(timeout=LONG)))
    t.start()
    wait_until(lambda: budget.stats().waiting == 1, what="the waiter queued")
    budget.release(held)
    with pytest.raises(BudgetTimeout):
        budget.acquire(timeout=0)
    t.join(SHORT)
    budget.release(got[0])
    budget.close()


class Interrupt(Exception):
    pass


BUDGET_CODE = {"hostbudget.py", "_hosttable.py", "_hostipc.py"}


def test_an_interrupted_waiter_leaves_the_queue_and_loses_nothing(name: str) -> None:
    """A signal handler raising in the waiting (main) thread at seeded moments, while another
    thread releases at seeded moments: the waiter leaves the queue, a permit handed to it just
    before goes back, all permits stay usable. (The handler raises only while the main thread
    is inside safepool's budget code: between acquire() returning and the assignment of its
    result, no Python code can keep a resource from being dropped.)"""
    rng = seeded("hostbudget-interrupt")
    budget = HostBudget(name, 1)
    interrupted = 0

    def handler(signum: int, frame: Any) -> None:
        nonlocal interrupted
        if frame is not None and os.path.basename(frame.f_code.co_filename) in BUDGET_CODE:
            interrupted += 1
            raise Interrupt

    old = signal.signal(signal.SIGUSR1, handler)
    rounds = sweep_size(40, other_versions=24, long=150)  # ~even odds of landing in the wait
    try:
        for _ in range(rounds):
            held = budget.acquire()
            releaser = threading.Timer(rng.uniform(0, 0.004), budget.release, (held,))
            fired = threading.Event()

            def interrupt(fired: threading.Event = fired) -> None:
                os.kill(os.getpid(), signal.SIGUSR1)
                fired.set()

            interrupter = threading.Timer(rng.uniform(0, 0.004), interrupt)
            releaser.start()
            interrupter.start()
            try:
                permit = budget.acquire(timeout=LONG)
            except Interrupt:
                permit = None
            assert fired.wait(SHORT)
            releaser.join(SHORT)
            interrupter.join(SHORT)
            if permit is not None:
                budget.release(permit)
            stats = budget.stats()
            assert (stats.in_use, stats.waiting) == (0, 0), stats
            with budget.lease(timeout=0):
                pass
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert 0 < interrupted < rounds  # some waits were interrupted, not all
    budget.close()


def test_many_waiters_with_timeouts_get_everything_or_time_out(name: str) -> None:
    """Threads waiting with mixed timeouts while permits come and go: each either gets a permit
    or times out no earlier than asked; the counts add up."""
    budget = HostBudget(name, 2)
    rng = seeded("hostbudget-mixed-waits")
    plans = [rng.choice((0.0, 0.002, 0.02, 1.0)) for _ in range(24)]
    results: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        start = time.monotonic()
        try:
            with budget.lease(timeout=plans[i]):
                time.sleep(0.001)
            outcome = "ok"
        except BudgetTimeout:
            outcome = "timeout"
        with lock:
            results.append((outcome, time.monotonic() - start, plans[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(plans))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(LONG)
    assert len(results) == len(plans)
    for outcome, waited, timeout in results:
        if outcome == "timeout":
            assert waited >= timeout
    stats = budget.stats()
    oks = sum(1 for r in results if r[0] == "ok")
    assert (stats.acquired, stats.timeouts, stats.in_use, stats.waiting) == (
        oks,
        len(plans) - oks,
        0,
        0,
    )
    budget.close()


def test_a_lease_interrupted_anywhere_keeps_no_permit(name: str) -> None:
    """``with budget.lease():`` cut short anywhere: entering (on Python 3.10 a signal handler
    may run in ``__enter__`` after ``acquire()`` returned, before its result is stored), and
    leaving (a handler may run as ``__exit__`` begins: the collected lease's permit is released
    at the process's next lease()). No permit stays held, and the whole limit is usable."""
    from interrupts import Interrupter, pick

    rng = seeded("hostbudget-lease")
    budget = HostBudget(name, 2)

    def lease() -> None:
        with budget.lease(timeout=SHORT):
            pass

    with Interrupter() as interrupter:
        for point in range(sweep_size(150, other_versions=150)):
            interrupter.run_until_interrupted(lease, rng.uniform(0, 5e-5), pick(rng))
            with budget.lease(timeout=SHORT):  # the next lease, which settles a collected one
                pass
            assert budget.stats().in_use == 0, point
    assert interrupter.fired >= 1
    permits = [budget.acquire(timeout=0) for _ in range(2)]
    for permit in permits:
        budget.release(permit)
    budget.unlink()
    budget.close()
