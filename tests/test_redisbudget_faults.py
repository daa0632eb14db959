"""RedisBudget when Redis restarts (losing everything) or stops answering: on a PRIVATE
redis-server (free port, no persistence), never the shared one."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from helpers import LONG, SHORT, ThreadResult, wait_until
from netbudget_servers import PrivateRedis, Proxy
from safepool import BudgetUnavailable, Permit, RedisBudget

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.xdist_group("private-redis")]

TTL = 0.6


@pytest.fixture(scope="module")
def server() -> Iterator[PrivateRedis]:
    try:
        made = PrivateRedis()
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"cannot start a private redis-server: {exc}")
    try:
        yield made
    finally:
        made.close()


class Sampler:
    """Counts the budget's live entries in Redis in a loop; remembers the most seen."""

    def __init__(self, url: str, budget: RedisBudget) -> None:
        self.most = 0
        self.stop = threading.Event()
        client = redis.Redis.from_url(url, socket_timeout=1)
        self.thread = ThreadResult(lambda: self.run(client, budget._holders_key), "sampler")

    def run(self, client: redis.Redis, key: str) -> None:
        while not self.stop.is_set():
            try:
                now_ms = int(client.time()[0] * 1000)
                self.most = max(self.most, client.zcount(key, now_ms, "+inf"))
            except redis.RedisError:
                self.stop.wait(0.05)

    def close(self) -> int:
        self.stop.set()
        self.thread.join(LONG)
        return self.most


def test_a_restart_that_loses_everything_never_counts_a_permit_twice(
    server: PrivateRedis,
) -> None:
    lost: list[Permit] = []
    name = f"restart-{uuid.uuid4().hex[:8]}"
    budget = RedisBudget(server.url, name, 2, ttl=TTL, on_lost=lost.append, socket_timeout=1)
    held = [budget.acquire(), budget.acquire()]
    sampler = Sampler(server.url, budget)
    server.stop()
    with pytest.raises(BudgetUnavailable, match="acquire failed at Redis"):
        budget.acquire(timeout=LONG)  # a clear error, at once
    server.start()  # empty: the budget's keys are gone
    start = time.monotonic()
    fresh = budget.acquire(timeout=LONG)  # refused for one ttl, then granted
    waited = time.monotonic() - start
    assert waited >= TTL * 0.9, f"granted after {waited:.3f}s: old holders may still trust theirs"
    assert not any(p.valid for p in held), "an old holder still trusts a forgotten permit"
    wait_until(lambda: len(lost) == 2, SHORT, "the heartbeat reported both losses")
    assert fresh.token > max(p.token for p in held)  # tokens seeded from the server clock
    second = budget.acquire(timeout=SHORT)
    assert sampler.close() <= 2
    for p in [*held, fresh, second]:
        budget.release(p)
    assert budget.stats().in_use == 0
    budget.close()


def test_a_silent_redis_cannot_hang_acquire_and_holders_learn_of_it(
    server: PrivateRedis,
) -> None:
    proxy = Proxy(server.port)
    url = f"redis://127.0.0.1:{proxy.port}/0"
    lost: list[Permit] = []
    name = f"silent-{uuid.uuid4().hex[:8]}"
    budget = RedisBudget(url, name, 2, ttl=TTL, on_lost=lost.append, socket_timeout=0.5)
    held = budget.acquire()
    try:
        proxy.freeze()
        start = time.monotonic()
        with pytest.raises(BudgetUnavailable, match="Timeout"):
            budget.acquire(timeout=LONG)
        assert time.monotonic() - start < 0.5 + 1.0
        wait_until(lambda: not held.valid, SHORT, "the holder stops trusting its permit")
        wait_until(lambda: lost == [held], SHORT, "on_lost ran")
        assert "not renewed within ttl" in (held.lost_reason or "")
        proxy.thaw()
        proxy.cut()
        permits = [budget.acquire(timeout=SHORT) for _ in range(2)]  # recovered
        assert budget.stats().in_use == 2
        for p in permits:
            budget.release(p)
    finally:
        proxy.thaw()
        proxy.close()
        budget.close()
