"""Dead holders: SIGKILL at any instruction (swept delays inside acquire()/release()), a process
killed holding the table's lock half-way through a grant, dead waiters. Every permit comes back."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import hostbudget_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, seeded, sweep_size, wait_until
from safepool import HostBudget

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(300)]


@pytest.fixture
def name() -> Iterator[str]:
    n = f"hbr-{uuid.uuid4().hex[:12]}"
    yield n
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/safepool-budget-{n}")


def start(target: Any, *args: Any, method: str = "fork") -> tuple[Any, Any]:
    ctx = multiprocessing.get_context(method)
    reader, writer = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, writer))
    proc.start()
    return proc, reader


def recv(reader: Any) -> Any:
    assert reader.poll(LONG), "the child did not report"
    return reader.recv()


def kill(proc: Any) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(LONG)
    assert proc.exitcode == -signal.SIGKILL


def all_back(budget: HostBudget) -> float:
    """Take every permit (waiting as needed), give them back; seconds it took."""
    start_time = time.monotonic()
    permits = [budget.acquire(timeout=LONG) for _ in range(budget.limit)]
    elapsed = time.monotonic() - start_time
    for p in permits:
        budget.release(p)
    return elapsed


class Competitor:
    """A thread cycling acquire/release on the budget, so that the victim waits, is handed
    permits and hands them off while it is killed."""

    def __init__(self, budget: HostBudget) -> None:
        self.budget = budget
        self.stop = threading.Event()
        self.cycles = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            with self.budget.lease(timeout=LONG):
                self.cycles += 1

    def join(self) -> None:
        self.stop.set()
        self.thread.join(LONG)
        assert not self.thread.is_alive()


@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2])
def test_sigkill_inside_acquire_and_release_every_permit_back(
    name: str, limit: int, record_property: Any
) -> None:
    """SIGKILL a process that does nothing but acquire()/release(), at seeded random delays,
    so the kill lands at swept instructions inside them (with a competitor, also while it waits,
    is handed a permit or hands one off). 100 rounds with --long."""
    rounds = sweep_size(40, other_versions=10, long=100)
    rng = seeded(f"hostbudget-sigkill-{limit}")
    budget = HostBudget(name, limit)
    times = []
    for n in range(rounds):
        proc, reader = start(targets.cycle, name, limit)
        assert recv(reader) == "cycling"
        competitor = Competitor(budget) if n % 2 else None
        time.sleep(rng.uniform(0, 0.003))  # the swept interruption point, not a synchronisation
        killed_at = time.monotonic()
        kill(proc)
        if competitor is not None:
            competitor.join()
        all_back(budget)
        times.append(time.monotonic() - killed_at)
        stats = budget.stats()
        assert (stats.in_use, stats.waiting) == (0, 0), (n, stats)
        assert budget.holders() == []
    stats = budget.stats()
    assert stats.reclaimed <= rounds  # at most one permit per victim (it held one at a time)
    ms = sorted(t * 1000 for t in times)
    summary = (
        f"{rounds} SIGKILLs, limit {limit}: all permits back in median {statistics.median(ms):.1f}"
        f" ms, max {ms[-1]:.1f} ms; {stats.reclaimed} permits reclaimed from dead holders"
    )
    print(summary)
    record_property("reclaim_ms", summary)
    budget.close()


@pytest.mark.parametrize("stage", ["fields", "commit"])
def test_killed_holding_the_lock_half_way_through_a_grant(
    name: str, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    budget = HostBudget(name, 2)
    proc, reader = start(targets.die_holding_the_lock, name, 2, stage)
    dead_token = recv(reader)
    kill(proc)
    permits = [budget.acquire(timeout=SHORT) for _ in range(2)]
    assert "a process died inside the budget; state repaired" in caplog.text
    tokens = [p.token for p in permits]
    if stage == "commit":  # the grant happened: its token is never given out again
        assert min(tokens) > dead_token
        assert budget.stats().reclaimed == 1
    else:
        assert min(tokens) == dead_token  # never handed out: reused
        assert budget.stats().reclaimed == 0
    for p in permits:
        budget.release(p)
    assert budget.stats().in_use == 0
    budget.close()


def test_killed_half_way_through_a_hand_off_the_waiter_still_gets_it(name: str) -> None:
    """The holder releases while we wait, and dies after journaling the hand-off to us and
    committing our slot, before telling us: the repair finishes the hand-off."""
    budget = HostBudget(name, 1)
    proc, reader = start(targets.die_holding_the_lock, name, 1, "handoff")
    assert recv(reader) == "holding"
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(budget.acquire(timeout=LONG)))
    waiter.start()
    wait_until(lambda: budget.stats().waiting == 1, what="the waiter queued")
    reader.send("go")
    token = recv(reader)
    kill(proc)
    waiter.join(LONG)
    assert not waiter.is_alive()
    assert got[0].token == token  # the journaled grant was completed by the repair
    assert [h.pid for h in budget.holders()] == [os.getpid()]
    budget.release(got[0])
    stats = budget.stats()
    assert (stats.in_use, stats.waiting, stats.reclaimed) == (0, 0, 0)
    budget.close()


def test_a_dead_waiter_is_skipped(name: str) -> None:
    budget = HostBudget(name, 1)
    held = budget.acquire()
    proc, reader = start(targets.wait_for_permit, name, 1, LONG)
    assert recv(reader) == "waiting"
    wait_until(lambda: budget.stats().waiting == 1, what="the child queued")
    kill(proc)
    budget.release(held)
    assert all_back(budget) < SHORT
    stats = budget.stats()
    assert (stats.in_use, stats.waiting) == (0, 0)
    budget.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_killed_holders_permit_comes_back_within_milliseconds(name: str, method: str) -> None:
    budget = HostBudget(name, 1)
    proc, reader = start(targets.hold, name, 1, method=method)
    pid, _ = recv(reader)
    os.kill(pid, signal.SIGKILL)
    start_time = time.monotonic()
    with budget.lease(timeout=LONG):
        elapsed = time.monotonic() - start_time
    proc.join(LONG)
    assert elapsed < 1.0, f"took {elapsed:.3f}s"
    assert budget.stats().reclaimed == 1
    budget.close()
