"""PostgresBudget across many processes: a ledger never sees more holders than the limit, and
a SIGKILLed holder's permits come back within a second, even while a child it forked lives on."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
import uuid

import pytest

from helpers import FORK_WARNING, LONG, START_METHODS
from netbudget_stress import run_kills, run_stress
from netbudget_targets import hold_until_killed
from safepool import PostgresBudget

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.filterwarnings(FORK_WARNING)]


def test_twelve_processes_never_exceed_the_limit(pg_dsn: str) -> None:
    run_stress("postgres", pg_dsn, {})


def test_a_killed_holders_permits_come_back_within_a_second(pg_dsn: str) -> None:
    times = run_kills("postgres", pg_dsn, {}, bound=1.0)
    print(f"PostgresBudget: permits back after SIGKILL in {sorted(times)} s")


@pytest.mark.parametrize("how", ["os.fork", *START_METHODS])
def test_a_killed_holders_permits_come_back_while_its_child_lives_on(pg_dsn: str, how: str) -> None:
    """A holder that forked (a Pool worker, a pre-fork server's worker) and is then SIGKILLed:
    its child must not keep the holder's budget session, and so its permits, alive (before the
    fix they came back only when the child exited). Children made by spawn or forkserver
    inherit nothing; they are here for completeness."""
    name = f"kill-child-{uuid.uuid4().hex[:10]}"
    budget = PostgresBudget(pg_dsn, name, 2)
    # A holder of its own (spawned: a forked one would inherit this process's forkserver, which
    # multiprocessing then cannot use there).
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=hold_until_killed, args=("postgres", pg_dsn, name, 2, writer, {}, how)
    )
    proc.start()
    writer.close()
    child = 0
    try:
        assert reader.poll(LONG), "the holder did not start"
        tokens, child = reader.recv()
        assert budget.stats().in_use == 2 and child > 0
        killed = time.monotonic()
        os.kill(proc.pid or 0, signal.SIGKILL)
        proc.join()  # (waitpid: with a timeout, join waits for a sentinel the child holds too)
        permits = [budget.acquire(timeout=LONG) for _ in range(2)]
        took = time.monotonic() - killed
        assert os.path.exists(f"/proc/{child}"), "the child should still be alive"
        assert took <= 1.0, f"the permits came back after {took:.3f}s, with the child alive"
        assert min(p.token for p in permits) > max(tokens)
        for p in permits:
            budget.release(p)
    finally:
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.kill()
        proc.join(LONG)
        budget.close()
