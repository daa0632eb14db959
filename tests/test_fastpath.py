"""The same-host fast path of by-value PoolManager pools: what qualifies, what the table does
that the round trip did, and what it must never do (hold an item twice, lose one).

The cross-process suite (test_manager*, test_reclaim, test_interrupts_manager) runs its by-value
tests on both paths already (the ``fast_path`` fixture); these are the fast path's own."""

from __future__ import annotations

import gc
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import fastpath_targets as targets
from helpers import (
    FORK_WARNING,
    LONG,
    SEED,
    SHORT,
    START_METHODS,
    ThreadResult,
    fds,
    left_open,
    readable,
    seeded,
    sweep_size,
    wait_until,
)
from interrupts import check_pool
from safepool import HostBudget, LeaseError, ManagerUnavailable, PoolManager, register_pool
from safepool._fastlease import _attached, sweep_stale_tables
from safepool._hostipc import SHM_DIR

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def manager() -> Iterator[PoolManager]:
    with PoolManager() as started:
        yield started


def fake_clock() -> float:
    return 0.0


def accept(item: object) -> bool:
    return True


@pytest.mark.parametrize(
    ("options", "fast", "reason"),
    [
        ({"share": "value"}, True, None),
        ({"share": "value", "max_lifetime": 60, "max_idle": 30, "leak_timeout": 5}, True, None),
        ({"share": "hosted"}, False, "hosted items stay in the server"),
        ({"share": "value", "check": accept}, False, "check/reset hooks"),
        ({"share": "value", "reset": accept}, False, "check/reset hooks"),
        # The database defaults: "auto" means nothing for by-value items (never connections).
        (
            {"share": "value", "reset": "auto", "max_lifetime": "auto", "max_idle": "auto"},
            True,
            None,
        ),
        ({"share": "value", "reset": None, "max_lifetime": None}, True, None),
        ({"share": "value", "configure": accept}, False, "configure hook"),
        ({"share": "value", "clock": fake_clock}, False, "its own clock"),
        ({"share": "value", "fast_path": False}, False, "turned off"),
    ],
)
def test_describe_says_whether_a_pool_has_the_fast_path_and_why_not(
    manager: PoolManager, options: dict[str, Any], fast: bool, reason: str | None
) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), **options)
    described = pool.describe()
    assert described["fast_path"] is fast
    if reason is None:
        assert described["fast_path_reason"] is None
    else:
        assert reason in described["fast_path_reason"]
    with pool.lease() as item:
        if options["share"] == "value":
            assert isinstance(item, str)
    assert (pool._fast_leaser() is not None) is fast


def test_fast_path_is_validated_like_every_option(manager: PoolManager) -> None:
    with pytest.raises(TypeError, match="fast_path must be a bool"):
        manager.SafeConnectionPool(factory=targets.Tokens(), share="value", fast_path="yes")


def test_items_too_large_for_the_table_still_travel_by_value(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Tokens(size=5000), share="value", max_size=2)
    first, second = pool.acquire(), pool.acquire()
    assert len(first) > 5000 and first != second
    pool.release(first)
    pool.release(second)
    assert pool._fast_leaser() is not None
    check_pool(pool)


def test_expired_items_are_replaced_and_idle_ones_closed(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(
        factory=targets.Tokens(), share="value", max_size=2, max_lifetime=0.2, max_idle=0.3
    )
    first = pool.acquire()
    pool.release(first)
    time.sleep(0.25)  # past max_lifetime: the next lease gets a new item, never the old one
    with pool.lease() as second:
        assert second != first
    wait_until(lambda: pool.stats().size == 0, timeout=SHORT, what="idle items closed")
    stats = pool.stats()
    assert stats.created == stats.closed == 2


def test_a_budget_bounds_the_items_of_a_fast_path_pool(manager: PoolManager) -> None:
    budget = HostBudget(f"fast-{uuid.uuid4().hex[:12]}", 2)
    try:
        pool = manager.SafeConnectionPool(
            factory=targets.Tokens(), share="value", max_size=5, budget=budget, timeout=0.3
        )
        held = [pool.acquire(), pool.acquire()]
        assert budget.stats().in_use == 2
        with pytest.raises(TimeoutError):
            pool.acquire()
        for item in held:
            pool.release(item, discard=True)  # closed: their permits go back
        assert budget.stats().in_use == 0
    finally:
        budget.unlink()
        budget.close()


def test_a_release_through_another_pool_or_twice_changes_nothing(manager: PoolManager) -> None:
    one = manager.SafeConnectionPool(factory=targets.Tokens("one"), share="value")
    two = manager.SafeConnectionPool(factory=targets.Tokens("two"), share="value")
    item = one.acquire()
    with pytest.raises(LeaseError):
        two.release(item)
    one.release(item)
    with pytest.raises(LeaseError):
        one.release(item)
    check_pool(one)
    check_pool(two)


@pytest.mark.slow
def test_lease_time_counts_each_lease_from_its_own_start(manager: PoolManager) -> None:
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), share="value", max_size=2)
    pool.release(pool.acquire())  # both items exist, so neither lease below waits for a fill
    pool.release(pool.acquire())
    base = pool.stats().lease_time
    before_a = time.time()
    a = pool.acquire()
    after_a = time.time()
    time.sleep(0.3)  # a long first lease, so that another lease timed from its start shows
    before_b = time.time()
    b = pool.acquire()
    pool.release(b)
    after_b = time.time()
    before_release_a = time.time()
    pool.release(a)
    after_release_a = time.time()
    held = pool.stats().lease_time - base
    assert before_release_a - after_a <= held + 1e-3
    assert held <= (after_release_a - before_a) + (after_b - before_b) + 1e-3


