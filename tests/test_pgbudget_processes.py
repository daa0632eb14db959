"""PostgresBudget across many processes: a ledger never sees more holders than the limit, and
a SIGKILLed holder's permits come back within a second."""

from __future__ import annotations

import pytest

from helpers import FORK_WARNING
from netbudget_stress import run_kills, run_stress

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.filterwarnings(FORK_WARNING)]


def test_twelve_processes_never_exceed_the_limit(pg_dsn: str) -> None:
    run_stress("postgres", pg_dsn, {})


def test_a_killed_holders_permits_come_back_within_a_second(pg_dsn: str) -> None:
    times = run_kills("postgres", pg_dsn, {}, bound=1.0)
    print(f"PostgresBudget: permits back after SIGKILL in {sorted(times)} s")
