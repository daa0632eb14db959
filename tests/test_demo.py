"""The README's main job, ``python -m safepool demo``, runs and tells the truth."""

from __future__ import annotations

import pytest

from helpers import START_METHODS, run_cli


@pytest.mark.parametrize("start_method", START_METHODS)
def test_demo_runs_and_the_shared_pool_never_duplicates(start_method: str) -> None:
    result = run_cli(
        "demo",
        "--processes",
        "3",
        "--leases",
        "5",
        "--threads",
        "4",
        "--rows",
        "10",
        "--start-method",
        start_method,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1. Threads in one process share a SafeConnectionPool" in out
    assert "a connection held by two threads at once: 0 times" in out
    assert "2. The trap: a plain pool object" in out
    assert "3. The fix: SafeConnectionPool hosted in a PoolManager" in out
    assert "rows written: 15; duplicate leases: 0" in out
    assert "leased now=0" in out


def test_demo_rejects_bad_arguments() -> None:
    result = run_cli("demo", "--processes", "0")
    assert result.returncode == 2
    assert "must be >= 1, got 0" in result.stderr
