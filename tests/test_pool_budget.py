"""SafeConnectionPool(budget=...): every item that exists holds one permit of a budget shared with
other pools, processes and hosts."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pool_budget_targets as targets
from helpers import (
    FORK_WARNING,
    LONG,
    SHORT,
    run_threads,
    running,
    seeded,
    sweep_size,
    wait_until,
)
from interrupts import Interrupter, check_pool, pick, spin
from safepool import BudgetTimeout, HostBudget, PoolTimeout, SafeConnectionPool

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)


class Item:
    made = 0

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def budget() -> Iterator[HostBudget]:
    made = HostBudget(f"test-pool-{uuid.uuid4().hex[:12]}", 2)
    yield made
    made.unlink()
    made.close()


class CountingFactory:
    """Counts items alive, and checks each is made with a permit in hand."""

    def __init__(self, budget: HostBudget) -> None:
        self.budget = budget
        self.alive = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self) -> Item:
        with self.lock:
            self.alive += 1
            self.most = max(self.most, self.alive)
            assert self.alive <= self.budget.stats().in_use, "made without a permit"
        return Item()

    def close(self, item: Item) -> None:
        with self.lock:
            self.alive -= 1
        item.close()


def test_items_never_outnumber_the_budget_across_pools(budget: HostBudget) -> None:
    factory = CountingFactory(budget)
    pools = [
        SafeConnectionPool(factory=factory, close=factory.close, max_size=5, budget=budget)
        for _ in range(3)
    ]
    held = [pools[0].acquire(), pools[1].acquire()]
    assert budget.stats().in_use == 2
    start = time.monotonic()
    with pytest.raises(BudgetTimeout):  # a PoolTimeout too: the wait for a permit timed out
        pools[2].acquire(timeout=0.2)
    assert time.monotonic() - start >= 0.2  # never early
    stats = pools[2].stats()
    assert (stats.timeouts, stats.size, stats.pending) == (1, 0, 0)  # its slot went back
    pools[0].release(held[0], discard=True)  # closing an item gives its permit back
    third = pools[2].acquire(timeout=SHORT)
    pools[1].release(held[1])  # an idle item keeps its permit
    assert budget.stats().in_use == 2 and factory.most == 2
    pools[2].release(third)
    for pool in pools:
        pool.close()
    assert budget.stats().in_use == 0 and factory.alive == 0


def test_waiting_for_a_permit_counts_against_the_acquire_timeout(budget: HostBudget) -> None:
    with budget.lease(), budget.lease():
        pool = SafeConnectionPool(factory=Item, max_size=3, budget=budget, timeout=0.3)
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.acquire()
        elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.3 + SHORT
    assert (pool.stats().size, budget.stats().in_use) == (0, 0)


def test_a_waiter_gets_an_item_when_another_pool_closes_one(budget: HostBudget) -> None:
    first = SafeConnectionPool(factory=Item, max_size=2, budget=budget)
    second = SafeConnectionPool(factory=Item, max_size=2, budget=budget)
    items = [first.acquire(), first.acquire()]
    got: list[Item] = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(timeout=LONG)))
    waiter.start()
    wait_until(lambda: budget.stats().waiting == 1, what="the second pool waiting for a permit")
    first.release(items[0], discard=True)
    waiter.join(SHORT)
    assert got and budget.stats().in_use == 2
    second.release(got[0])
    first.release(items[1])


def test_min_size_items_take_permits_and_pools_refuse_what_is_not_a_budget(
    budget: HostBudget,
) -> None:
    pool = SafeConnectionPool(factory=Item, min_size=2, max_size=4, budget=budget)
    assert (pool.stats().idle, budget.stats().in_use) == (2, 2)
    pool.close()
    assert budget.stats().in_use == 0
    with pytest.raises(TypeError, match="budget must be a budget"):
        SafeConnectionPool(factory=Item, budget=object())  # type: ignore[arg-type]


def test_interrupting_a_budget_pool_anywhere_keeps_permits_and_items_equal(
    budget: HostBudget,
) -> None:
    """Signal handlers raising at swept delays while items are made with permits, checked,
    reset and closed: after each point the budget's permits in use equal the pool's items."""
    rng = seeded("pool-budget")
    pool = SafeConnectionPool(
        factory=lambda: spin(1e-5) or Item(),
        max_size=2,
        budget=budget,
        max_lifetime=3e-4,
        check=lambda item: spin(1e-5) or True,
        reset=lambda item: spin(1e-5) or True,
        close=lambda item: spin(1e-5) or item.close(),
    )

    def operation() -> None:
        with pool.lease(timeout=SHORT):
            pass

    with Interrupter() as interrupter:
        for _ in range(sweep_size(200)):
            interrupter.run_until_interrupted(operation, rng.uniform(0, 3e-4), pick(rng))
            check_pool(pool)
            assert budget.stats().in_use == pool.stats().size
    pool.close()
    assert budget.stats().in_use == 0


# -- real PostgreSQL connections ---------------------------------------------------------------


def _count_connections(dsn: str, application_name: str) -> int:
    """The test's connections PostgreSQL lists, counting only server processes still running
    once the list is read: pg_stat_activity is read slot by slot, not at one instant, so a
    busy machine can list a backend that ended during the read beside the one that replaced
    it. (The server runs on this host: its processes are in /proc.)"""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchall()
    return sum(running(pid) for (pid,) in rows)


def _run_processes(budget: Any, dsn: str, processes: int, limit: int) -> None:
    """``processes`` processes, each with its own pool of real connections on ``budget``:
    pg_stat_activity, sampled all along, never shows more than ``limit`` of them."""
    name = f"safepool-{uuid.uuid4().hex[:12]}"
    connect = targets.PgConnect(dsn, name)
    ctx = multiprocessing.get_context("spawn")
    seconds = 4.0 if sweep_size(1, other_versions=0) else 2.0
    pipes, children = [], []
    for i in range(processes):
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=targets.use_own_pool, args=(budget, connect, seconds, i, writer))
        child.start()
        writer.close()
        pipes.append(reader)
        children.append(child)
    most = 0
    while any(child.is_alive() for child in children):
        most = max(most, _count_connections(dsn, name))
        time.sleep(0.002)  # sampling pg_stat_activity, not synchronising
    results = [reader.recv() for reader in pipes]
    for child in children:
        child.join(LONG)
    assert all(not errors for _, errors, _, _ in results), results
    assert sum(created for _, _, created, _ in results) > processes  # they churned
    assert 0 < most <= limit, f"{most} connections open at once, limit {limit}"
    wait_until(lambda: _count_connections(dsn, name) == 0, what="every connection closed")


@pytest.mark.postgres
@pytest.mark.slow
def test_six_processes_never_open_more_connections_than_a_host_budget(pg_dsn: str) -> None:
    budget = HostBudget(f"test-pg-{uuid.uuid4().hex[:12]}", 4)
    try:
        _run_processes(budget, pg_dsn, processes=6, limit=4)
        assert budget.stats().in_use == 0
    finally:
        budget.unlink()
        budget.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_six_processes_never_open_more_connections_than_a_postgres_budget(pg_dsn: str) -> None:
    from safepool import PostgresBudget

    budget = PostgresBudget(pg_dsn, f"test-pool-{uuid.uuid4().hex[:12]}", 5)
    try:
        _run_processes(budget, pg_dsn, processes=6, limit=5)  # budget sessions have no name
        assert budget.stats().in_use == 0
    finally:
        budget.unlink()
        budget.close()


@pytest.mark.postgres
def test_items_whose_permits_are_lost_are_closed_when_idle_or_returned(pg_dsn: str) -> None:
    import psycopg

    from safepool import PostgresBudget

    budget = PostgresBudget(pg_dsn, f"test-lost-{uuid.uuid4().hex[:12]}", 3)
    try:
        pool = SafeConnectionPool(factory=Item, max_size=3, budget=budget)
        idle, leased = pool.acquire(), pool.acquire()
        pool.release(idle)
        with psycopg.connect(pg_dsn, autocommit=True) as admin:  # the permits' session ends
            admin.execute("SELECT pg_terminate_backend(%s)", (budget._session()._backend,))
        wait_until(lambda: idle.closed, what="the idle item closed when its permit was lost")
        assert not leased.closed  # in use: closed when it comes back
        pool.release(leased)
        assert leased.closed
        fresh = pool.acquire(timeout=SHORT)  # a new item, with a new permit
        assert fresh not in (idle, leased) and budget.stats().in_use == 1
        pool.release(fresh)
        pool.close()
    finally:
        budget.unlink()
        budget.close()


def test_a_loss_marked_while_a_listener_is_added_runs_it_exactly_once() -> None:
    """A pool adds its listener to a new permit in the acquiring thread while the engine's
    thread may be marking that permit lost: every listener and mark runs exactly once, whatever
    the interleaving (switches forced every microsecond)."""
    from safepool import Permit

    count = sweep_size(3000, other_versions=1000)
    permits = [Permit(object(), "race", token) for token in range(count)]
    heard: list[int] = []
    marked: list[int] = []
    barrier = threading.Barrier(2)

    def add() -> None:
        for p in permits:
            barrier.wait(LONG)  # both threads on the same permit at once
            p._add_lost_listener(lambda p: heard.append(p.token), mark=lambda: marked.append(1))

    def mark() -> None:
        for p in permits:
            barrier.wait(LONG)
            for listener in p._mark_lost("the engine took it back"):
                listener(p)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        run_threads(2, lambda i: (add, mark)[i]())
    finally:
        sys.setswitchinterval(switch)
    assert sorted(heard) == list(range(count))  # each listener once: none lost, none twice
    assert len(marked) == count
    assert all(not p.valid and p.lost_reason for p in permits)


@pytest.mark.postgres
def test_an_item_returned_while_the_loss_is_being_reported_is_closed(pg_dsn: str) -> None:
    """The engine marks every permit of its session lost at once, then runs the listeners one
    permit after another: an item returned in between (here from the first report) is closed
    too, though its own listener has not run yet."""
    import psycopg

    from safepool import PostgresBudget

    pool: SafeConnectionPool[Item] | None = None
    seen: list[tuple[bool, bool]] = []

    def on_lost(permit: object) -> None:
        if not seen:  # the first report: the other permit's listener has not run yet
            assert pool is not None
            pool.release(first)
            pool.release(second)
            seen.append((first.closed, second.closed))

    budget = PostgresBudget(pg_dsn, f"test-lost-{uuid.uuid4().hex[:12]}", 2, on_lost=on_lost)
    try:
        pool = SafeConnectionPool(factory=Item, max_size=2, budget=budget)
        first, second = pool.acquire(), pool.acquire()
        with psycopg.connect(pg_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (budget._session()._backend,))
        wait_until(lambda: seen, what="the loss reported")
        assert seen == [(True, True)]
        assert pool.stats().idle == 0
        fresh = pool.acquire(timeout=SHORT)
        assert fresh not in (first, second)
        pool.release(fresh)
        pool.close()
    finally:
        budget.unlink()
        budget.close()
