"""RedisBudget across many processes: a ledger never sees more holders than the limit, and a
SIGKILLed holder's permits come back within ttl + 1 s."""

from __future__ import annotations

import pytest

from helpers import FORK_WARNING
from netbudget_stress import run_kills, run_stress

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.filterwarnings(FORK_WARNING)]

TTL = 0.5


def test_twelve_processes_never_exceed_the_limit(redis_url: str) -> None:
    run_stress("redis", redis_url, {"ttl": 2.0})


def test_a_killed_holders_permits_come_back_within_ttl(redis_url: str) -> None:
    times = run_kills("redis", redis_url, {"ttl": TTL}, bound=TTL + 1.0)
    print(f"RedisBudget (ttl {TTL}s): permits back after SIGKILL in {sorted(times)} s")