@pytest.mark.parametrize("method", START_METHODS)
def test_stress_8_processes_x_8_threads_with_a_ledger(
    method: str, manager: PoolManager, tmp_path: Path
) -> None:
    """No item is ever held by two holders (each holding creates an O_EXCL file named after
    the item), nothing is lost: the full capacity is there at the end."""
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), share="value", max_size=5)
    ctx = multiprocessing.get_context(method)
    seconds = 5.0 if sweep_size(1, other_versions=0) else 1.5
    pipes, children = [], []
    for i in range(8):
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=targets.ledger_worker, args=(pool, str(tmp_path), seconds, i, writer)
        )
        child.start()
        writer.close()
        pipes.append(reader)
        children.append(child)
    results = [reader.recv() for reader in pipes]
    for child in children:
        child.join(LONG)
    assert all(fast for _, fast, _, _ in results), "every client used the table"
    assert all(not errors for _, _, _, errors in results), results
    leases = sum(count for _, _, count, _ in results)
    stats = pool.stats()
    assert stats.requests >= leases > 8 * 8
    assert list(tmp_path.iterdir()) == []
    check_pool(pool)


def _fork_churner(pool: Any, wait_first: bool) -> tuple[int, int]:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child, ends with os._exit
        os.close(rfd)
        targets.churn_until_killed(pool, wfd, wait_first)
    os.close(wfd)
    assert readable(rfd, LONG), "the client never started"
    assert os.read(rfd, 1) == b"r", "the client could not use the table"
    os.close(rfd)
    return pid, rfd


def _settled(pool: Any, held: int, what: str) -> None:
    def settled() -> bool:
        stats = pool.stats()
        return stats.leased == held and stats.waiting == 0

    wait_until(settled, timeout=1.0, what=f"{what}: the killed client's leases back")


