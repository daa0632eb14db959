"""Process targets for the HostBudget tests (importable by name under spawn and forkserver).

Also a command line, for unrelated processes started with subprocess:

    python tests/hostbudget_targets.py hold NAME LIMIT   # acquire, print the token, wait for
                                                         # a line on stdin, release, exit 0
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any

from safepool import BudgetTimeout, HostBudget


def hold(name: str, limit: int, conn: Any) -> None:
    """Acquire one permit, report (pid, token), then hold it until told to release (or die)."""
    budget = HostBudget(name, limit)
    permit = budget.acquire(timeout=30)
    conn.send((os.getpid(), permit.token))
    if conn.poll(60):
        conn.recv()
    budget.release(permit)
    conn.send(budget.stats().as_dict())


def cycle(name: str, limit: int, conn: Any) -> None:
    """Acquire and release as fast as possible, forever (the SIGKILL sweep's victim)."""
    budget = HostBudget(name, limit)
    budget.release(budget.acquire(timeout=30))
    conn.send("cycling")
    acquire, release = budget.acquire, budget.release
    while True:
        release(acquire(30))


def churn(  # noqa: PLR0917 - a Process target: positional arguments
    name: str, limit: int, seed: int, duration: float, ledger: str, conn: Any
) -> None:
    """Random holds for ``duration`` seconds; every holder claims a ledger file with O_EXCL.

    The ledger is independent of the budget: at most ``limit`` files can exist if the budget
    is right. Reports (acquires, overlaps seen, timeouts, tokens in order) to ``conn``.
    """
    rng = random.Random(seed)
    budget = HostBudget(name, limit)
    acquires = overlaps = timeouts = 0
    tokens: list[int] = []
    conn.send("ready")
    conn.recv()  # start together
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        try:
            permit = budget.acquire(timeout=rng.choice((0, 0.001, 0.05, 5.0)))
        except BudgetTimeout:
            timeouts += 1
            continue
        acquires += 1
        tokens.append(permit.token)
        claimed = _claim(ledger, limit)
        if claimed is None:
            overlaps += 1
        hold_for = rng.choice((0.0, 0.0, 0.0001, 0.001, 0.003))
        if hold_for:
            time.sleep(hold_for)
        if claimed is not None:
            os.unlink(claimed)
        budget.release(permit)
    conn.send((acquires, overlaps, timeouts, tokens))
    budget.close()


def _claim(ledger: str, limit: int) -> str | None:
    for k in range(limit):
        path = os.path.join(ledger, f"holder-{k}")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return path
    return None


def wait_for_permit(name: str, limit: int, timeout: float, conn: Any) -> None:
    """Report "waiting", then acquire with ``timeout``; report ("ok", token, waited) or
    ("timeout", waited); hold until told to go."""
    budget = HostBudget(name, limit)
    conn.send("waiting")
    start = time.monotonic()
    try:
        permit = budget.acquire(timeout=timeout)
    except BudgetTimeout:
        conn.send(("timeout", time.monotonic() - start))
        return
    conn.send(("ok", permit.token, time.monotonic() - start))
    if conn.poll(60):
        conn.recv()
    budget.release(permit)


def use_inherited(budget: HostBudget, conn: Any) -> None:
    """Under any start method: use a budget object passed from the parent (pickled by name
    under spawn/forkserver, inherited under fork)."""
    with budget.lease(timeout=30) as permit:
        conn.send((os.getpid(), permit.token, budget.stats().in_use))
        conn.recv()


def stats_of(name: str, limit: int, conn: Any) -> None:
    conn.send(HostBudget(name, limit).stats().as_dict())


def try_open(name: str, limit: int, uid: int, mode: int, conn: Any) -> None:
    """As ``uid``: create (or open) the budget; report "ok" or the error's type and text."""
    try:
        os.setgid(uid)
        os.setuid(uid)
        HostBudget(name, limit, mode=mode)
        conn.send(("ok", ""))
    except Exception as exc:
        conn.send((type(exc).__name__, str(exc)))


def main(argv: list[str]) -> int:
    command, name, limit = argv[0], argv[1], int(argv[2])
    if command != "hold":
        return 2
    budget = HostBudget(name, limit)
    permit = budget.acquire(timeout=30)
    print(permit.token, flush=True)
    sys.stdin.readline()
    budget.release(permit)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def hold_with_child(name: str, limit: int, conn: Any) -> None:
    """Hold a permit and fork a child that outlives us (it only sleeps)."""
    budget = HostBudget(name, limit)
    budget.acquire(timeout=30)
    child = os.fork()
    if child == 0:
        time.sleep(120)
        os._exit(0)
    conn.send((os.getpid(), child))
    time.sleep(120)


def die_holding_the_lock(name: str, limit: int, stage: str, conn: Any) -> None:
    """Take the table's mutex and stop half-way through a grant (``stage``), then wait to be
    SIGKILLed: the next user must repair what we leave.

    * ``fields``: a FREE slot's fields written, the slot not committed;
    * ``commit``: a slot committed HELD, the budget's token not yet advanced;
    * ``handoff``: a hand-off to the oldest waiter journaled and its slot committed, the
      waiter not yet told.
    """
    from safepool import _hosttable as ht

    budget = HostBudget(name, limit)
    table = budget._table
    assert table is not None
    if stage == "handoff":  # hold the only permit until the parent's waiter has queued
        held = budget.acquire()
        conn.send("holding")
        conn.recv()
        table.mutex.lock()
        table.release_mine(held._engine_state)
    else:
        table.mutex.lock()
    s = table.free_slot()
    lay, mm = table.layout, table.mm
    token = table.token() + 1
    if stage == "handoff":
        e = table._oldest_waiter({})
        _, _, reg, gen, _, pid = ht.WAIT.unpack_from(mm, lay.wait_rec + ht.WAIT.size * e)
        ht._JOURNAL.pack_into(mm, ht.JOURNAL, ht._GRANT, s, e, token)
    else:
        reg, gen, pid = table.reg, table.gen, os.getpid()
    ht.SLOT.pack_into(mm, lay.slot_rec + ht.SLOT.size * s, token, reg, gen, pid, time.time())
    if stage != "fields":
        mm[lay.slot_state + s] = ht.HELD
    conn.send(token)
    time.sleep(120)
