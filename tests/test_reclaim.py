"""Process-bound leases: a dead holder's leases come back within 1 s; a live one's never do."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import manager_targets
import remote_targets as targets
from helpers import FORK_WARNING, LONG, SHORT, START_METHODS, wait_until
from safepool import PoolManager

pytestmark = [pytest.mark.filterwarnings(FORK_WARNING), pytest.mark.timeout(240)]

# A dead holder's leases are back in the pool within this.
RECLAIM_BOUND = 1.0
# How long a lease must stay put to show that nothing reclaims it.
STAYS_FOR = 0.5


@pytest.fixture(params=START_METHODS)
def ctx(request: pytest.FixtureRequest) -> Any:
    return multiprocessing.get_context(request.param)


@pytest.fixture
def pool(ctx: Any, fast_path: bool) -> Iterator[Any]:
    with PoolManager(ctx=ctx) as m:
        yield m.SafeConnectionPool(
            factory=manager_targets.TokenFactory(), max_size=1, share="value", fast_path=fast_path
        )


def start_holder(ctx: Any, target: Any, mode: str) -> tuple[Any, Any, tuple[Any, ...]]:
    reader, writer = ctx.Pipe()
    proc = ctx.Process(target=targets.hold, args=(target, writer, mode))
    proc.start()
    assert reader.poll(LONG), "the holder did not report its lease"
    return proc, reader, reader.recv()


def reacquire_within(pool: Any, bound: float) -> float:
    """Lease the pool's only item; return how long that took after the holder died."""
    start = time.monotonic()
    item = pool.acquire(timeout=LONG)
    elapsed = time.monotonic() - start
    pool.release(item)
    assert elapsed < bound, f"capacity came back after {elapsed:.3f}s"
    return elapsed


