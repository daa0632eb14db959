"""Locked increments of a shared counter across processes: which lock, under which start method.

    python benchmarks/lock_strategies.py [--quick | --smoke] [--output results.json] [--markdown]

Every worker process adds 1 to one shared counter (a raw ``RawValue('q')`` in shared memory, so
``counter.value += 1`` is an unprotected read-modify-write), ``k`` times, holding a lock around
each increment. The strategies differ only in how the worker got its lock:

* ``inherited``: a ``multiprocessing.Lock`` held in a module global, created in the parent before
  the pool's workers are forked; the children inherit it. Needs the fork start method: under
  spawn and forkserver the child re-imports the module and gets no lock (or a new one of its
  own), so this is reported as "n/a: needs fork".
* ``inherited (with)``: the same lock, used as ``with lock:`` the way most code is written. On
  CPython 3.11 ``Lock.__enter__``/``__exit__`` are Python-level wrappers, so this costs more per
  op than the ``acquire()``/``release()`` calls every other locked row uses.
* ``initializer``: a lock passed as ``Pool(initializer=..., initargs=(lock,))``, which
  multiprocessing hands over while it starts the worker (fork, spawn and forkserver).
* ``manager``: a ``Manager().Lock()`` proxy passed in the task's arguments; every ``acquire()``
  and ``release()`` is a round trip to the manager process.
* ``none``: the control, no lock at all. It loses updates once two processes interleave (N >= 2);
  with one process it cannot lose any.

Timing is taken inside the workers, from a start barrier to the end of their loop, so process
start-up is excluded: ns per op = wall time from the first worker starting its loop to the last
one ending, divided by all workers' ops (see DEFINITIONS). Start-up is measured on its own
(``Process.start()`` until the child has set an Event). Each configuration is warmed up (the
warm-up also sizes ``k`` so that a run takes about the same time in every strategy), then
measured in shuffled rounds; ratios against the inherited lock (fork, same N) are taken within
each round.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Summary, measure_rounds, progress, ratio, section_main, table

STRATEGIES = ("inherited", "inherited (with)", "initializer", "manager", "none")
FORK_ONLY = ("inherited", "inherited (with)")
LOCKED = ("inherited", "inherited (with)", "initializer", "manager")
START_METHODS = tuple(
    m for m in ("fork", "spawn", "forkserver") if m in multiprocessing.get_all_start_methods()
)
BASELINE = ("inherited", "fork")
CONTROL_MIN_SECONDS = 0.03
TIMEOUT = 120.0  # seconds: a barrier or a round that takes longer than this is a hang

# Rough ns per op, used only to size the warm-up run (which then sizes the measured runs).
NOMINAL_NS = {
    "inherited": 150.0,
    "inherited (with)": 400.0,
    "initializer": 150.0,
    "manager": 110_000.0,
    "none": 80.0,
}

# Targets are bounds: a measurement on the good side of one is met, however far.
TARGET_INHERITED_NS = 180.0  # ns per op, an upper bound
TARGET_INITIALIZER_RATIO = 1.3  # x the inherited lock, an upper bound
TARGET_MANAGER_RATIO = 100.0  # x the inherited lock, a lower bound

DASH, TIMES = "\u2013", "\u00d7"  # for Markdown

DEFINITIONS = {
    "ns_per_op": "wall time from the first worker starting its loop (after the start barrier) "
    "to the last one finishing, / total ops of all workers: the cost of one increment as the "
    "whole system sees it (1 / throughput)",
    "per_process_ns_per_op": "a worker's own loop time / its own ops, mean over the workers: "
    "what one process waits per increment",
    "ops_per_s": "total ops / that wall time",
    "concurrency": "sum of the workers' loop times / that wall time: how many workers were "
    "running at once on average (1 = one after the other)",
    "vs_inherited": "ns_per_op / ns_per_op of the inherited lock (fork, same N), per round",
    "lost_updates": "expected total - final counter, per measured round",
    "startup": "Process.start() until the child has signalled an Event, seconds",
}


@dataclass(frozen=True)
class Mode:
    repeats: int
    seconds: float  # target duration of one measured run
    startups: int  # process starts timed per start method (the first is reported on its own)
    procs: tuple[int, ...] = (1, 2, 4)


MODES = {
    "smoke": Mode(repeats=1, seconds=0.01, startups=2),
    "quick": Mode(repeats=3, seconds=0.04, startups=4),
    "full": Mode(repeats=7, seconds=0.25, startups=8),
}

# ---------------------------------------------------------------------------------------------
# Worker side. Module-level so spawn and forkserver children can import them.

_INHERITED: Any = None  # the "inherited" lock: set in the parent before fork pools start
_PASSED: Any = None  # the lock a worker got from its pool initializer
_COUNTER: Any = None
_BARRIER: Any = None


def _init_worker(counter: Any, barrier: Any, lock: Any) -> None:
    global _COUNTER, _BARRIER, _PASSED
    _COUNTER, _BARRIER, _PASSED = counter, barrier, lock


def _loop_locked(lock: Any, counter: Any, k: int) -> tuple[float, float]:
    acquire = lock.acquire
    release = lock.release
    start = time.perf_counter()
    for _ in range(k):
        acquire()
        counter.value += 1
        release()
    return start, time.perf_counter()


def _loop_with(lock: Any, counter: Any, k: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(k):
        with lock:
            counter.value += 1
    return start, time.perf_counter()


def _loop_none(lock: Any, counter: Any, k: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(k):
        counter.value += 1
    return start, time.perf_counter()


def _task(job: tuple[str, int, Any]) -> tuple[float, float]:
    """One worker's share of a run: wait for the others, then ``k`` increments.

    Returns the loop's start and end on ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux:
    one clock for all processes).
    """
    strategy, k, proxy = job
    if strategy in FORK_ONLY:
        lock, loop = _INHERITED, (_loop_with if strategy == "inherited (with)" else _loop_locked)
        if lock is None:
            raise RuntimeError("no inherited lock in this worker: it was not forked from run()")
    elif strategy == "initializer":
        lock, loop = _PASSED, _loop_locked
    elif strategy == "manager":
        lock, loop = proxy, _loop_locked
    else:
        lock, loop = None, _loop_none
    _BARRIER.wait(TIMEOUT)
    return loop(lock, _COUNTER, k)


def _ready(_: object) -> None:
    _BARRIER.wait(TIMEOUT)


def _signal(event: Any) -> None:
    event.set()


# ---------------------------------------------------------------------------------------------
# Parent side.


@dataclass
class Config:
    """One strategy under one start method with ``procs`` workers, kept alive across rounds."""

    strategy: str
    method: str
    procs: int
    seconds: float
    pool: Any
    counter: Any
    proxy: Any = None
    k: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.strategy}/{self.method}"

    def __call__(self) -> float:
        """One run; returns ns per op (and keeps the details in ``runs``)."""
        if not self.k:  # the warm-up: size it from the nominal cost
            self.k = max(10, int(self.seconds * 0.5e9 / NOMINAL_NS[self.strategy] / self.procs))
        self.counter.value = 0
        jobs = [(self.strategy, self.k, self.proxy)] * self.procs
        spans = self.pool.map_async(_task, jobs, chunksize=1).get(TIMEOUT)
        total = self.k * self.procs
        wall = max(end for _, end in spans) - min(start for start, _ in spans)
        busy = sum(end - start for start, end in spans)
        ns_per_op = wall / total * 1e9
        self.runs.append(
            {
                "k": self.k,
                "ns_per_op": ns_per_op,
                "per_process_ns_per_op": busy / self.procs / self.k * 1e9,
                "ops_per_s": total / wall,
                "concurrency": busy / wall,
                "lost_updates": total - self.counter.value,
            }
        )
        if len(self.runs) == 1:  # size the measured runs from the warm-up
            self.k = max(10, int(self.seconds / (ns_per_op * 1e-9) / self.procs))
        return ns_per_op


def start_pool(
    ctx: BaseContext, strategy: str, procs: int, counter: Any, manager: Any
) -> tuple[Any, Any]:
    """A pool of ``procs`` workers, all started, for one strategy; and the manager proxy."""
    global _INHERITED
    barrier = ctx.Barrier(procs)
    lock = proxy = None
    if strategy in FORK_ONLY and _INHERITED is None:
        _INHERITED = ctx.Lock()  # the module global the forked workers inherit
    elif strategy == "initializer":
        lock = ctx.Lock()
    elif strategy == "manager":
        proxy = manager.Lock()
    pool = ctx.Pool(procs, initializer=_init_worker, initargs=(counter, barrier, lock))
    try:
        pool.map_async(_ready, range(procs), chunksize=1).get(TIMEOUT)  # every worker is up
    except BaseException:
        pool.terminate()
        raise
    return pool, proxy


def startup_seconds(ctx: BaseContext, count: int) -> list[float]:
    """``count`` times: ``Process.start()`` until the child has set an Event."""
    out = []
    for _ in range(count):
        event = ctx.Event()
        proc = ctx.Process(target=_signal, args=(event,))
        start = time.perf_counter()
        proc.start()
        if not event.wait(TIMEOUT):
            proc.terminate()
            raise RuntimeError(f"a {ctx.get_start_method()} child did not start in {TIMEOUT}s")
        out.append(time.perf_counter() - start)
        proc.join(TIMEOUT)
    return out


def measure_group(procs: int, mode: Mode, managers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """All strategies x start methods at one N, in shuffled rounds. Results by strategy/method."""
    configs: dict[str, Config] = {}
    finished = False
    try:
        for strategy in STRATEGIES:
            for method in START_METHODS:
                if strategy in FORK_ONLY and method != "fork":
                    continue
                ctx = multiprocessing.get_context(method)
                counter = ctx.RawValue("q", 0)
                pool, proxy = start_pool(ctx, strategy, procs, counter, managers.get(method))
                seconds = mode.seconds
                if strategy == "none":  # long enough for the workers to overlap, even in smoke
                    seconds = max(seconds, CONTROL_MIN_SECONDS)
                config = Config(strategy, method, procs, seconds, pool, counter, proxy)
                configs[config.name] = config
        progress(
            f"lock_strategies: N={procs}: {len(configs)} configurations, "
            f"warm-up + {mode.repeats} round(s)"
        )
        values = measure_rounds(dict(configs), repeats=mode.repeats, seed=procs)
        finished = True
    finally:
        for config in configs.values():
            if finished:
                config.pool.close()
            else:  # workers may be stuck at the barrier
                config.pool.terminate()
        for config in configs.values():
            config.pool.join()
    baseline = "/".join(BASELINE)
    out: dict[str, dict[str, Any]] = {}
    for name, config in configs.items():
        warmup, runs = config.runs[0], config.runs[1:]
        cell: dict[str, Any] = {
            "ops_per_process": config.k,
            "total_ops": config.k * procs,
            "ns_per_op": Summary.of(values[name]).as_dict(),
            "per_process_ns_per_op": Summary.of(
                [r["per_process_ns_per_op"] for r in runs]
            ).as_dict(),
            "ops_per_s": Summary.of([r["ops_per_s"] for r in runs]).as_dict(),
            "concurrency": Summary.of([r["concurrency"] for r in runs]).as_dict(),
            "lost_updates": [r["lost_updates"] for r in runs],
            "lost_updates_warmup": warmup["lost_updates"],
            "total_ops_warmup": warmup["k"] * procs,  # the warm-up's own size
            "locked": config.strategy in LOCKED,
            "expect_losses": config.strategy == "none" and procs >= 2,
        }
        if baseline in values:
            cell["vs_inherited"] = ratio(values, name, baseline).as_dict()
        out[name] = cell
    return out


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    global _INHERITED
    mode_name = "smoke" if smoke else "quick" if quick else "full"
    mode = MODES[mode_name]
    skipped = {
        m: "start method not available on this platform"
        for m in ("fork", "spawn", "forkserver")
        if m not in START_METHODS
    }
    progress(f"lock_strategies: start-up cost, {mode.startups} starts per start method")
    startup: dict[str, Any] = {}
    for method in START_METHODS:
        samples = startup_seconds(multiprocessing.get_context(method), mode.startups)
        startup[method] = {"first": samples[0], "later": Summary.of(samples[1:]).as_dict()}
    managers: dict[str, Any] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in STRATEGIES}
    try:
        for method in START_METHODS:
            start = time.perf_counter()
            managers[method] = multiprocessing.get_context(method).Manager()
            startup[method]["manager"] = time.perf_counter() - start
        for procs in mode.procs:
            for name, cell in measure_group(procs, mode, managers).items():
                strategy, method = name.split("/")
                results[strategy].setdefault(method, {})[str(procs)] = cell
    finally:
        for manager in managers.values():
            manager.shutdown()
        _INHERITED = None
    for strategy in FORK_ONLY:
        for method in START_METHODS:
            if method != "fork":
                results[strategy][method] = {
                    "na": "needs fork: under spawn/forkserver a module-level lock is not "
                    "inherited (each child re-imports the module)"
                }
    data = {
        "benchmark": "lock_strategies",
        "mode": mode_name,
        "repeats": mode.repeats,
        "seconds_per_run": mode.seconds,
        "procs": list(mode.procs),
        "start_methods": list(START_METHODS),
        "strategies": list(STRATEGIES),
        "locked_strategies": list(LOCKED),
        "definitions": DEFINITIONS,
        "startup": startup,
        "results": results,
        "skipped": skipped,
    }
    data["targets"] = check_targets(data)
    return data


# ---------------------------------------------------------------------------------------------
# Targets and reports.


def cell(data: dict[str, Any], strategy: str, method: str, procs: int) -> dict[str, Any] | None:
    found = data["results"].get(strategy, {}).get(method, {}).get(str(procs))
    return found if isinstance(found, dict) else None


def _bound(target: str, measured: float | None, limit: float, *, at_most: bool) -> dict[str, Any]:
    """A target is a bound: met when the measurement is on its side of ``limit`` (better is met)."""
    if measured is None:
        return {"target": target, "limit": limit, "met": None}
    met = measured <= limit if at_most else measured >= limit
    return {"target": target, "limit": limit, "measured": measured, "met": met}


def check_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    def median(strategy: str, method: str, key: str) -> float | None:
        found = cell(data, strategy, method, 1)
        return None if found is None or key not in found else float(found[key]["median"])

    out = [
        _bound(
            f"inherited lock (fork) @1p <= {TARGET_INHERITED_NS:.0f} ns/op",
            median("inherited", "fork", "ns_per_op"),
            TARGET_INHERITED_NS,
            at_most=True,
        )
    ]
    out += [
        _bound(
            f"initializer lock under {method} @1p <= {TARGET_INITIALIZER_RATIO}x inherited",
            median("initializer", method, "vs_inherited"),
            TARGET_INITIALIZER_RATIO,
            at_most=True,
        )
        for method in START_METHODS
    ]
    out.append(
        _bound(
            f"Manager().Lock() (fork) @1p >= {TARGET_MANAGER_RATIO:.0f}x the inherited lock "
            "(why the initializer, not a manager, is the default)",
            median("manager", "fork", "vs_inherited"),
            TARGET_MANAGER_RATIO,
            at_most=False,
        )
    )
    locked_lost = [
        n
        for strategy in LOCKED
        for by_procs in data["results"].get(strategy, {}).values()
        for c in by_procs.values()
        if isinstance(c, dict)
        for n in [*c["lost_updates"], c["lost_updates_warmup"]]
    ]
    out.append(
        {
            "target": "no lost updates with any lock, start method or N",
            "measured": max(locked_lost, default=0),
            "met": (max(locked_lost) == 0) if locked_lost else None,
        }
    )
    control = [
        n
        for by_procs in data["results"].get("none", {}).values()
        for c in by_procs.values()
        if isinstance(c, dict) and c["expect_losses"]
        for n in c["lost_updates"]
    ]
    out.append(
        {
            "target": "the no-lock control loses updates at N >= 2",
            "measured": max(control, default=0),
            "met": (max(control) > 0) if control else None,
        }
    )
    return out


def _num(x: float, big: bool) -> str:
    return f"{x:.0f}" if big else f"{x:.3g}"


def fmt_ns(
    ns: float, micro: str = "us", low: float | None = None, high: float | None = None
) -> str:
    """``ns`` in a readable unit; with ``low`` and ``high``: "median unit (low-high)"."""
    scale, unit = next(
        (sc, u) for sc, u in ((1e6, "ms"), (1e3, micro), (1.0, "ns")) if ns >= sc or u == "ns"
    )
    big = ns / scale >= 100
    text = f"{_num(ns / scale, big)} {unit}"
    if low is None or high is None:
        return text
    dash = DASH if micro != "us" else "-"
    return f"{text} ({_num(low / scale, big)}{dash}{_num(high / scale, big)})"


def fmt_summary(s: dict[str, Any], micro: str = "us") -> str:
    """A summary of nanoseconds: median (min-max), in one unit picked from the median."""
    return fmt_ns(s["median"], micro, s["min"], s["max"])


def fmt_ratio(s: dict[str, Any] | None, md: bool = False) -> str:
    if s is None:
        return "-"
    nums = [_num(s[k], s[k] >= 100) for k in ("median", "min", "max")]
    times, dash = (TIMES, DASH) if md else ("x", "-")
    return f"{nums[0]}{times} ({nums[1]}{dash}{nums[2]})"


def fmt_lost(c: dict[str, Any]) -> str:
    lost = c["lost_updates"]
    if not any(lost):
        return "0" + (" (expected >0)" if c["expect_losses"] else "")
    worst = max(lost)
    return f"{worst:,} of {c['total_ops']:,} ({worst / c['total_ops']:.0%})"


def rows(data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(strategy, start method, that pair's cells by N) for the measured pairs, in order."""
    out = []
    for strategy in data["strategies"]:
        for method in data["start_methods"]:
            by_procs = data["results"].get(strategy, {}).get(method)
            if by_procs and "na" not in by_procs:
                out.append((strategy, method, by_procs))
    return out


