"""The benchmarks run end to end in their smallest mode: schema and correctness, never timings.

``benchmarks/run.py --smoke`` runs every section in a subprocess; the checks are on what it
writes: every section ran or says why not, the JSON has the keys and types the README and the
charts rely on, no locked strategy lost an update under any start method or N, and the no-lock
control did lose some (so the lost-update check can fail).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SMOKE_TIMEOUT = 240.0  # seconds; the smoke run takes ~10 s on an idle 2-vCPU machine

SECTIONS = (
    "lock_strategies",
    "pool_inprocess",
    "pool_manager",
    "cache_get",
    "host_budget",
    "net_budget",
    "worker_pools",
    "pool_server",
)
ALWAYS_THERE = ("lock_strategies", "pool_inprocess", "host_budget", "worker_pools", "pool_server")
LOCKED = ("inherited", "inherited (with)", "initializer", "manager")
STRATEGIES = (*LOCKED, "none")
SUMMARY_KEYS = {"median", "min", "max", "samples"}


def run_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """benchmarks/run.py imported under another name, with sys.path restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("bench_run", BENCHMARKS / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_section_module_is_skipped_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = run_module(monkeypatch)
    module, why = run.load("no_such_benchmark_module")
    assert module is None
    assert why == "benchmarks/no_such_benchmark_module.py is not there"


def test_a_section_missing_an_optional_dependency_is_skipped_with_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = run_module(monkeypatch)
    (tmp_path / "needs_a_peer_bench.py").write_text("import not_installed_peer_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module, why = run.load("needs_a_peer_bench")
    assert module is None
    assert "not_installed_peer_xyz" in why


def test_only_rejects_an_unknown_section() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--only", "lock_strategies,nope"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown section(s) ['nope']" in proc.stderr


@pytest.fixture(scope="session")  # survives other modules run between its tests
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--output", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, proc.stdout, json.loads((out / "results.json").read_text())


def smoke_test(fn: Any) -> Any:
    """Slow; on one xdist worker, so the module-scoped smoke run happens once."""
    for mark in (
        pytest.mark.slow,
        pytest.mark.xdist_group("benchmark-smoke"),
        pytest.mark.timeout(SMOKE_TIMEOUT + 30),
    ):
        fn = mark(fn)
    return fn


def summary_ok(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and value.keys() >= SUMMARY_KEYS
        and all(isinstance(value[k], float | int) for k in ("median", "min", "max"))
        and value["min"] <= value["median"] <= value["max"]
    )


@smoke_test
def test_every_section_ran_or_says_why_not(smoke: tuple[Path, str, dict[str, Any]]) -> None:
    _, stdout, results = smoke
    assert results["schema"] == 1
    assert results["mode"] == "smoke"
    assert set(results["sections"]) == set(SECTIONS)
    for name, entry in results["sections"].items():
        assert entry["status"] in ("ok", "skipped"), (name, entry)
        if entry["status"] == "skipped":
            assert entry["reason"], name
            assert f"skipped: {entry['reason']}" in stdout
        else:
            assert isinstance(entry["data"], dict) and entry["seconds"] >= 0
    for name in ALWAYS_THERE:
        assert results["sections"][name]["status"] == "ok", name
    machine = results["machine"]
    assert isinstance(machine["python"], str) and isinstance(machine["cpus"], int)
    assert "safepool" in machine["versions"]
    assert results["targets"], "the targets are recorded"
    for t in results["targets"]:
        assert t["section"] in SECTIONS and isinstance(t["target"], str)
        assert t["met"] in (True, False, None)


@smoke_test
def test_lock_strategies_has_every_cell_with_its_columns(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    data = smoke[2]["sections"]["lock_strategies"]["data"]
    assert data["strategies"] == list(STRATEGIES)
    assert data["procs"] == [1, 2, 4]
    methods = data["start_methods"]
    assert "fork" in methods
    for strategy in STRATEGIES:
        for method in methods:
            cells = data["results"][strategy][method]
            if strategy.startswith("inherited") and method != "fork":
                assert cells["na"].startswith("needs fork"), (strategy, method)
                continue
            assert set(cells) == {"1", "2", "4"}, (strategy, method)
            for procs, c in cells.items():
                where = (strategy, method, procs)
                for key in ("ns_per_op", "per_process_ns_per_op", "ops_per_s", "concurrency"):
                    assert summary_ok(c[key]), (where, key)
                assert c["ns_per_op"]["median"] > 0, where
                assert summary_ok(c["vs_inherited"]), where
                assert c["total_ops"] == c["ops_per_process"] * int(procs) > 0, where
                assert len(c["lost_updates"]) == data["repeats"], where
                assert c["locked"] is (strategy in LOCKED), where
    for method, s in data["startup"].items():
        assert s["first"] > 0 and summary_ok(s["later"]) and s["manager"] > 0, method


@smoke_test
def test_no_locked_strategy_loses_an_update_and_the_control_does(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    data = smoke[2]["sections"]["lock_strategies"]["data"]
    control_losses = 0
    for strategy in STRATEGIES:
        for method, cells in data["results"][strategy].items():
            if "na" in cells:
                continue
            for procs, c in cells.items():
                lost = [*c["lost_updates"], c["lost_updates_warmup"]]
                where = (strategy, method, procs)
                bounds = [c["total_ops"]] * len(c["lost_updates"]) + [c["total_ops_warmup"]]
                assert all(
                    isinstance(n, int) and 0 <= n <= bound
                    for n, bound in zip(lost, bounds, strict=True)
                ), where
                if strategy in LOCKED:
                    assert lost == [0] * len(lost), where
                elif procs == "1":  # one process cannot race with itself
                    assert lost == [0] * len(lost), where
                    assert c["expect_losses"] is False
                else:
                    assert c["expect_losses"] is True
                    control_losses += sum(lost)
    # The control (no lock, >= 2 processes, 3 start methods x 2 N, >= 30 ms each) always loses
    # some updates: without this, a counter that was not really shared would pass the check above.
    assert control_losses > 0


@smoke_test
def test_pool_inprocess_section_and_the_report_files(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    out, stdout, results = smoke
    data = results["sections"]["pool_inprocess"]["data"]
    for threads in ("1", "8"):
        measured = data["threads"][threads]["ns_per_op"]
        assert {"floor", "safepool"} <= measured.keys()
        assert all(summary_ok(s) for s in measured.values())
    for name in data["skipped"]:
        assert f"skipped {name}:" in stdout
    markdown = (out / "results.md").read_text()
    assert "| strategy | start |" in markdown and "| pool |" in markdown
    charts = results["charts"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install" in charts["skipped"]
        assert f"charts skipped: {charts['skipped']}" in stdout
        return
    assert charts["failed"] == {}
    ran = [n for n, e in results["sections"].items() if e["status"] == "ok"]
    assert set(charts["written"]) == set(ran)
    for file in charts["written"].values():
        assert (out / file).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), file


@smoke_test
def test_host_budget_section_has_every_candidate_and_loses_no_permit(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    data = smoke[2]["sections"]["host_budget"]["data"]
    single = data["single"]["us_per_op"]
    assert {
        "HostBudget",
        "multiprocessing.BoundedSemaphore",
        "SysV semaphore (SEM_UNDO)",
        "flock",
        "PoolManager lease+release (round trips)",
        "PoolManager lease+release (fast path)",
    } <= single.keys()
    if importlib.util.find_spec("portalocker") is not None:
        assert "portalocker.BoundedSemaphore" in single
    assert all(summary_ok(s) for s in single.values())
    assert summary_ok(data["speedup_vs_manager"])
    assert summary_ok(data["speedup_vs_fast_path"])
    contended = data["contended"]
    assert (contended["processes"], contended["limit"]) == (4, 2)
    assert set(contended["ops_per_second"]) == {
        "HostBudget",
        "multiprocessing.BoundedSemaphore",
        "SysV semaphore (SEM_UNDO)",
    }
    assert all(summary_ok(s) for s in contended["ops_per_second"].values())
    assert data["leaked_permits"] == 0
    assert [t["met"] in (True, False) for t in data["targets"]] == [True] * 3


@smoke_test
def test_net_budget_section_has_its_columns_and_leaves_no_permit_held(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    entry = smoke[2]["sections"]["net_budget"]
    if entry["status"] == "skipped":  # neither PostgreSQL nor Redis here: it says why
        assert "reachable" in entry["reason"]
        return
    data = entry["data"]
    measured = data["us_per_op"]
    assert all(summary_ok(s) and s["median"] > 0 for s in measured.values())
    for engine, floor, ours in (
        ("postgres", "PostgreSQL SELECT 1", "PostgresBudget"),
        ("redis", "Redis PING", "RedisBudget"),
    ):
        if engine in data["skipped"]:
            assert ours not in measured
            continue
        assert {floor, ours} <= measured.keys()
        assert summary_ok(data["round_trips"][ours])
        cells = data["ops_per_second"][engine]
        assert set(cells) == {"1", "2"} and all(summary_ok(c) for c in cells.values())
        assert set(data["ops_per_second"][f"{engine} floor"]) == {"1", "2"}
    assert data["permits_left_held"] and set(data["permits_left_held"].values()) == {0}
    assert all(t["met"] in (True, False, None) for t in data["targets"])


@smoke_test
def test_worker_pools_section_has_every_pool_and_the_blame_latency(
    smoke: tuple[Path, str, dict[str, Any]],
) -> None:
    data = smoke[2]["sections"]["worker_pools"]["data"]
    names = set(data["candidates"])
    assert {"stdlib Pool", "safepool WorkerPool", "safepool WorkerPool + limits"} <= names
    assert names | set(data["skipped"]) >= {"billiard", "pebble", "loky"}
    assert all(summary_ok(data["ms_per_map"][name]) for name in names)
    assert set(data["vs_stdlib"]) == names - {"stdlib Pool"}
    assert all(summary_ok(s) for s in data["vs_stdlib"].values())
    assert summary_ok(data["blame_ms"]) and data["blame_ms"]["max"] < 1000.0
    assert [t["met"] in (True, False) for t in data["targets"]] == [True] * 3
