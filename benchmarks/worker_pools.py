"""Worker pools: what per-task blame and time limits cost, beside the stdlib and the peers.

    python benchmarks/worker_pools.py [--quick | --smoke] [--output results.json] [--markdown]

Every candidate maps a tiny task (``x -> x``) over 10,000 integers with 2 worker processes
(fork), the pool started and warmed up before the clock; one sample is the wall time of one
``map()`` call. Candidates, each measured in the same rounds, shuffled within each round:

* ``stdlib Pool``: ``multiprocessing.Pool.map`` (the baseline; chunksize: the stdlib default,
  ``ceil(n / (4 * workers))`` = 1,250, which safepool uses too).
* ``stdlib Pool + WorkerSetup``: the same, with ``setup.pool_kwargs()`` (signal-safe workers).
* ``safepool WorkerPool``: ``WorkerSetup().Pool(2).map``: per-task blame, per-worker pipes.
* ``safepool WorkerPool + limits``: the same with ``soft_time_limit=60, time_limit=120`` on
  every task (the limits never fire; what they cost while tasks finish in time).
* ``billiard``, ``pebble``, ``loky``: their ``map`` with the same chunksize, when installed
  (``pip install -e '.[bench]'``).

Ratios against the stdlib Pool are taken within each round. A second measurement,
``blame``: the time from SIGKILL of a worker running a long task to the task's
``WorkerLost`` in the parent (the stdlib never reports it).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Summary, measure_rounds, progress, ratio, section_main, table
from safepool import WorkerLost, WorkerSetup

TASKS = 10_000
WORKERS = 2
CHUNKSIZE = -(-TASKS // (4 * WORKERS))  # the stdlib's default for map(): 1,250
BASELINE = "stdlib Pool"
SAFEPOOL = "safepool WorkerPool"
LIMITED = "safepool WorkerPool + limits"
TARGET_PLAIN = 1.05  # the targets: <= 5 % over a plain Pool.map ...
TARGET_LIMITS = 1.10  # ... and <= 10 % with time limits on
TIMEOUT = 120.0
DASH, TIMES = "\u2013", "\u00d7"


@dataclass(frozen=True)
class Mode:
    repeats: int
    maps: int  # maps per sample (one map takes ~3 ms: too short to time alone on a busy box)
    blame_samples: int


MODES = {
    "smoke": Mode(repeats=1, maps=1, blame_samples=1),
    "quick": Mode(repeats=5, maps=5, blame_samples=3),
    "full": Mode(repeats=15, maps=10, blame_samples=8),
}


def tiny(x: int) -> int:
    return x


def pid_then_sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _stdlib(ctx: Any, setup: WorkerSetup | None) -> tuple[Any, Callable[[], Any]]:
    kwargs = setup.pool_kwargs() if setup is not None else {}
    pool = ctx.Pool(WORKERS, **kwargs)
    return pool, lambda: pool.map(tiny, range(TASKS), CHUNKSIZE)


def _safepool(limits: bool) -> tuple[Any, Callable[[], Any]]:
    options: dict[str, Any] = {"soft_time_limit": 60.0, "time_limit": 120.0} if limits else {}
    pool = WorkerSetup(context="fork").Pool(WORKERS, **options)
    return pool, lambda: pool.map(tiny, range(TASKS))


def _peers() -> tuple[dict[str, tuple[Any, Callable[[], Any]]], dict[str, str]]:
    """The peers that are installed, started; and why the others were skipped."""
    found: dict[str, tuple[Any, Callable[[], Any]]] = {}
    skipped: dict[str, str] = {}
    try:
        import billiard

        bpool = billiard.get_context("fork").Pool(WORKERS)
        found["billiard"] = (bpool, lambda: bpool.map(tiny, range(TASKS), CHUNKSIZE))
    except ImportError as exc:
        skipped["billiard"] = f"not installed ({exc.name})"
    try:
        import pebble

        ppool = pebble.ProcessPool(WORKERS, context=multiprocessing.get_context("fork"))

        def pebble_map() -> list[int]:
            return list(ppool.map(tiny, range(TASKS), chunksize=CHUNKSIZE).result())

        found["pebble"] = (ppool, pebble_map)
    except ImportError as exc:
        skipped["pebble"] = f"not installed ({exc.name})"
    try:
        import loky

        lpool = loky.ProcessPoolExecutor(WORKERS)  # its own start method ("loky")
        found["loky"] = (lpool, lambda: list(lpool.map(tiny, range(TASKS), chunksize=CHUNKSIZE)))
    except ImportError as exc:
        skipped["loky"] = f"not installed ({exc.name})"
    return found, skipped


def _close(name: str, pool: Any) -> None:
    if name == "pebble":
        pool.stop()
        pool.join(TIMEOUT)
    elif name == "loky":
        pool.shutdown(wait=True, kill_workers=True)
    else:
        pool.terminate()
        pool.join()


def measure_maps(mode: Mode) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Seconds per map, per candidate, in shuffled rounds."""
    ctx = multiprocessing.get_context("fork")
    pools: dict[str, tuple[Any, Callable[[], Any]]] = {
        BASELINE: _stdlib(ctx, None),
        "stdlib Pool + WorkerSetup": _stdlib(ctx, WorkerSetup(context="fork")),
        SAFEPOOL: _safepool(False),
        LIMITED: _safepool(True),
    }
    peers, skipped = _peers()
    pools.update(peers)
    try:
        expected = list(range(TASKS))

        def timed(run: Callable[[], Any]) -> Callable[[], float]:
            def once() -> float:
                start = time.perf_counter()
                results = [run() for _ in range(mode.maps)]
                elapsed = (time.perf_counter() - start) / mode.maps
                if any(list(result) != expected for result in results):
                    raise AssertionError("a pool returned a wrong result")
                return elapsed

            return once

        candidates = {name: timed(run) for name, (_, run) in pools.items()}
        progress(f"worker_pools: {len(candidates)} pools, warm-up + {mode.repeats} round(s)")
        values = measure_rounds(candidates, repeats=mode.repeats, seed=11)
    finally:
        for name, (pool, _) in pools.items():
            _close(name, pool)
    return values, skipped


