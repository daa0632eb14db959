"""PostgresBudget when PostgreSQL restarts, stops or stops answering: on a PRIVATE cluster
(initdb on a free port), never the shared one. Clear errors, no hang, nothing counted twice,
and recovery when the server is back."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from helpers import LONG, SHORT, ThreadResult, seeded, sweep_size, wait_until
from interrupts import Interrupter
from netbudget_servers import PrivateCluster, Proxy
from safepool import BudgetUnavailable, Permit, PostgresBudget
from safepool._pgsession import KEY_BASE

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.xdist_group("private-pg")]


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    try:
        made = PrivateCluster()
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"cannot make a private PostgreSQL cluster: {exc}")
    try:
        yield made
    finally:
        made.close()


def freed(dsn: str, budget: PostgresBudget) -> bool:
    try:
        return in_use(dsn, budget) == 0
    except psycopg.OperationalError:  # a connection refused while the server is busy: again
        return False


def in_use(dsn: str, budget: PostgresBudget) -> int:
    """The server's own count of the budget's permits (pg_locks), from a connection of ours."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 2 "
            "AND classid = %s::int4::oid AND granted",
            (KEY_BASE + budget._id,),
        ).fetchone()
    return int(row[0]) if row else 0


class Sampler:
    """Counts the budget's locks on the server in a loop; remembers the most seen."""

    def __init__(self, dsn: str, budget: PostgresBudget) -> None:
        self.most = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = ThreadResult(lambda: self.run(dsn, budget), "sampler")

    def run(self, dsn: str, budget: PostgresBudget) -> None:
        while not self.stop.is_set():
            try:
                self.most = max(self.most, in_use(dsn, budget))
                self.samples += 1
            except psycopg.Error:
                self.stop.wait(0.05)  # the server is restarting

    def close(self) -> int:
        self.stop.set()
        self.thread.join(LONG)
        return self.most


def test_a_restart_loses_permits_clearly_then_the_budget_recovers(cluster: PrivateCluster) -> None:
    lost: list[Permit] = []
    name = f"restart-{uuid.uuid4().hex[:8]}"
    budget = PostgresBudget(cluster.dsn, name, 3, on_lost=lost.append, connect_timeout=2)
    held = [budget.acquire(), budget.acquire()]
    sampler = Sampler(cluster.dsn, budget)
    cluster.stop()
    wait_until(lambda: not any(p.valid for p in held), SHORT, "holders see their loss")
    assert len(lost) == 2 and all("session ended" in (p.lost_reason or "") for p in lost)
    start = time.monotonic()
    with pytest.raises(BudgetUnavailable, match="cannot reach PostgreSQL"):
        budget.acquire(timeout=LONG)  # no hang: a clear error within the connect timeout
    assert time.monotonic() - start < 10
    cluster.start()
    permits = [budget.acquire(timeout=SHORT) for _ in range(3)]  # the whole limit, again
    assert min(p.token for p in permits) > max(p.token for p in held)  # tokens are durable
    cluster.restart()
    wait_until(lambda: not any(p.valid for p in permits), SHORT, "a restart is seen too")
    again = [budget.acquire(timeout=SHORT) for _ in range(3)]
    assert sampler.close() <= 3 and sampler.samples > 0
    for p in [*held, *permits, *again]:
        budget.release(p)
    assert budget.stats().in_use == 0
    budget.close()


def test_a_silent_server_cannot_hang_acquire(cluster: PrivateCluster) -> None:
    """A proxy that stops forwarding (sockets stay open, nothing answers): the statement is
    abandoned after socket_timeout, the session closed, its permits reported lost."""
    proxy = Proxy(cluster.port)
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=postgres user=postgres"
    lost: list[Permit] = []
    name = f"silent-{uuid.uuid4().hex[:8]}"
    budget = PostgresBudget(dsn, name, 2, on_lost=lost.append, socket_timeout=1.0)
    held = budget.acquire()
    try:
        proxy.freeze()
        start = time.monotonic()
        with pytest.raises(BudgetUnavailable):
            budget.acquire(timeout=LONG)
        assert time.monotonic() - start < 1.0 + 3.0
        assert not held.valid and lost == [held]
        proxy.cut()  # the partition heals: PostgreSQL sees the old session end
        proxy.thaw()
        wait_until(lambda: freed(cluster.dsn, budget), SHORT, "the server freed it")
        permits = [budget.acquire(timeout=SHORT) for _ in range(2)]
        assert in_use(cluster.dsn, budget) == 2
        for p in permits:
            budget.release(p)
    finally:
        proxy.thaw()
        budget.close()
        proxy.close()


