"""HostBudget across processes: fork, spawn, forkserver, raw os.fork() and unrelated processes;
fork semantics; the stress test with an independent O_EXCL ledger."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hostbudget_targets as targets
from helpers import (
    FORK_WARNING,
    LONG,
    START_METHODS,
    long_run,
    run_in_fork,
    seeded,
    sweep_size,
    wait_until,
)
from safepool import BudgetTimeout, HostBudget

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]

TARGETS = Path(targets.__file__)


@pytest.fixture
def name() -> Iterator[str]:
    n = f"hbp-{uuid.uuid4().hex[:12]}"
    yield n
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/safepool-budget-{n}")


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


def start(ctx: Any, target: Any, *args: Any) -> tuple[Any, Any]:
    reader, writer = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, writer))
    proc.start()
    return proc, reader


def recv(reader: Any) -> Any:
    assert reader.poll(LONG), "the child did not report"
    return reader.recv()


def test_children_share_the_limit_under_every_start_method(ctx: Any, name: str) -> None:
    budget = HostBudget(name, 2)
    holders = [start(ctx, targets.hold, name, 2) for _ in range(2)]
    reported = [recv(reader) for _, reader in holders]
    assert {pid for pid, _ in reported} == {proc.pid for proc, _ in holders}
    assert budget.stats().in_use == 2
    assert sorted(h.pid for h in budget.holders()) == sorted(p.pid for p, _ in holders)
    with pytest.raises(BudgetTimeout):
        budget.acquire(timeout=0)
    for _, reader in holders:
        reader.send("release")
    stats = [recv(reader) for _, reader in holders]
    for proc, _ in holders:
        proc.join(LONG)
        assert proc.exitcode == 0
    assert budget.stats().in_use == 0 and stats[-1]["acquired"] == 2
    budget.close()


def test_a_budget_object_passed_to_a_child(ctx: Any, name: str) -> None:
    budget = HostBudget(name, 1)
    proc, reader = start(ctx, targets.use_inherited, budget)
    pid, _token, in_use = recv(reader)
    assert (pid, in_use) == (proc.pid, 1)
    assert budget.holders()[0].pid == proc.pid
    reader.send("go")
    proc.join(LONG)
    assert proc.exitcode == 0 and budget.stats().in_use == 0
    budget.close()


def test_stats_are_shared_across_processes(ctx: Any, name: str) -> None:
    budget = HostBudget(name, 2)
    for _ in range(3):
        with budget.lease():
            pass
    held = [budget.acquire(), budget.acquire()]
    with pytest.raises(BudgetTimeout):
        budget.acquire(timeout=0)
    proc, reader = start(ctx, targets.stats_of, name, 2)
    stats = recv(reader)
    proc.join(LONG)
    assert (stats["in_use"], stats["acquired"], stats["timeouts"]) == (2, 5, 1)
    for p in held:
        budget.release(p)
    budget.close()


def test_unrelated_processes_share_the_budget(name: str) -> None:
    budget = HostBudget(name, 2)
    procs = [
        subprocess.Popen(
            [sys.executable, str(TARGETS), "hold", name, "2"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        tokens = [int(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        assert sorted(tokens) == [1, 2]
        assert sorted(h.pid for h in budget.holders()) == sorted(p.pid for p in procs)
        with pytest.raises(BudgetTimeout):
            budget.acquire(timeout=0.01)
        for p in procs:
            p.communicate("release\n", timeout=LONG)
            assert p.returncode == 0
        assert budget.stats().in_use == 0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    budget.close()


def test_a_parents_permit_is_not_the_childs(name: str) -> None:
    """Under a raw os.fork(): the child sees the parent's permit as not valid, releasing it is a
    quiet no-op, and the child takes permits of its own."""
    budget = HostBudget(name, 2)
    permit = budget.acquire()

    def child() -> tuple[bool, int, int, int]:
        valid = permit.valid
        budget.release(permit)  # quiet
        in_use = budget.stats().in_use
        with budget.lease(timeout=0) as mine:
            mine_token = mine.token
            both = budget.stats().in_use
        return valid, in_use, both, mine_token

    valid, in_use, both, token = run_in_fork(child)
    assert (valid, in_use, both) == (False, 1, 2)
    assert token > permit.token
    assert permit.valid and budget.stats().in_use == 1  # still the parent's
    assert [h.pid for h in budget.holders()] == [os.getpid()]
    budget.release(permit)
    assert budget.stats().in_use == 0
    budget.close()


def test_a_forked_child_does_not_keep_the_parents_registration_alive(name: str) -> None:
    """The child closes the descriptor it inherited: when the parent (here, a forked holder)
    dies, its permit comes back even though its own child still lives."""
    ctx = multiprocessing.get_context("fork")
    budget = HostBudget(name, 1)
    proc, reader = start(ctx, targets.hold_with_child, name, 1)
    holder_pid, grandchild = recv(reader)
    assert budget.holders()[0].pid == holder_pid
    os.kill(holder_pid, 9)
    # not join(): the grandchild holds the sentinel pipe open
    wait_until(lambda: not proc.is_alive(), LONG, "the holder died")
    try:
        with budget.lease(timeout=LONG):
            pass
        assert budget.stats().reclaimed == 1
    finally:
        os.kill(grandchild, 9)
    budget.close()


@pytest.mark.slow
def test_stress_never_more_than_the_limit_and_nothing_lost(name: str, tmp_path: Path) -> None:
    """8 processes x random holds on a limit of 3, with an O_EXCL ledger: never more than 3
    holders, and all 3 permits acquirable at the end. 20 s with --long."""
    duration = 20.0 if long_run() else sweep_size(3, other_versions=1, long=20) * 1.0
    rng = seeded("hostbudget-stress")
    ctx = multiprocessing.get_context("fork")
    budget = HostBudget(name, 3)
    procs = []
    for i in range(8):
        method = ("fork", "spawn", "forkserver")[i % 3]
        c = multiprocessing.get_context(method)
        reader, writer = c.Pipe()
        proc = c.Process(
            target=targets.churn,
            args=(name, 3, rng.randrange(2**32), duration, str(tmp_path), writer),
        )
        proc.start()
        procs.append((proc, reader))
    for _, reader in procs:
        assert recv(reader) == "ready"
    for _, reader in procs:
        reader.send("go")
    results = []
    for proc, reader in procs:
        assert reader.poll(duration + LONG)
        results.append(reader.recv())
        proc.join(LONG)
        assert proc.exitcode == 0
    acquires = sum(r[0] for r in results)
    overlaps = sum(r[1] for r in results)
    assert overlaps == 0, f"the ledger saw more than 3 holders {overlaps} times"
    tokens = [t for r in results for t in r[3]]
    assert len(set(tokens)) == len(tokens) == acquires  # fencing tokens: never given twice
    assert all(r[3] == sorted(r[3]) for r in results)  # ... and increasing in each process
    shares = sorted(r[0] for r in results)
    print(f"stress: {acquires} acquires in {duration:.0f} s by 8 processes; per process "
          f"{shares[0]}-{shares[-1]}; {sum(r[2] for r in results)} timeouts")  # fmt: skip
    assert acquires > 8 * 10
    assert list(tmp_path.iterdir()) == []
    permits = [budget.acquire(timeout=0) for _ in range(3)]
    stats = budget.stats()
    assert (stats.in_use, stats.waiting, stats.reclaimed) == (3, 0, 0)
    assert stats.acquired == acquires + 3
    for p in permits:
        budget.release(p)
    budget.close()
    del ctx