def report(data: dict[str, Any]) -> str:
    lines = [
        f"Locked increments of a shared counter across processes ({data['mode']} mode: median, "
        f"min-max of {data['repeats']} round(s), ~{data['seconds_per_run']}s per run)",
        "ns/op: " + DEFINITIONS["ns_per_op"],
        "per-proc: " + DEFINITIONS["per_process_ns_per_op"],
        "conc.: " + DEFINITIONS["concurrency"],
        "",
    ]
    body = []
    for strategy, method, by_procs in rows(data):
        for procs in data["procs"]:
            c = by_procs[str(procs)]
            body.append(
                [
                    strategy,
                    method,
                    str(procs),
                    fmt_summary(c["ns_per_op"]),
                    fmt_ns(c["per_process_ns_per_op"]["median"]),
                    f"{c['ops_per_s']['median']:,.0f}",
                    f"{c['concurrency']['median']:.2f}",
                    "baseline"
                    if (strategy, method) == BASELINE
                    else fmt_ratio(c.get("vs_inherited")),
                    fmt_lost(c),
                ]
            )
    headers = ["strategy", "start", "N", "ns/op", "per-proc", "ops/s", "conc.", "x inherited"]
    headers.append("lost updates")
    lines.append(table(headers, body))
    na: dict[str, list[str]] = {}
    for strategy in data["strategies"]:
        for method, by_procs in data["results"].get(strategy, {}).items():
            if "na" in by_procs:
                na.setdefault(by_procs["na"], []).append(f"{strategy} under {method}")
    lines += [f"n/a: {', '.join(where)}: {why}" for why, where in na.items()]
    lines += ["", "Process start-up (not in the numbers above):"]
    startup_rows = [
        [
            method,
            fmt_ns(s["first"] * 1e9),
            fmt_summary({k: v * 1e9 for k, v in s["later"].items() if k != "samples"}),
            fmt_ns(s["manager"] * 1e9) if "manager" in s else "-",
        ]
        for method, s in data["startup"].items()
    ]
    lines.append(table(["start", "first start", "later starts", "Manager() start"], startup_rows))
    for method, why in data["skipped"].items():
        lines.append(f"skipped {method}: {why}")
    lines.append("")
    for t in data["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        shown = f" (measured {t['measured']:,.4g})" if "measured" in t else ""
        lines.append(f"target {t['target']}: {state}{shown}")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """The results as Markdown tables (for the README)."""
    procs = data["procs"]
    head = ["strategy", "start"]
    for n in procs:
        head += [f"N={n}: per op", f"{TIMES} inherited"]
    head.append("lost updates (worst round)")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for strategy, method, by_procs in rows(data):
        cells = [f"`{strategy}`" if strategy != "none" else "none (control)", method]
        for n in procs:
            c = by_procs[str(n)]
            cells.append(fmt_summary(c["ns_per_op"], "µs"))
            base = (strategy, method) == BASELINE
            cells.append("1 (baseline)" if base else fmt_ratio(c.get("vs_inherited"), md=True))
        lost = [
            max(by_procs[str(n)]["lost_updates"]) / by_procs[str(n)]["total_ops"] for n in procs
        ]
        cells.append(" / ".join(f"{x:.0%}" if x else "0" for x in lost))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| start method | first start | later starts | `Manager()` start |",
        "| --- | --- | --- | --- |",
    ]
    for method, s in data["startup"].items():
        later = {k: v * 1e9 for k, v in s["later"].items() if k != "samples"}
        manager = fmt_ns(s["manager"] * 1e9, "µs") if "manager" in s else DASH
        lines.append(
            f"| {method} | {fmt_ns(s['first'] * 1e9, 'µs')} | {fmt_summary(later, 'µs')} "
            f"| {manager} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