def test_a_release_waits_for_no_reply_and_the_next_statement_reads_it(
    cluster: PrivateCluster,
) -> None:
    """release() sends the unlock and returns: with the server silent (a frozen proxy) it
    still returns at once, and the permit comes back when the server hears it. The session's
    next statement reads the reply first, so this process always sees its own releases."""
    proxy = Proxy(cluster.port)
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=postgres user=postgres"
    budget = PostgresBudget(dsn, f"unread-{uuid.uuid4().hex[:8]}", 1, socket_timeout=LONG)
    try:
        held = budget.acquire()
        proxy.freeze()
        start = time.monotonic()
        budget.release(held)
        assert time.monotonic() - start < LONG / 4  # a wait for the reply would last LONG
        assert not held.valid and in_use(cluster.dsn, budget) == 1  # not heard yet
        proxy.thaw()
        wait_until(lambda: freed(cluster.dsn, budget), SHORT, "the server ran the unlock")
        for _ in range(50):
            permit = budget.acquire(timeout=0)
            budget.release(permit)
            assert budget.stats().in_use == 0  # read after the reply: never stale
    finally:
        proxy.thaw()
        budget.close()
        proxy.close()


class Interrupted(Exception):
    """Raised by a signal handler while a statement waits for a reply."""


@pytest.mark.parametrize("error", [KeyboardInterrupt, Interrupted])
def test_a_wait_for_a_release_reply_interrupted_keeps_the_session(
    cluster: PrivateCluster, error: type[BaseException]
) -> None:
    """A release's reply is read by the session's next statement. A signal handler raising at
    a seeded point while that statement waits for it (the server silent behind a frozen proxy):
    the call ends with the exception, and the session stays, with the permit it holds (the
    only statement in flight is the release); once the server answers, the counts add up."""
    proxy = Proxy(cluster.port)
    dsn = f"host=127.0.0.1 port={proxy.port} dbname=postgres user=postgres"
    lost: list[Permit] = []
    name = f"reply-{uuid.uuid4().hex[:8]}"
    budget = PostgresBudget(dsn, name, 3, on_lost=lost.append, socket_timeout=LONG)
    rng = seeded(f"release-reply-{error.__name__}")
    try:
        kept = budget.acquire()
        with Interrupter() as interrupter:
            for point in range(sweep_size(8)):
                permit = budget.acquire(timeout=SHORT)
                proxy.freeze()
                budget.release(permit)  # sent; its reply is due
                delay = rng.uniform(0, 0.05)
                try:
                    interrupter.arm(delay, error)
                    budget.stats()  # reads the reply first: waits while the proxy is frozen
                    raise AssertionError(f"point {point}: an answer through a frozen proxy")
                except error:
                    pass
                finally:
                    interrupter.disarm()
                    proxy.thaw()
                assert kept.valid and not lost, f"point {point} (delay {delay:.3f})"
                assert budget.stats().in_use == 1, f"point {point} (delay {delay:.3f})"
            assert interrupter.fired > 0
        budget.release(kept)
        assert budget.stats().in_use == 0 and in_use(cluster.dsn, budget) == 0
    finally:
        proxy.thaw()
        budget.close()
        proxy.close()


def test_a_stopped_server_fails_construction_clearly(cluster: PrivateCluster) -> None:
    proxy = Proxy(1)  # forwards to a closed port: connections are refused at once
    try:
        with pytest.raises(BudgetUnavailable, match="cannot reach PostgreSQL"):
            PostgresBudget(f"host=127.0.0.1 port={proxy.port} dbname=x user=y", "n", 1,
                           connect_timeout=2)  # fmt: skip
    finally:
        proxy.close()