@pytest.mark.slow
def test_sigkill_inside_fast_path_acquire_and_release_100_times(manager: PoolManager) -> None:
    """A client leasing and releasing on the table, killed at a swept delay (so inside lease,
    release, the mutex, a hand-off to it while it waits); after each kill its leases come back
    within a second, nothing is held twice and the full capacity is usable."""
    rng = seeded("fastpath-sigkill")
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), share="value", max_size=2)
    for point in range(sweep_size(100, other_versions=30)):
        handoff = rng.random() < 0.3  # the parent holds everything; the child waits
        held = [pool.acquire(), pool.acquire()] if handoff else []
        pid, _ = _fork_churner(pool, wait_first=handoff)
        time.sleep(rng.uniform(0, 2e-3))  # the interruption point
        if held:
            pool.release(held.pop())  # handed to the waiting child, or not yet
            time.sleep(rng.uniform(0, 1e-3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _settled(pool, held=len(held), what=f"seed {SEED}, point {point}")
        for item in held:
            pool.release(item)
        check_pool(pool)
    stats = pool.stats()
    print(f"{stats.reclaimed} of {point + 1} kills reclaimed a lease; {stats.requests} leases")
    assert stats.reclaimed > 0  # some kills did land while holding


def _unshare() -> list[str]:
    unshare = shutil.which("unshare")
    probe = subprocess.run(
        [unshare or "unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    if unshare is None or probe.returncode != 0:
        pytest.skip("a private mount namespace (unshare --mount) is not available here")
    return [unshare, "--mount", "--propagation", "private"]


class Served(PoolManager):
    pass


register_pool(Served, "tokens", targets.Tokens("shared"), share="value", max_size=2)


def _lease_for(pool: Any, seconds: float) -> int:
    count, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        with pool.lease(timeout=LONG):
            count += 1
    return count


def test_a_remote_client_and_a_same_host_client_share_one_pool(tmp_path: Path) -> None:
    """The "remote" client runs in its own mount namespace with an empty /dev/shm, so it
    cannot see the pool's table, exactly as a client on another host: it falls back to round
    trips by itself. Both lease the same two items, from the same table and queue."""
    prefix = _unshare()
    authkey = secrets.token_bytes(32)
    with Served(address=("127.0.0.1", 0), authkey=authkey) as server:
        host, port = server.address  # type: ignore[attr-defined]
        local = server.tokens()  # type: ignore[attr-defined]
        held = local.acquire()  # one item held here while the remote client leases
        script = f"mount -t tmpfs tmpfs {SHM_DIR} && exec {sys.executable} -m fastpath_targets"
        remote = subprocess.Popen(
            [*prefix, "sh", "-c", f"{script} {host}:{port} {authkey.hex()} 200"],
            cwd=TESTS,
            env={**os.environ, "PYTHONPATH": str(TESTS)},
            stdout=subprocess.PIPE,
            text=True,
        )
        local_leases = ThreadResult(lambda: _lease_for(local, 0.5))  # meanwhile, on the table
        out, _ = remote.communicate(timeout=LONG)
        assert remote.returncode == 0, out
        assert out.startswith("fast=False leases=200")
        remote_items = set(eval(out.split("items=")[1]))
        assert held not in remote_items and len(remote_items) == 1  # only the other item
        assert local_leases.join(LONG) > 0
        local.release(held)
        assert local._fast_leaser() is not None
        check_pool(local)


def _killed_server_pool() -> tuple[PoolManager, Any, str]:
    manager = PoolManager()
    manager.start()
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), share="value")
    leaser = pool._fast_leaser()
    assert leaser is not None
    os.kill(manager._process.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    manager._process.join(LONG)  # type: ignore[attr-defined]
    path = leaser.table.segment.path
    assert os.path.exists(path)  # the server could not remove it
    return manager, pool, path


def test_a_client_of_a_killed_server_says_so_and_removes_its_table() -> None:
    manager, pool, path = _killed_server_pool()
    with pytest.raises(ManagerUnavailable, match="died"):
        pool.acquire(timeout=SHORT)
    assert not os.path.exists(path)
    with pytest.raises(ManagerUnavailable):
        pool.acquire(timeout=SHORT)  # and keeps saying so
    manager.shutdown()


def test_a_client_keeps_no_descriptor_of_the_pools_it_used_once_they_are_closed(
    manager: PoolManager,
) -> None:
    """Each table a client leases through is mapped once per process; once the pool is closed
    (by this client, or by another process) and the client holds none of its items, the
    registration's descriptors go (before: two per pool, for the life of the process)."""
    keeper = manager.SafeConnectionPool(factory=targets.Tokens(), max_size=1, share="value")
    with keeper.lease(timeout=SHORT):
        pass
    before = fds()
    for i in range(10):
        pool = manager.SafeConnectionPool(factory=targets.Tokens(), max_size=1, share="value")
        assert pool.describe()["fast_path"], pool.describe()
        with pool.lease(timeout=SHORT) as item:
            assert item.startswith("item-")
        if i % 2:
            pool.close()  # by this client
        else:  # by another client: noticed at this process's next attachment
            ctx = multiprocessing.get_context("fork")
            closer = ctx.Process(target=targets.close_pool, args=(pool,))
            closer.start()
            closer.join(LONG)
            assert closer.exitcode == 0
            closer.close()
        del pool
    with keeper.lease(timeout=SHORT):  # an attachment elsewhere sweeps too
        pass
    pool = manager.SafeConnectionPool(factory=targets.Tokens(), max_size=1, share="value")
    with pool.lease(timeout=SHORT):
        pass
    pool.close()
    del pool
    gc.collect()
    assert left_open(before) == {}


def test_a_killed_servers_table_nobody_uses_is_swept() -> None:
    manager, _pool, path = _killed_server_pool()
    assert sweep_stale_tables(min_age=0.0, only=[os.path.basename(path)]) == 0  # we use it
    _attached.drop(path)  # this process lets go of it too: nobody is registered any more
    assert sweep_stale_tables(min_age=0.0, only=[os.path.basename(path)]) == 1
    assert not os.path.exists(path)
    manager.shutdown()
