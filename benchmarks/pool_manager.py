"""Lease + release across processes: round trips to a manager server, the same-host fast path,
``HostBudget`` and an in-process pool, side by side.

    python benchmarks/pool_manager.py [--quick] [--output results.json] [--markdown]

Candidates, each measured in the same run with 1, 2 and 4 client processes:

* ``proxy no-op``: a bare stdlib ``BaseManager`` proxy calling a method that does nothing. One
  round trip: the transport's floor, and the baseline of the slow path's ratio.
* ``stats() round trip``: ``pool.stats()`` on a safepool proxy: one round trip of ours, the
  baseline of the fast path's ratio.
* ``lease+release, slow path``: ``PoolManager().SafeConnectionPool(share="value",
  fast_path=False)``, ``acquire()`` then ``release()``: two round trips.
* ``lease+release, fast path``: the same pool with the fast path (the default): the clients are
  on the server's host, so both happen in shared memory.
* ``hosted call()``: ``pool.call(func)`` on a hosted pool: lease, run, release in the server,
  one round trip.
* ``hosted lease+call+release``: ``with pool.lease() as item: item.call(func)``: three round
  trips (the case a hosted fast path would shorten to one plus two table operations).
* ``HostBudget acquire+release``: a same-host permit (``HostBudget(name, 4)``), no server.
* ``in-process pool``: a ``SafeConnectionPool`` in each client process (not shared: the floor).
* ``Manager().Lock()``: a ``SyncManager`` lock proxy, ``acquire()`` then ``release()``.

Each client process warms up, waits on a barrier, then runs its loop; the clock (system-wide
``time.monotonic``) runs from the first client's start to the last client's end, so process
start-up is excluded. Per op: elapsed / ops of one client; throughput: all clients' ops / elapsed.
The candidates without a round trip run ``FAST_OPS`` times as many ops, for a measurable span.
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
import time
import uuid
from multiprocessing.managers import BaseManager, SyncManager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safepool
from _common import (
    Summary,
    measure_rounds,
    progress,
    ratio,
    section_main,
    table,
)

CLIENTS = (1, 2, 4)
FAST_OPS = 25  # x more ops for the candidates that make no round trip
NOOP, STATS = "proxy no-op", "stats() round trip"
SLOW, FAST = "lease+release, slow path", "lease+release, fast path"
HOSTED_CALL, HOSTED_LEASE = "hosted call()", "hosted lease+call+release"
BUDGET, IN_PROCESS, LOCK = "HostBudget acquire+release", "in-process pool", "Manager().Lock()"
NO_ROUND_TRIP = (FAST, BUDGET, IN_PROCESS)
# Targets from the cross-process issue (slow path) and the fast-path issue.
TARGET_RATIO = 2.2  # slow lease+release <= 2.2x one bare proxy round trip (1 client)
TARGET_THROUGHPUT = 13_000  # slow lease+release per second in total with 4 clients
TARGET_FAST_US = 5.0  # fast lease+release, median us (1 client)
TARGET_FAST_RATIO = 0.2  # fast lease+release <= 0.2x one stats() round trip (1 client)
TARGET_FAST_THROUGHPUT = 150_000  # fast lease+release per second in total with 4 clients


class Noop:
    def noop(self) -> None:
        return None


class StdlibManager(BaseManager):
    pass


StdlibManager.register("Noop", Noop, exposed=("noop",))


class Tokens:
    """By-value items for the pool: small strings."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"token-{self.n}"


def noop(item: object) -> None:
    return None


def _pair(acquire: Any, release: Any) -> Any:
    def op() -> None:
        release(acquire())

    return op


def _hosted_lease(pool: Any) -> Any:
    def op() -> None:
        with pool.lease() as item:
            item.call(noop)

    return op


def _op(kind: str, target: Any) -> Any:
    if kind in (SLOW, FAST, BUDGET):
        return _pair(target.acquire, target.release)
    if kind == IN_PROCESS:
        pool = safepool.SafeConnectionPool(factory=Tokens(), max_size=4)
        return _pair(pool.acquire, pool.release)
    if kind == HOSTED_LEASE:
        return _hosted_lease(target)
    if kind == LOCK:
        return _pair(target.acquire, lambda _: target.release())
    simple = {NOOP: "noop", STATS: "stats"}
    if kind in simple:
        return getattr(target, simple[kind])
    if kind == HOSTED_CALL:
        return functools.partial(target.call, noop)
    raise ValueError(kind)


