"""Process targets and shared checks for the PostgresBudget and RedisBudget tests.

Importable by spawn and forkserver children; every target makes its own budget object from the
engine's name and address (a budget is never shared across processes, only its name).
"""

from __future__ import annotations

import bisect
import os
import random
import signal
import time
from typing import Any

from helpers import LONG, start_lingering_child
from safepool import BudgetTimeout, PostgresBudget, RedisBudget


def open_budget(engine: str, where: str, name: str, limit: int, **options: Any) -> Any:
    if engine == "postgres":
        return PostgresBudget(where, name, limit, **options)
    return RedisBudget(where, name, limit, **options)


def stress_worker(  # noqa: PLR0917 - a process target takes positional arguments
    engine: str,
    where: str,
    name: str,
    limit: int,
    seconds: float,
    seed: str,
    ledger: Any,
    peak: Any,
    barrier: Any,
    out: Any,
    options: dict[str, Any],
) -> None:
    """Random holds until ``seconds`` pass; a shared ledger counts holders independently.

    Sends back one (asked, granted, token, released) per permit, on the system-wide monotonic
    clock, so the parent can check that tokens grow with the order of grants.
    """
    rng = random.Random(seed)
    budget = open_budget(engine, where, name, limit, **options)
    records = []
    timeouts = 0
    barrier.wait(LONG)
    end = time.monotonic() + seconds
    # On a loaded machine the planned time can pass before every permit was held at once: go
    # on (within a bound) until the shared peak shows it was, so the run tests what it means to.
    bound = end + LONG / 2
    while (now := time.monotonic()) < end or (peak.value < limit and now < bound):
        asked = time.monotonic()
        try:
            permit = budget.acquire(timeout=rng.choice((0, 0.01, 0.2, 1.0)))
        except BudgetTimeout:
            timeouts += 1
            continue
        granted = time.monotonic()
        with ledger.get_lock():
            ledger.value += 1
            peak.value = max(peak.value, ledger.value)
        assert permit.valid, permit
        time.sleep(rng.uniform(0, 0.004))  # the work done while holding (not synchronisation)
        with ledger.get_lock():
            ledger.value -= 1
        if rng.random() < 0.3:  # a second permit at times, through lease(): never a held slot
            try:
                with budget.lease(timeout=0) as extra:
                    assert extra.token > permit.token and extra.valid
            except BudgetTimeout:
                pass
        budget.release(permit)
        records.append((asked, granted, permit.token, time.monotonic()))
    out.send((records, timeouts))
    out.close()


def hold_until_killed(  # noqa: PLR0917 - a process target
    engine: str,
    where: str,
    name: str,
    limit: int,
    ready: Any,
    options: dict[str, Any],
    child: str = "",
) -> None:
    """Take every permit, say so (the tokens), then wait to be killed. ``child``: first start
    a child that outlives us (by ``os.fork`` or that start method) and send its pid too."""
    budget = open_budget(engine, where, name, limit, **options)
    permits = [budget.acquire(timeout=LONG) for _ in range(limit)]  # held till the end
    tokens = [p.token for p in permits]
    ready.send((tokens, start_lingering_child(child)) if child else tokens)
    time.sleep(LONG)
    os._exit(3)


def churn_until_killed(  # noqa: PLR0917 - a process target
    engine: str,
    where: str,
    name: str,
    limit: int,
    ready: Any,
    options: dict[str, Any],
) -> None:
    """Acquire and release in a loop (to be killed at a random point inside either)."""
    budget = open_budget(engine, where, name, limit, **options)
    ready.send("ready")
    while True:
        budget.release(budget.acquire(timeout=LONG))


def sigstop_self_holding(  # noqa: PLR0917 - a process target
    engine: str,
    where: str,
    name: str,
    ready: Any,
    report: Any,
    options: dict[str, Any],
) -> None:
    """Hold the only permit, stop (SIGSTOP) until continued, then report what we see."""
    lost: list[str] = []
    budget = open_budget(engine, where, name, 1, on_lost=lambda p: lost.append(str(p.token)),
                         **options)  # fmt: skip
    permit = budget.acquire(timeout=LONG)
    ready.send(permit.token)
    os.kill(os.getpid(), signal.SIGSTOP)
    valid_at_once = permit.valid  # the first thing done after SIGCONT
    deadline = time.monotonic() + LONG
    while not lost and time.monotonic() < deadline:
        time.sleep(0.01)
    budget.release(permit)  # quiet: it was lost
    report.send((valid_at_once, permit.valid, permit.lost_reason, lost))
    report.close()


def acquire_in_child(  # noqa: PLR0917 - a process target
    engine: str,
    where: str,
    name: str,
    limit: int,
    out: Any,
    options: dict[str, Any],
) -> None:
    """Under any start method: open by name, take a permit, report, release."""
    budget = open_budget(engine, where, name, limit, **options)
    with budget.lease(timeout=LONG) as permit:
        out.send((permit.token, permit.valid, budget.stats().in_use))
    out.close()


def check_tokens(records: list[tuple[float, float, int, float]]) -> None:
    """Tokens are unique, and a permit asked for after another was released has a larger one."""
    tokens = [r[2] for r in records]
    assert len(set(tokens)) == len(tokens), "a fencing token was issued twice"
    by_release = sorted(records, key=lambda r: r[3])
    releases = [r[3] for r in by_release]
    best = []
    top = -1
    for r in by_release:
        top = max(top, r[2])
        best.append(top)
    for asked, _, token, _ in records:
        i = bisect.bisect_left(releases, asked)  # permits released before this one was asked
        if i:
            assert token > best[i - 1], (token, best[i - 1])


def wait_for_a_permit(  # noqa: PLR0917 - a process target
    engine: str,
    where: str,
    name: str,
    limit: int,
    out: Any,
    options: dict[str, Any],
    other: str = "",
) -> None:
    """Wait (as another process) for a permit; report when it came. ``other``: first take a
    permit of that budget too (on the same session: the process then holds something)."""
    first = open_budget(engine, where, other, 1, **options) if other else None
    held = first.acquire(timeout=LONG) if first else None
    budget = open_budget(engine, where, name, limit, **options)
    permit = budget.acquire(timeout=LONG)
    out.send(time.monotonic())
    budget.release(permit)
    if first and held:
        first.release(held)
    out.close()
