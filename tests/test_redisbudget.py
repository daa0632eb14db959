"""RedisBudget on the shared Redis: the budget contract (netbudget_contract), and what only
Redis does: permits expire unless renewed, a paused holder learns it lost its permit, a dead
holder's permit comes back within ttl."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import FORK_WARNING, LONG, SHORT, ThreadResult, wait_until
from netbudget_contract import *  # noqa: F403 - the shared contract tests
from netbudget_contract import unique
from netbudget_targets import sigstop_self_holding
from safepool import BudgetTimeout, BudgetUnavailable, Permit, RedisBudget

pytestmark = [pytest.mark.redis, pytest.mark.filterwarnings(FORK_WARNING)]

TTL = 1.0  # short, so expiry tests are quick


@pytest.fixture
def engine() -> str:
    return "redis"


@pytest.fixture
def where(redis_url: str) -> str:
    return redis_url


@pytest.fixture
def make(redis_url: str) -> Iterator[Any]:
    made: list[RedisBudget] = []

    def factory(limit: int, name: str | None = None, **options: Any) -> RedisBudget:
        options.setdefault("ttl", TTL)
        budget = RedisBudget(redis_url, unique("rd") if name is None else name, limit, **options)
        made.append(budget)
        return budget

    factory.engine = "redis"  # type: ignore[attr-defined]
    factory.held = lambda b: list(b._p.held.values())  # type: ignore[attr-defined]
    yield factory
    for budget in made[:1]:
        budget.unlink()
    for budget in made:
        budget.close()


def test_a_permit_held_longer_than_ttl_stays_valid(make: Any) -> None:
    budget = make(1, ttl=0.3)
    permit = budget.acquire()
    deadline = time.monotonic() + 1.0  # more than three ttl: renewed by the heartbeat
    while time.monotonic() < deadline:
        assert permit.valid
        time.sleep(0.05)
    with pytest.raises(Exception, match="no permit came free"):
        budget.acquire(timeout=0)
    budget.release(permit)


def test_a_paused_holder_learns_it_lost_its_permit_before_trusting_it(
    make: Any, redis_url: str
) -> None:
    budget = make(1, ttl=0.5)
    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    report_r, report_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=sigstop_self_holding,
        args=("redis", redis_url, budget.name, ready_w, report_w, {"ttl": 0.5}),
    )
    proc.start()
    assert ready_r.poll(LONG)
    token = ready_r.recv()
    wait_until(lambda: _stopped(proc.pid), SHORT, "the holder stopped itself")
    start = time.monotonic()
    mine = budget.acquire(timeout=LONG)  # the permit expires: another process gets it
    assert time.monotonic() - start < 0.5 + 1.0 and mine.token > token
    assert budget.stats().in_use == 1 and budget.stats().reclaimed == 1
    os.kill(proc.pid, signal.SIGCONT)
    assert report_r.poll(LONG)
    valid_at_once, valid_later, reason, lost = report_r.recv()
    proc.join(LONG)
    assert valid_at_once is False, "the holder trusted a permit it no longer held"
    assert valid_later is False and reason and lost == [str(token)]
    assert mine.valid and budget.stats().in_use == 1  # nothing counted twice
    budget.release(mine)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_an_expired_entry_is_reported_lost_by_the_heartbeat(make: Any, redis_url: str) -> None:
    import redis

    lost: list[Permit] = []
    budget = make(2, ttl=0.5, on_lost=lost.append)
    permit = budget.acquire()
    client = redis.Redis.from_url(redis_url)
    client.zrem(budget._holders_key, permit._engine_state)  # as if Redis had lost it
    wait_until(lambda: lost == [permit], SHORT, "the heartbeat noticed")
    assert not permit.valid and "no longer holds it" in (permit.lost_reason or "")
    budget.release(permit)
    assert budget.stats().in_use == 0


def test_an_unreachable_server_fails_at_construction() -> None:
    with pytest.raises(BudgetUnavailable, match=r"open failed at Redis redis://:\*\*\*@"):
        RedisBudget("redis://:secret@127.0.0.1:1/0", "n", 1, connect_timeout=1)


def test_ttl_is_part_of_the_budget(make: Any) -> None:
    budget = make(2, ttl=1.0)
    with pytest.raises(ValueError, match="ttl 1s"):
        make(2, name=budget.name, ttl=2.0)
    for ttl in (0, 0.01, -1, float("inf")):
        with pytest.raises(ValueError, match="ttl"):
            make(2, ttl=ttl)


def test_waiters_are_served_first_come_first_served_and_nobody_barges(make: Any) -> None:
    budget = make(1, ttl=2.0)
    held = budget.acquire()
    order: list[str] = []

    def wait(who: str) -> Permit:
        permit = budget.acquire(timeout=LONG)
        order.append(who)
        return permit

    first = ThreadResult(lambda: wait("first"), "first")
    wait_until(lambda: budget.stats().waiting == 1, what="the first waiter queues")
    second = ThreadResult(lambda: wait("second"), "second")
    wait_until(lambda: budget.stats().waiting == 2, what="the second waiter queues")
    budget.release(held)  # handed straight to the oldest waiter
    with pytest.raises(BudgetTimeout):
        budget.acquire(timeout=0)  # a newcomer cannot barge in
    permit = first.join(SHORT)
    budget.release(permit)
    budget.release(second.join(SHORT))
    assert order == ["first", "second"]
    assert budget.stats().in_use == 0 and budget.stats().waiting == 0


def test_a_waiter_that_gives_up_passes_its_permit_on(make: Any) -> None:
    budget = make(1, ttl=2.0)
    held = budget.acquire()
    with pytest.raises(BudgetTimeout):
        budget.acquire(timeout=0.05)  # queued, then gave up: it must not keep a place
    later = ThreadResult(lambda: budget.acquire(timeout=LONG))
    wait_until(lambda: budget.stats().waiting == 1, what="a live waiter queues")
    budget.release(held)
    budget.release(later.join(SHORT))
    assert budget.stats().in_use == 0


def test_a_waiters_permit_is_dated_from_its_grant_not_from_its_wait(make: Any) -> None:
    """A waiter sends its wake-up wait and its next acquire call together: the permit it gets
    says when it was granted (within a round trip), here and in holders()."""
    budget = make(1, ttl=3.0)
    held = budget.acquire()
    waiter = ThreadResult(lambda: budget.acquire(timeout=LONG), "waiter")
    wait_until(lambda: budget.stats().waiting == 1, what="the waiter queues")
    time.sleep(0.3)  # time passes while it waits (not a synchronisation)
    released = time.time()
    budget.release(held)
    permit = waiter.join(SHORT)
    try:
        assert released - 0.005 <= permit.since <= time.time() + 0.005
        assert [h.since for h in budget.holders()] == [permit.since]
        assert permit.valid and permit.token > held.token
    finally:
        budget.release(permit)
