"""PostgresBudget on the shared PostgreSQL: the budget contract (netbudget_contract), and what
only PostgreSQL does: a terminated session loses its permits at once, acquire_on(), holders
of dead sessions are never reported."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from helpers import FORK_WARNING, LONG, SHORT, run_in_fork, wait_until
from netbudget_contract import *  # noqa: F403 - the shared contract tests
from netbudget_contract import unique
from safepool import BudgetUnavailable, LeaseError, Permit, PostgresBudget, _pgsession

pytestmark = [pytest.mark.postgres, pytest.mark.filterwarnings(FORK_WARNING)]


@pytest.fixture
def engine() -> str:
    return "postgres"


@pytest.fixture
def where(pg_dsn: str) -> str:
    return pg_dsn


@pytest.fixture
def make(pg_dsn: str) -> Iterator[Any]:
    made: list[PostgresBudget] = []

    def factory(limit: int, name: str | None = None, **options: Any) -> PostgresBudget:
        budget = PostgresBudget(pg_dsn, unique("pg") if name is None else name, limit, **options)
        made.append(budget)
        return budget

    factory.engine = "postgres"  # type: ignore[attr-defined]
    factory.held = lambda b: list(b._session().held(b._id).values())  # type: ignore[attr-defined]
    yield factory
    if made:
        made[0].unlink()
    for budget in made:
        budget.close()


def backend_of(budget: PostgresBudget) -> int:
    session = budget._session()
    return session._backend


def test_a_terminated_session_loses_its_permits_and_the_holder_learns_it(
    make: Any, pg_dsn: str
) -> None:
    lost: list[Permit] = []
    budget = make(2, on_lost=lost.append)
    permit, other = budget.acquire(), budget.acquire()
    heard: list[Permit] = []
    permit._add_lost_listener(heard.append)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_of(budget),))
    wait_until(lambda: not permit.valid and not other.valid, SHORT, "the holder sees the loss")
    assert "session ended" in (permit.lost_reason or "")
    wait_until(lambda: len(lost) == 2, SHORT, "on_lost ran for both")
    assert heard == [permit] and budget.stats().reclaimed == 2

    def elsewhere() -> int:  # another process gets both permits at once
        fresh = PostgresBudget(pg_dsn, budget.name, 2)
        tokens = [fresh.acquire(timeout=0).token for _ in range(2)]
        return max(tokens)

    assert run_in_fork(elsewhere) > other.token
    budget.release(permit)  # quiet: it was lost
    with pytest.raises(LeaseError, match="already released"):
        budget.release(permit)
    again = budget.acquire(timeout=SHORT)  # the process reconnects
    assert again.valid and budget.stats().in_use == 1
    budget.release(again)


def test_holders_never_reports_a_dead_session(make: Any, pg_dsn: str) -> None:
    budget = make(2)

    def hold_and_die() -> int:
        child = PostgresBudget(pg_dsn, budget.name, 2)
        return child.acquire().token  # the child exits: its session ends

    token = run_in_fork(hold_and_die)
    wait_until(lambda: budget.stats().in_use == 0, SHORT, "the dead child's permit is back")
    assert token not in [h.token for h in budget.holders()]


def test_an_unreachable_server_fails_at_construction_and_leaves_nothing() -> None:
    before = dict(_pgsession._registry.sessions)
    with pytest.raises(BudgetUnavailable, match=r"cannot reach PostgreSQL at 127.0.0.1:1/"):
        PostgresBudget("host=127.0.0.1 port=1 dbname=x user=y password=secret", "n", 1)
    assert _pgsession._registry.sessions == before


def test_a_permit_held_on_its_own_connection(make: Any, pg_dsn: str) -> None:
    budget = make(2)
    conn = psycopg.connect(pg_dsn, autocommit=True)
    permit = budget.acquire_on(conn)
    assert permit.valid and budget.stats().in_use == 1
    assert budget.holders()[0].token == permit.token
    second = budget.acquire_on(conn, timeout=0)  # the same session: never the same slot
    with pytest.raises(Exception, match="no permit came free"):
        budget.acquire(timeout=0)
    budget.release(second)
    conn.close()  # the permit lives and dies with its connection
    assert not permit.valid and "closed" in (permit.lost_reason or "")
    wait_until(lambda: budget.stats().in_use == 0, SHORT, "the server freed the slot")
    budget.release(permit)  # quiet
    with psycopg.connect(pg_dsn) as busy:  # not autocommit
        busy.execute("SELECT 1")
        with pytest.raises(LeaseError, match="outside any transaction"):
            budget.acquire_on(busy)
        busy.rollback()
        on_busy = budget.acquire_on(busy)
        assert busy.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        budget.release(on_busy)
    assert budget.stats().in_use == 0


def test_the_lead_can_listen_for_lost_permits(make: Any, pg_dsn: str) -> None:
    """What SafeConnectionPool(budget=...) relies on: a listener added to a permit runs once
    when it is lost, at once if it already was."""
    budget = make(1)
    permit = budget.acquire()
    calls: list[Permit] = []
    permit._add_lost_listener(calls.append)
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_of(budget),))
    wait_until(lambda: calls == [permit], SHORT, "the listener ran")
    late: list[Permit] = []
    permit._add_lost_listener(late.append)
    assert late == [permit] and calls == [permit]


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only")
def test_import_safepool_imports_no_driver() -> None:
    import subprocess

    code = (
        "import sys, safepool; assert 'psycopg' not in sys.modules and 'redis' not in "
        "sys.modules; safepool.PostgresBudget; safepool.RedisBudget; "
        "assert 'psycopg' not in sys.modules and 'redis' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=LONG)


def advisory_locks(pg_dsn: str, key: int, *, granted: bool) -> int:
    """How many advisory locks of class ``key`` are granted (or waited for) on the server."""
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted = %s "
            "AND classid = (%s::int4)::oid",
            (granted, key),
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize("holding", [False, True], ids=["in-the-server", "listening"])
def test_a_release_wakes_a_waiter_in_another_process_at_once(
    make: Any, pg_dsn: str, holding: bool
) -> None:
    """Polling disabled, a release wakes a waiter of another process at once, by either way of
    waiting. A process holding nothing waits in the server, queued for a slot's lock (no
    LISTEN, no listener slot). One holding a permit (of another budget, on the same session)
    cannot let a wait occupy its session: it takes a listener slot, LISTENs, and is woken by
    the NOTIFY that a release sends only while a listener slot is held."""
    import multiprocessing

    from netbudget_targets import wait_for_a_permit
    from safepool._pgsession import KEY_BASE

    budget = make(1)
    other = make(1) if holding else None
    held = budget.acquire()
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    options = {"poll_interval": 30.0}
    proc = ctx.Process(
        target=wait_for_a_permit,
        args=("postgres", pg_dsn, budget.name, 1, writer, options, other.name if other else ""),
    )
    proc.start()
    writer.close()
    key = KEY_BASE + budget._id
    if holding:
        wait_until(lambda: advisory_locks(pg_dsn, -key, granted=True) > 0, LONG, "it listens")
    else:
        wait_until(lambda: advisory_locks(pg_dsn, key, granted=False) > 0, LONG, "it queues")
        assert advisory_locks(pg_dsn, -key, granted=True) == 0  # no listener slot
    released = time.monotonic()
    budget.release(held)
    assert reader.poll(LONG)
    woken = reader.recv() - released
    proc.join(LONG)
    assert proc.exitcode == 0 and woken < 1.0, f"woken after {woken:.3f}s"


class Cut(Exception):
    """Raised by a signal handler at a swept point of a wait in the server."""


@pytest.mark.parametrize("error", [KeyboardInterrupt, Cut])
def test_a_wait_in_the_server_interrupted_anywhere_leaves_nothing_behind(
    make: Any, pg_dsn: str, error: type[BaseException]
) -> None:
    """A waiter of a process that holds nothing waits in the server, queued for a slot's lock.
    A signal handler raising at a seeded point of that wait: the call ends with that exception
    or BudgetTimeout, never with a permit; the process holds nothing on the server afterwards;
    and once the holder is gone, the permit is this process's at once."""
    import multiprocessing
    import os
    import signal

    from helpers import seeded, sweep_size
    from interrupts import Interrupter
    from netbudget_targets import hold_until_killed
    from safepool import BudgetTimeout

    budget = make(1)
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    holder = ctx.Process(
        target=hold_until_killed, args=("postgres", pg_dsn, budget.name, 1, writer, {})
    )
    holder.start()
    writer.close()
    rng = seeded(f"server-wait-{error.__name__}")
    try:
        assert reader.poll(LONG), "the holder did not start"
        reader.recv()
        with Interrupter() as interrupter:
            for point in range(sweep_size(16)):
                delay = rng.uniform(0, 0.25)
                try:
                    interrupter.arm(delay, error)
                    permit = budget.acquire(timeout=0.3)
                    raise AssertionError(f"point {point}: {permit}, though another holds it")
                except (error, BudgetTimeout):
                    pass
                finally:
                    interrupter.disarm()
                assert make.held(budget) == [], f"point {point} (delay {delay:.3f})"
                wait_until(lambda: budget.stats().in_use == 1, SHORT, f"point {point}: 1 held")
            assert interrupter.fired > 0
        os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join(LONG)
        permit = budget.acquire(timeout=SHORT)
        assert budget.stats().in_use == 1 and make.held(budget) == [permit]
        budget.release(permit)
    finally:
        holder.kill()
        holder.join(LONG)
