"""The process tests both engines share: many processes against an independent ledger, and
holders SIGKILLed at any point. Sized by sweep_size()/long_run(): the issue's full runs (12
processes for 20 s, 50 kills) with ``pytest --long``; a shorter seeded run by default."""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import time
import uuid
from typing import Any

from helpers import LONG, ThreadResult, long_run, seeded, sweep_size
from netbudget_targets import (
    check_tokens,
    churn_until_killed,
    hold_until_killed,
    open_budget,
    stress_worker,
)
from safepool import BudgetTimeout


def run_stress(engine: str, where: str, options: dict[str, Any], *, limit: int = 4) -> None:
    processes = 12
    seconds = 20.0 if long_run() else 1.5 if sweep_size(2) == 2 else 0.8
    name = f"stress-{uuid.uuid4().hex[:10]}"
    budget = open_budget(engine, where, name, limit, **options)
    ctx = multiprocessing.get_context("fork")
    ledger, peak = ctx.Value("i", 0), ctx.Value("i", 0)
    barrier = ctx.Barrier(processes)
    pipes, procs = [], []
    for i in range(processes):
        reader, writer = ctx.Pipe(duplex=False)
        seed = f"{seeded('stress').random()}-{engine}-{i}"
        proc = ctx.Process(
            target=stress_worker,
            args=(engine, where, name, limit, seconds, seed, ledger, peak, barrier, writer,
                  options),
        )  # fmt: skip
        proc.start()
        writer.close()
        pipes.append(reader)
        procs.append(proc)
    records, timeouts = [], 0
    for reader in pipes:
        assert reader.poll(LONG + seconds), "a stress worker did not report"
        got, missed = reader.recv()
        records += got
        timeouts += missed
    for proc in procs:
        proc.join(LONG)
        assert proc.exitcode == 0
    assert peak.value <= limit, f"{peak.value} holders at once on a limit of {limit}"
    assert peak.value == limit, "the stress never filled the budget: it tested little"
    assert len(records) > processes and timeouts > 0
    check_tokens(records)
    _assert_all_usable(budget, limit, LONG)
    budget.close()


def _assert_all_usable(budget: Any, limit: int, timeout: float) -> list[float]:
    permits = [budget.acquire(timeout=timeout) for _ in range(limit)]
    try:
        budget.acquire(timeout=0)
    except BudgetTimeout:
        pass
    else:  # pragma: no cover - the failure being tested for
        raise AssertionError("more permits than the limit")
    for p in permits:
        budget.release(p)
    return []


def run_kills(engine: str, where: str, options: dict[str, Any], *, bound: float) -> list[float]:
    """SIGKILL holders again and again (holding, or at a random point in acquire/release);
    every permit must be back within ``bound`` seconds of the kill. Returns the times."""
    limit = 2
    name = f"kill-{uuid.uuid4().hex[:10]}"
    budget = open_budget(engine, where, name, limit, **options)
    ctx = multiprocessing.get_context("fork")
    rng = seeded(f"kills-{engine}")
    times = []
    for point in range(sweep_size(6, other_versions=2, long=50)):
        holding = point % 2 == 0
        reader, writer = ctx.Pipe(duplex=False)
        target = hold_until_killed if holding else churn_until_killed
        proc = ctx.Process(target=target, args=(engine, where, name, limit, writer, options))
        proc.start()
        writer.close()
        assert reader.poll(LONG), f"kill {point}: the holder did not start"
        reader.recv()
        waiter = ThreadResult(lambda: budget.acquire(timeout=LONG)) if holding else None
        if not holding:
            time.sleep(rng.uniform(0, 0.02))  # a random point inside acquire() or release()
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(LONG)
        permits = [waiter.join(LONG)] if waiter else []
        permits += [budget.acquire(timeout=LONG) for _ in range(limit - len(permits))]
        times.append(time.monotonic() - killed)
        for p in permits:
            budget.release(p)
    budget.close()
    worst = max(times)
    assert worst <= bound, (
        f"a killed holder's permits came back after {worst:.3f}s (> {bound}s); "
        f"median {statistics.median(times):.3f}s over {len(times)} kills"
    )
    return times