def measure_blame(samples: int) -> list[float]:
    """Seconds from SIGKILL of a worker mid-task to that task's WorkerLost in the parent."""
    out = []
    with WorkerSetup(context="fork").Pool(1) as pool:
        for _ in range(samples):
            pid = pool.pids[0]
            result = pool.apply_async(pid_then_sleep, (TIMEOUT,))
            time.sleep(0.05)  # let it start (the measured span starts at the kill)
            killed = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                result.get(TIMEOUT)
            except WorkerLost:
                out.append(time.perf_counter() - killed)
            else:  # pragma: no cover - would be a bug
                raise AssertionError("the killed task returned")
            pool.apply(tiny, (0,))  # the replacement is up before the next sample
    return out


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    mode_name = "smoke" if smoke else "quick" if quick else "full"
    mode = MODES[mode_name]
    values, skipped = measure_maps(mode)
    blame = measure_blame(mode.blame_samples)
    data: dict[str, Any] = {
        "benchmark": "worker_pools",
        "mode": mode_name,
        "repeats": mode.repeats,
        "maps_per_sample": mode.maps,
        "tasks": TASKS,
        "workers": WORKERS,
        "chunksize": CHUNKSIZE,
        "start_method": "fork",
        "candidates": list(values),
        "ms_per_map": {n: Summary.of([v * 1e3 for v in vs]).as_dict() for n, vs in values.items()},
        "vs_stdlib": {n: ratio(values, n, BASELINE).as_dict() for n in values if n != BASELINE},
        "blame_ms": Summary.of([s * 1e3 for s in blame]).as_dict(),
        "skipped": skipped,
    }
    data["targets"] = check_targets(data)
    return data


def check_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, bound, what in ((SAFEPOOL, TARGET_PLAIN, ""), (LIMITED, TARGET_LIMITS, " + limits")):
        measured = data["vs_stdlib"][name]["median"]
        out.append(
            {
                "target": f"WorkerPool{what}.map of {TASKS:,} tiny tasks <= {bound:.2f}x "
                "stdlib Pool.map",
                "ratio": measured,
                "met": measured <= bound,
            }
        )
    blame = data["blame_ms"]["max"]
    out.append(
        {
            "target": "a killed worker's task fails within 1 s",
            "measured_ms": blame,
            "met": blame <= 1000.0,
        }
    )
    return out


def _fmt_ratio(s: dict[str, Any], md: bool = False) -> str:
    times, dash = (TIMES, DASH) if md else ("x", "-")
    return f"{s['median']:.3f}{times} ({s['min']:.3f}{dash}{s['max']:.3f})"


def _fmt_ms(s: dict[str, Any], md: bool = False) -> str:
    dash = DASH if md else "-"
    return f"{s['median']:.1f} ms ({s['min']:.1f}{dash}{s['max']:.1f})"


def report(data: dict[str, Any]) -> str:
    lines = [
        f"Pool.map of {data['tasks']:,} tiny tasks, {data['workers']} workers (fork), chunksize "
        f"{data['chunksize']}; median (min-max) of {data['repeats']} round(s) of "
        f"{data['maps_per_sample']} map(s) each",
        "",
    ]
    rows = [
        [
            name,
            _fmt_ms(data["ms_per_map"][name]),
            "baseline" if name == BASELINE else _fmt_ratio(data["vs_stdlib"][name]),
        ]
        for name in data["candidates"]
    ]
    lines.append(table(["pool", "per map", "x stdlib Pool"], rows))
    lines += [f"skipped {name}: {why}" for name, why in data["skipped"].items()]
    lines.append(f"\nSIGKILL of a busy worker -> WorkerLost: {_fmt_ms(data['blame_ms'])}")
    for t in data["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t.get("ratio", t.get("measured_ms"))
        lines.append(f"target {t['target']}: {state} (measured {value:,.4g})")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    lines = [f"| pool | per map | {TIMES} stdlib `Pool` |", "| --- | --- | --- |"]
    for name in data["candidates"]:
        shown = "1 (baseline)" if name == BASELINE else _fmt_ratio(data["vs_stdlib"][name], True)
        lines.append(f"| {name} | {_fmt_ms(data['ms_per_map'][name], True)} | {shown} |")
    lines.append("")
    lines.append(
        f"SIGKILL of a busy worker to `WorkerLost` in the parent: "
        f"{_fmt_ms(data['blame_ms'], True)}."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