def client(kind: str, target: Any, ops: int, barrier: Any, out: Any) -> None:
    op = _op(kind, target)
    for _ in range(max(10, ops // 10)):  # warm-up: connect, fill caches
        op()
    barrier.wait()
    start = time.monotonic()
    for _ in range(ops):
        op()
    out.send((start, time.monotonic()))


def run_clients(ctx: Any, kind: str, target: Any, clients: int, ops: int) -> tuple[float, float]:
    """(us per op of one client, ops per second of all clients) for one measurement."""
    barrier = ctx.Barrier(clients)
    pipes, procs = [], []
    for _ in range(clients):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=client, args=(kind, target, ops, barrier, writer))
        proc.start()
        writer.close()
        pipes.append(reader)
        procs.append(proc)
    spans = [reader.recv() for reader in pipes]
    for proc in procs:
        proc.join()
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return elapsed / ops * 1e6, clients * ops / elapsed


def measure(  # noqa: PLR0917 - partial()-applied in one place
    ctx: Any, kind: str, target: Any, clients: int, ops: int, throughput: list[float]
) -> float:
    """One measurement: returns us per op, and appends the ops/s of all clients."""
    us, per_second = run_clients(ctx, kind, target, clients, ops)
    throughput.append(per_second)
    return us


def _targets(plain: Any, ours: Any, sync: Any, budget: Any) -> dict[str, Any]:
    fast = ours.SafeConnectionPool(factory=Tokens(), max_size=4, share="value")
    hosted = ours.SafeConnectionPool(factory=Tokens(), max_size=4)
    if fast.describe()["fast_path"] is not True:
        raise RuntimeError(f"the fast path is off here: {fast.describe()['fast_path_reason']}")
    return {
        NOOP: plain.Noop(),
        STATS: fast,
        SLOW: ours.SafeConnectionPool(factory=Tokens(), max_size=4, share="value", fast_path=False),
        FAST: fast,
        HOSTED_CALL: hosted,
        HOSTED_LEASE: hosted,
        BUDGET: budget,
        IN_PROCESS: None,
        LOCK: sync.Lock(),
    }


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    repeats = 1 if smoke else 3 if quick else 7
    ops = 100 if smoke else 600 if quick else 2000
    ctx = multiprocessing.get_context("fork")
    results: dict[str, Any] = {}
    budget = safepool.HostBudget(f"bench-{uuid.uuid4().hex[:12]}", 4)
    try:
        with (
            StdlibManager(ctx=ctx) as plain,
            safepool.PoolManager(ctx=ctx) as ours,
            SyncManager(ctx=ctx) as sync,
        ):
            targets = _targets(plain, ours, sync, budget)
            for clients in CLIENTS:
                progress(f"pool_manager: {clients} client(s), {repeats} rounds of {ops} ops")
                results[str(clients)] = _measure_all(ctx, targets, clients, ops, repeats)
            leaked = targets[FAST].stats().leased + targets[SLOW].stats().leased
    finally:
        budget.unlink()
        budget.close()
    return {
        "benchmark": "pool_manager",
        "ops_per_client": ops,
        "fast_ops_factor": FAST_OPS,
        "repeats": repeats,
        "clients": results,
        "leaked_leases": leaked,
        "targets": check_targets(results),
    }


def _measure_all(
    ctx: Any, targets: dict[str, Any], clients: int, ops: int, repeats: int
) -> dict[str, Any]:
    throughput: dict[str, list[float]] = {name: [] for name in targets}
    candidates = {
        name: functools.partial(
            measure,
            ctx,
            name,
            targets[name],
            clients,
            ops * FAST_OPS if name in NO_ROUND_TRIP else ops,
            throughput[name],
        )
        for name in targets
    }
    values = measure_rounds(candidates, repeats=repeats)
    # measure_rounds' warm-up round also recorded a throughput: drop it.
    throughput = {name: samples[1:] for name, samples in throughput.items()}
    return {
        "us_per_op": {n: Summary.of(v).as_dict() for n, v in values.items()},
        "ops_per_second": {n: Summary.of(v).as_dict() for n, v in throughput.items()},
        "ratio_to_noop": {n: ratio(values, n, NOOP).as_dict() for n in values},
        "ratio_to_stats": {n: ratio(values, n, STATS).as_dict() for n in values},
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    one, most = results["1"], results[str(CLIENTS[-1])]
    slow_ratio = one["ratio_to_noop"][SLOW]["median"]
    slow_total = most["ops_per_second"][SLOW]["median"]
    fast_us = one["us_per_op"][FAST]["median"]
    fast_ratio = one["ratio_to_stats"][FAST]["median"]
    fast_total = most["ops_per_second"][FAST]["median"]
    return [
        {"target": f"slow lease+release <= {TARGET_RATIO}x proxy no-op @1 client",
         "ratio": slow_ratio, "met": slow_ratio <= TARGET_RATIO},
        {"target": f"slow lease+release >= {TARGET_THROUGHPUT}/s @{CLIENTS[-1]} clients",
         "value": slow_total, "met": slow_total >= TARGET_THROUGHPUT},
        {"target": f"fast lease+release <= {TARGET_FAST_US} us @1 client",
         "measured_us": fast_us, "met": fast_us <= TARGET_FAST_US},
        {"target": f"fast lease+release <= {TARGET_FAST_RATIO}x one stats() round trip",
         "ratio": fast_ratio, "met": fast_ratio <= TARGET_FAST_RATIO},
        {"target": f"fast lease+release >= {TARGET_FAST_THROUGHPUT}/s @{CLIENTS[-1]} clients",
         "value": fast_total, "met": fast_total >= TARGET_FAST_THROUGHPUT},
    ]  # fmt: skip


def report(data: dict[str, Any]) -> str:
    lines = [
        "Across processes, through a manager server (median, min-max of "
        f"{data['repeats']} rounds, {data['ops_per_client']} ops per client)"
    ]
    for clients, result in data["clients"].items():
        rows = []
        for name, us in result["us_per_op"].items():
            per_second = result["ops_per_second"][name]
            r = result["ratio_to_noop"][name]
            rows.append(
                [
                    name,
                    Summary(us["median"], us["min"], us["max"]).fmt(digits=2),
                    Summary(per_second["median"], per_second["min"], per_second["max"]).fmt(
                        digits=0
                    ),
                    Summary(r["median"], r["min"], r["max"]).fmt(),
                ]
            )
        lines += [
            "",
            f"{clients} client process(es):",
            table(["operation", "us per op (one client)", "ops/s (all clients)", "vs no-op"], rows),
        ]
    lines.append("")
    for t in data["targets"]:
        shown = _shown(t)
        lines.append(f"target {t['target']}: {'met' if t['met'] else 'MISSED'} ({shown})")
    return "\n".join(lines)


def _shown(t: dict[str, Any]) -> str:
    if "ratio" in t:
        return f"{t['ratio']:.2f}x"
    if "measured_us" in t:
        return f"{t['measured_us']:.2f} us"
    return f"{t['value']:,.0f}/s"


def _us(us: float) -> str:
    return f"{us:.2f}" if us < 10 else f"{us:.1f}"


def markdown(data: dict[str, Any]) -> str:
    names = list(data["clients"]["1"]["us_per_op"])
    header = "| operation | " + " | ".join(
        f"{c} client{'s' if c != '1' else ''}: µs/op, ops/s" for c in data["clients"]
    )
    lines = [
        header + " | vs no-op (1 client) | vs stats() (1 client) |",
        "| --- " * (len(data["clients"]) + 3) + "|",
    ]
    one = data["clients"]["1"]
    for name in names:
        cells = [name]
        for result in data["clients"].values():
            us = result["us_per_op"][name]["median"]
            per_second = result["ops_per_second"][name]["median"]
            cells.append(f"{_us(us)} µs, {per_second:,.0f}/s")
        for key in ("ratio_to_noop", "ratio_to_stats"):
            r = one[key][name]
            cells.append(
                Summary(r["median"], r["min"], r["max"]).fmt(digits=3 if r["median"] < 0.1 else 2)
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