def stays(predicate: Any, duration: float) -> None:
    """Assert ``predicate`` holds throughout ``duration`` (to show something does NOT happen)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert predicate()
        time.sleep(0.01)


def test_sigkill_a_holder_20_times_capacity_back_each_time_within_1s(ctx: Any, pool: Any) -> None:
    rounds = 20 if ctx.get_start_method() == "fork" else 5  # spawn/forkserver start slowly
    for n in range(rounds):
        proc, reader, _ = start_holder(ctx, pool, "plain")  # keep the pipe open: it holds
        assert pool.stats().leased == 1
        os.kill(proc.pid, signal.SIGKILL)
        reacquire_within(pool, RECLAIM_BOUND)
        proc.join(LONG)
        reader.close()
        assert proc.exitcode == -signal.SIGKILL
        stats = pool.stats()
        assert (stats.reclaimed, stats.leased, stats.size) == (n + 1, 0, 1)


@pytest.mark.parametrize("mode", ["signal", "with"])
def test_holder_ended_by_an_exception_from_a_signal_handler(ctx: Any, pool: Any, mode: str) -> None:
    """Seed 003: the handler's exception skips cleanup (mode "signal"), so the process exits
    holding the lease: reclaimed. In a `with pool.lease()` block it is released on the way out."""
    proc, reader, _ = start_holder(ctx, pool, mode)
    os.kill(proc.pid, signal.SIGTERM)
    reacquire_within(pool, RECLAIM_BOUND)
    proc.join(LONG)
    reader.close()
    assert proc.exitcode == 1  # the RuntimeError ended it
    assert pool.stats().reclaimed == (1 if mode == "signal" else 0)


def test_a_thread_that_ends_does_not_give_back_its_processes_lease(ctx: Any, pool: Any) -> None:
    reader, writer = ctx.Pipe()
    proc = ctx.Process(target=targets.thread_holds, args=(pool, writer))
    proc.start()
    assert reader.poll(LONG)
    _, _, fds_before, fds_after = reader.recv()
    assert fds_after < fds_before + 1, "the thread's own connection should be closed by now"
    stays(lambda: pool.stats().leased == 1 and pool.stats().reclaimed == 0, STAYS_FOR)
    assert [lease.pid for lease in pool.leases()] == [proc.pid]
    reader.send("release")
    assert reader.poll(LONG)
    assert reader.recv() == ("released",)
    proc.join(LONG)
    assert pool.stats().reclaimed == 0


def test_a_forked_child_does_not_keep_its_parents_session_alive(ctx: Any, pool: Any) -> None:
    proc, reader, (_, _, grandchild) = start_holder(ctx, pool, "fork")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        reacquire_within(pool, RECLAIM_BOUND)  # while the grandchild, with its fds, lives on
        os.kill(grandchild, 0)  # still alive (raises if not)
    finally:
        os.kill(grandchild, signal.SIGKILL)
        proc.join(LONG)
        reader.close()
    assert pool.stats().reclaimed == 1


def test_leases_name_their_holder_and_leaks_are_counted_across_processes(fast_path: bool) -> None:
    with PoolManager() as m:
        pool = m.SafeConnectionPool(
            factory=manager_targets.TokenFactory(),
            max_size=2,
            share="value",
            fast_path=fast_path,
            leak_timeout=0.2,
        )
        ctx = multiprocessing.get_context("fork")
        proc, reader, _ = start_holder(ctx, pool, "plain")
        [lease] = pool.leases()
        assert (lease.pid, lease.host) == (proc.pid, os.uname().nodename)
        assert f"pid {proc.pid}" in lease.holder
        assert 0 <= time.time() - lease.since < LONG
        wait_until(lambda: pool.stats().leaks == 1, SHORT, "the server reports the leak")
        reader.send("release")
        proc.join(LONG)


def test_leak_warning_in_the_server_log_names_the_holder(
    tmp_path: Any, fast_path: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The leak is reported by the server. The reclaim too, except that on the fast path any
    process using the pool's table may find the dead holder first and reclaim (and log) it."""
    caplog.set_level(logging.WARNING, logger="safepool")
    log = tmp_path / "server.log"
    manager = PoolManager()
    manager.start(initializer=log_to_file, initargs=(str(log),))
    try:
        pool = manager.SafeConnectionPool(
            factory=manager_targets.TokenFactory(),
            max_size=1,
            share="value",
            fast_path=fast_path,
            leak_timeout=0.1,
        )
        ctx = multiprocessing.get_context("fork")
        proc, _reader, _ = start_holder(ctx, pool, "plain")  # the pipe stays open: it holds
        wait_until(lambda: pool.stats().leaks == 1, SHORT)
        os.kill(proc.pid, signal.SIGKILL)
        reacquire_within(pool, RECLAIM_BOUND)
        proc.join(LONG)
        here = lambda: "\n".join(r.getMessage() for r in caplog.records)  # noqa: E731
        wait_until(lambda: "back in the pool" in log.read_text() + here(), SHORT)
        text = log.read_text()
        assert "has been held for" in text and f"pid {proc.pid}" in text  # the leak report
        if "back in the pool" in text or not fast_path:
            assert f"pid {proc.pid} (" in text.split("back in the pool")[0]  # the server's
        else:
            assert f"pid {proc.pid} ended holding a lease" in here()  # this process's reclaim
    finally:
        manager.shutdown()


def log_to_file(path: str) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("safepool").addHandler(handler)
    logging.getLogger("safepool").setLevel(logging.INFO)


@pytest.mark.parametrize("with_block", [False, True], ids=["acquire", "with-lease"])
def test_pool_workers_terminated_while_holding_leases_give_them_back(
    ctx: Any, with_block: bool, fast_path: bool
) -> None:
    """Pool.terminate() SIGTERMs its workers: no cleanup runs in them, so the leases come back
    through their processes' sessions, within a second."""
    with PoolManager(ctx=ctx) as m:
        pool = m.SafeConnectionPool(
            factory=manager_targets.TokenFactory(), max_size=2, share="value", fast_path=fast_path
        )
        workers = ctx.Pool(2, initializer=targets.init_holder_pool, initargs=(pool,))
        try:
            for _ in range(2):
                workers.apply_async(targets.lease_and_block, (with_block,))
            wait_until(lambda: pool.stats().leased == 2, LONG, "both workers hold a lease")
        finally:
            workers.terminate()
            workers.join()
        start = time.monotonic()
        items = [pool.acquire(timeout=LONG) for _ in range(2)]
        assert time.monotonic() - start < RECLAIM_BOUND
        assert pool.stats().reclaimed == 2
        for item in items:
            pool.release(item)
