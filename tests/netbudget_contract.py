"""The budget protocol's contract, tested the same way on each cross-host engine.

test_pgbudget.py and test_redisbudget.py import these tests; each defines the fixtures
``engine`` ("postgres" or "redis"), ``where`` (the engine's address) and ``make`` (a budget
with a unique name: ``make(limit, **options)``).
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import os
import pickle
import threading
import time
import uuid
from typing import Any

import pytest

from helpers import (
    LONG,
    SHORT,
    START_METHODS,
    ThreadResult,
    collect_earlier_garbage,
    fds,
    left_open,
    run_in_fork,
    run_threads,
    seeded,
    sweep_size,
    wait_until,
)
from interrupts import Interrupter
from netbudget_targets import acquire_in_child
from safepool import BudgetTimeout, LeaseError, Permit
from safepool.budget import Budget


def test_acquire_release_lease_stats_and_holders(make: Any) -> None:
    budget = make(3)
    assert isinstance(budget, Budget)
    first, second = budget.acquire(), budget.acquire(timeout=0)
    assert first.valid and second.valid and first.lost_reason is None
    assert first.pid == second.pid == os.getpid()
    stats = budget.stats()
    assert (stats.limit, stats.in_use, stats.waiting) == (3, 2, 0)
    holders = budget.holders()
    assert [h.token for h in holders] == [first.token, second.token]
    assert all(h.pid == os.getpid() and h.host for h in holders)
    assert abs(holders[0].since - first.since) < 0.01
    with budget.lease() as third:
        assert budget.stats().in_use == 3
        assert third.token > second.token > first.token
    assert not third.valid
    budget.release(first)
    budget.release(second)
    assert not first.valid and budget.stats().in_use == 0 and budget.holders() == []
    assert budget.stats().acquired == 3


def test_a_timeout_is_never_early_and_is_counted(make: Any) -> None:
    budget = make(1)
    held = budget.acquire()
    for timeout in (0, 0.05, 0.3):
        start = time.monotonic()
        with pytest.raises(BudgetTimeout, match=r"within .*s \(all 1 are held\)"):
            budget.acquire(timeout=timeout)
        assert time.monotonic() - start >= timeout
    assert budget.stats().timeouts == 3
    budget.release(held)


def test_a_waiter_is_woken_by_a_release_without_polling(make: Any) -> None:
    budget = make(1, **_no_polling(make))
    held = budget.acquire()
    waiter = ThreadResult(lambda: budget.acquire(timeout=LONG))
    wait_until(lambda: budget.stats().waiting == 1, what="the waiter waits")
    released = time.monotonic()
    budget.release(held)
    permit = waiter.join(SHORT)
    woken = time.monotonic() - released
    assert woken < 1.0, f"woken after {woken:.3f}s: the release did not wake the waiter"
    assert permit.token > held.token
    budget.release(permit)


def _no_polling(make: Any) -> dict[str, Any]:
    return {"poll_interval": 30.0} if make.engine == "postgres" else {"socket_timeout": 60.0}


def test_bad_input_raises_and_changes_nothing(make: Any) -> None:
    budget = make(2)
    held = budget.acquire()
    before = budget.stats()
    for limit, error in ((0, ValueError), (-1, ValueError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="limit"):
            make(limit)
    for name in ("x" * 65, "", "-x", "a b", "a/b", 5):
        with pytest.raises((ValueError, TypeError), match="name"):
            make(2, name=name)
    with pytest.raises(ValueError, match=rf"{budget.name}.*limit 2"):
        make(3, name=budget.name)
    with pytest.raises(TypeError, match="on_lost must be callable"):
        make(2, on_lost="no")
    for timeout in (-1, math.nan, "1"):
        with pytest.raises((ValueError, TypeError), match="timeout"):
            budget.acquire(timeout=timeout)
    after = budget.stats()
    assert (after.in_use, after.acquired, after.limit) == (before.in_use, before.acquired, 2)
    assert held.valid
    budget.release(held)


def test_a_refused_open_leaves_no_connection_open(make: Any) -> None:
    """A constructor that fails after it reached the server (a budget of that name exists with
    another limit) closes what it opened at once, not when the garbage collector gets to it
    (redis-py's connections are in reference cycles: that could be minutes, or mid-way through
    another operation)."""
    budget = make(2)
    budget.release(budget.acquire())
    collect_earlier_garbage()
    gc.disable()  # a leaked connection stays open: the count shows it
    try:
        before = fds()
        for _ in range(3):
            with pytest.raises(ValueError, match="limit 2"):
                make(3, name=budget.name)
        assert left_open(before) == {}
    finally:
        gc.enable()
    budget.release(budget.acquire(timeout=SHORT))  # the budget's own session is untouched


def test_release_refuses_foreign_forged_and_double_releases(make: Any) -> None:
    budget, other = make(2), make(2)
    same_name = make(2, name=budget.name)
    permit = budget.acquire()
    for stranger in (other, same_name):
        with pytest.raises(LeaseError, match="issued by budget"):
            stranger.release(permit)
    with pytest.raises(LeaseError, match="takes a Permit"):
        budget.release("permit")  # type: ignore[arg-type]
    forged = Permit(budget, budget.name, permit.token, None)
    forged._owner = object()
    with pytest.raises(LeaseError):
        budget.release(forged)
    assert permit.valid and budget.stats().in_use == 1
    budget.release(permit)
    with pytest.raises(LeaseError, match="already released"):
        budget.release(permit)
    assert budget.stats().in_use == 0
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(budget.acquire())


def test_close_gives_back_what_the_object_holds_and_a_later_call_reconnects(make: Any) -> None:
    """close() (or leaving ``with budget:``): permits held through the object are given back
    at once and marked lost (on_lost runs), its connections close; using it again connects
    again."""
    heard: list[Permit] = []
    before = fds()
    budget = make(2, on_lost=heard.append)
    with budget:
        held = [budget.acquire(timeout=SHORT) for _ in range(2)]
        assert budget.stats().in_use == 2
    assert heard == held and all(not p.valid for p in held)
    assert "closed" in (held[0].lost_reason or "")
    del held, heard[:]  # (a lost permit still names its session)
    gc.collect()
    assert left_open(before) == {}  # its connections, and whatever watched them, closed
    other = make(2, name=budget.name)
    got = [other.acquire(timeout=0) for _ in range(2)]  # given back at once, not after a ttl
    for p in got:
        other.release(p)
    with budget.lease(timeout=SHORT) as again:  # a later call connects again
        assert again.valid


def test_two_objects_and_many_threads_never_share_a_permit(make: Any) -> None:
    """Advisory locks are re-entrant per session: threads and objects of one process must
    still never hold one slot twice."""
    budget = make(3)
    twin = make(3, name=budget.name)  # the same budget through a second object
    lock = threading.Lock()
    count = [0, 0]  # holders now, most seen

    def work(i: int) -> int:
        rng = seeded(f"threads-{i}")
        for _ in range(15):
            b = budget if rng.random() < 0.5 else twin
            with b.lease(timeout=LONG):
                with lock:
                    count[0] += 1
                    count[1] = max(count[1], count[0])
                time.sleep(rng.uniform(0, 0.002))
                with lock:
                    count[0] -= 1
        return 0

    run_threads(8, work)
    assert count[1] <= 3
    held = [budget.acquire(timeout=0) for _ in range(2)] + [twin.acquire(timeout=0)]
    with pytest.raises(BudgetTimeout):
        twin.acquire(timeout=0)
    assert budget.stats().in_use == 3
    for p in held:
        (budget if p._owned_by(budget) else twin).release(p)


def test_a_lease_releases_on_base_exceptions(make: Any) -> None:
    budget = make(1)
    for error in (KeyboardInterrupt, SystemExit, ValueError):
        with pytest.raises(error), budget.lease() as permit:
            raise error
        assert not permit.valid
    assert budget.stats().in_use == 0


def test_a_forked_child_does_not_own_the_parents_permit(make: Any) -> None:
    budget = make(2)
    permit = budget.acquire()

    def child() -> tuple[bool, int, int]:
        budget.release(permit)  # the parent's: a quiet no-op
        with budget.lease(timeout=SHORT) as own:
            in_use = budget.stats().in_use
        return permit.valid, own.token, in_use

    valid_in_child, token, in_use = run_in_fork(child)
    assert not valid_in_child and token > permit.token and in_use == 2
    assert permit.valid and budget.stats().in_use == 1
    budget.release(permit)


@pytest.mark.parametrize("method", START_METHODS)
def test_processes_of_every_start_method_share_the_budget(
    make: Any, engine: str, where: str, method: str
) -> None:
    budget = make(2)
    held = budget.acquire()
    ctx = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe(duplex=False)
    options = {"ttl": budget.ttl} if engine == "redis" else {}
    proc = ctx.Process(
        target=acquire_in_child, args=(engine, where, budget.name, 2, writer, options)
    )
    proc.start()
    writer.close()
    assert reader.poll(LONG)
    token, valid, in_use = reader.recv()
    proc.join(LONG)
    assert proc.exitcode == 0 and valid and token > held.token and in_use == 2
    restored = pickle.loads(pickle.dumps(budget))  # a budget pickles as its recipe
    assert restored.name == budget.name and restored.stats().in_use == 1
    restored.close()
    budget.release(held)


class Interrupted(Exception):
    """Raised by a signal handler at a swept point inside acquire() or release()."""


@pytest.mark.parametrize("error", [KeyboardInterrupt, Interrupted])
def test_interruptions_anywhere_lose_nothing_and_count_nothing_twice(
    make: Any, error: type[BaseException]
) -> None:
    """A signal handler raising at a seeded point inside acquire()/release(): afterwards the
    engine counts exactly the permits this process holds, and the whole limit is usable."""
    lost: list[Permit] = []
    budget = make(3, on_lost=lost.append)
    rng = seeded(f"interrupt-{make.engine}-{error.__name__}")
    op = _op_time(budget)

    # A helper thread signals the main thread (SIGUSR1): SIGALRM is pytest-timeout's.
    with Interrupter() as interrupter:
        for point in range(sweep_size(40)):
            delay = rng.uniform(0, 2.5 * op)
            held = make.held(budget)  # what this process holds, as the budget object knows it
            try:
                interrupter.arm(delay, error)
                if held and rng.random() < 0.5:
                    budget.release(held[rng.randrange(len(held))])
                elif len(held) < 3:
                    budget.acquire(timeout=SHORT)
                interrupter.disarm()  # a signal still on its way is then ignored
            except error:
                pass
            finally:
                interrupter.disarm()
            _assert_engine_counts(budget, make.held(budget), point, delay)
    assert all(p.valid for p in make.held(budget))
    # PostgreSQL: an interruption psycopg could not settle closes the budget session, and the
    # process's permits with it; each loss is reported, once. Redis loses nothing.
    assert all(not p.valid and p.lost_reason for p in lost)
    assert len({id(p) for p in lost}) == len(lost)
    if make.engine == "redis":
        assert not lost
    for p in make.held(budget):
        budget.release(p)
    permits = [budget.acquire(timeout=LONG if make.engine == "redis" else SHORT) for _ in range(3)]
    assert budget.stats().in_use == 3
    for p in permits:
        budget.release(p)


def _op_time(budget: Any) -> float:
    start = time.perf_counter()
    for _ in range(5):
        budget.release(budget.acquire())
    return (time.perf_counter() - start) / 10


def _assert_engine_counts(budget: Any, held: list[Permit], point: int, delay: float) -> None:
    def settled() -> bool:
        return bool(budget.stats().in_use == len(held))

    wait_until(settled, LONG, f"engine counts {len(held)} (point {point}, delay {delay:.6f})")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
