"""Cross-host budgets: PostgresBudget and RedisBudget beside their engines' floors.

    python benchmarks/net_budget.py [--quick | --smoke] [--output results.json] [--markdown]

Per operation, in one process (µs per acquire + release, shuffled rounds):

* ``PostgreSQL SELECT 1``: one round trip on a psycopg connection: the PostgreSQL floor.
* ``PostgresBudget``: ``acquire()`` + ``release()`` through the process's budget session.
* ``PostgresBudget.acquire_on``: the permit held on the very connection it counts.
* ``(advisory lock + unlock)``, ``(advisory lock + token + unlock)``: two bare statements, the
  second drawing a token from a sequence: where PostgresBudget's time goes (the rest is the
  holder record and the NOTIFY of a release).
* ``Redis PING``: one round trip with redis-py: the Redis floor.
* ``RedisBudget``: ``acquire()`` + ``release()`` (heartbeat running, ttl 10 s).
* ``redis-py Lock (limit 1)``: ``Lock.acquire()`` + ``release()``, a budget of one.
* ``HostBudget``: when this tree has it (one host, no server), for scale.

"Round trips" divides an operation by its engine's floor within each round (the target: <= 2.5
per acquire + release). Scaling: 1 to 32 processes (fork) share one budget of ``SCALING_LIMIT``
permits, each looping acquire + release; throughput is all processes' operations over the wall
time from the first start to the last end. ``<engine> floor`` is the same with two bare round
trips per operation (``SELECT 1`` twice, ``PING`` twice): what the machine allows. Every permit
is given back at the end (checked).
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import safepool
from _common import Summary, measure_rounds, progress, ratio, section_main, table

PG_DSN = os.environ.get("SAFEPOOL_TEST_DSN", "host=127.0.0.1 port=5432 dbname=test user=postgres")
REDIS_URL = os.environ.get("SAFEPOOL_TEST_REDIS", "redis://127.0.0.1:6379/0")
TARGET_ROUND_TRIPS = 2.5
COLLAPSE = 0.5  # "no collapse": throughput at the most processes >= half the best
SCALING_LIMIT = 8
FLOORS = {
    "PostgresBudget": "PostgreSQL SELECT 1",
    "PostgresBudget.acquire_on": "PostgreSQL SELECT 1",
    "(advisory lock + unlock)": "PostgreSQL SELECT 1",
    "(advisory lock + token + unlock)": "PostgreSQL SELECT 1",
    "RedisBudget": "Redis PING",
    "redis-py Lock (limit 1)": "Redis PING",
}


def _unique(prefix: str) -> str:
    return f"bench-{prefix}-{uuid.uuid4().hex[:10]}"


def open_engines() -> tuple[dict[str, Any], dict[str, str]]:
    """{engine: address} reachable here, and {engine: why not} for the others."""
    found, skipped = {}, {}
    try:
        import psycopg

        with psycopg.connect(PG_DSN, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        found["postgres"] = PG_DSN
    except Exception as exc:
        skipped["postgres"] = f"PostgreSQL not reachable ({type(exc).__name__}: {exc})"
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.close()
        found["redis"] = REDIS_URL
    except Exception as exc:
        skipped["redis"] = f"Redis not reachable ({type(exc).__name__}: {exc})"
    return found, skipped


def candidates(engines: dict[str, str], made: list[Any], cleanup: list[Any]) -> dict[str, Any]:
    """name -> a zero-argument operation (one acquire + release, or one floor round trip)."""
    ops: dict[str, Any] = {}
    if "postgres" in engines:
        import psycopg

        conn = psycopg.connect(engines["postgres"], autocommit=True)
        ops["PostgreSQL SELECT 1"] = lambda: conn.execute("SELECT 1").fetchone()
        ops.update(_ablations(conn, cleanup))
        pg = safepool.PostgresBudget(engines["postgres"], _unique("pg"), 4)
        own = psycopg.connect(engines["postgres"], autocommit=True)
        ops["PostgresBudget"] = lambda: pg.release(pg.acquire())
        ops["PostgresBudget.acquire_on"] = lambda: pg.release(pg.acquire_on(own))
        made.append(pg)
    if "redis" in engines:
        import redis

        client = redis.Redis.from_url(engines["redis"])
        ops["Redis PING"] = client.ping
        rd = safepool.RedisBudget(engines["redis"], _unique("redis"), 4)
        ops["RedisBudget"] = lambda: rd.release(rd.acquire())
        lock = client.lock(_unique("lock"), timeout=10)

        def lock_op() -> None:
            lock.acquire()
            lock.release()

        ops["redis-py Lock (limit 1)"] = lock_op
        made.append(rd)
    host_budget = getattr(safepool, "HostBudget", None)  # the one-host engine, when present
    if host_budget is not None:
        hb = host_budget(_unique("host"), 4)
        ops["HostBudget"] = lambda: hb.release(hb.acquire())
        made.append(hb)
    return ops


def _ablations(conn: Any, cleanup: list[Any]) -> dict[str, Any]:
    """Where PostgresBudget's time goes: the bare advisory lock, then with a durable token."""
    seq = f"bench_token_{uuid.uuid4().hex[:10]}"
    conn.execute(f"CREATE SEQUENCE {seq}")
    cleanup.append(lambda: conn.execute(f"DROP SEQUENCE {seq}"))
    key = 0x5AFE0000 - 1  # a class no budget uses
    lock = "SELECT pg_try_advisory_lock(%s::int4, 0)"
    unlock = "SELECT pg_advisory_unlock(%s::int4, 0)"

    def bare() -> None:
        conn.execute(lock, (key,)).fetchone()
        conn.execute(unlock, (key,)).fetchone()

    def with_token() -> None:
        conn.execute(f"{lock}, nextval('{seq}')", (key,)).fetchone()
        conn.execute(unlock, (key,)).fetchone()

    return {"(advisory lock + unlock)": bare, "(advisory lock + token + unlock)": with_token}


def us_per_op(op: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        op()
    return (time.perf_counter() - start) / calls * 1e6


def scaling_worker(  # noqa: PLR0917 - a process target
    engine: str, where: str, name: str, ops: int, barrier: Any, out: Any
) -> None:
    op = _scaling_op(engine, where, name)
    for _ in range(max(3, ops // 10)):
        op()
    barrier.wait()
    start = time.monotonic()
    for _ in range(ops):
        op()
    out.send((start, time.monotonic()))


def _scaling_op(engine: str, where: str, name: str) -> Any:
    """One acquire + release, or (for "<engine> floor") two bare round trips."""
    if engine == "postgres floor":
        import psycopg

        conn = psycopg.connect(where, autocommit=True)
        return lambda: (conn.execute("SELECT 1").fetchone(), conn.execute("SELECT 1").fetchone())
    if engine == "redis floor":
        import redis

        client = redis.Redis.from_url(where)
        return lambda: (client.ping(), client.ping())
    kind = safepool.PostgresBudget if engine == "postgres" else safepool.RedisBudget
    budget = kind(where, name, SCALING_LIMIT)
    return lambda: budget.release(budget.acquire())


def measure_scaling(engine: str, where: str, name: str, procs: int, ops: int) -> float:
    """Total acquire + release per second of ``procs`` processes sharing one budget."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    pipes, workers = [], []
    for _ in range(procs):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=scaling_worker, args=(engine, where, name, ops, barrier, writer))
        proc.start()
        writer.close()
        pipes.append(reader)
        workers.append(proc)
    spans = [reader.recv() for reader in pipes]
    for proc in workers:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a scaling worker failed (exit code {proc.exitcode})")
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return procs * ops / elapsed


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Measure everything reachable; ``smoke`` is the smallest run (timings mean nothing)."""
    repeats = 1 if smoke else 3 if quick else 7
    calls = 20 if smoke else 300 if quick else 1000
    procs_list = (1, 2) if smoke else (1, 4, 16) if quick else (1, 2, 4, 8, 16, 32)
    scaling_ops = 10 if smoke else 100 if quick else 300
    engines, skipped = open_engines()
    if not engines:
        raise ImportError(f"neither engine is reachable: {skipped}")
    made: list[Any] = []
    cleanup: list[Any] = []
    ops = candidates(engines, made, cleanup)
    progress(f"net_budget: {repeats} rounds of {calls} calls per candidate")
    values = measure_rounds(
        {name: functools.partial(us_per_op, op, calls) for name, op in ops.items()},
        repeats=repeats,
    )
    round_trips = {
        name: ratio(values, name, floor).as_dict()
        for name, floor in FLOORS.items()
        if name in values and floor in values
    }
    scaling = {}
    lines = [(e, w) for e, w in engines.items()] + [(f"{e} floor", w) for e, w in engines.items()]
    for engine, where in lines:
        name = _unique(f"scale-{engine}")
        scaling[engine] = {}
        for procs in procs_list:
            progress(f"net_budget: {engine}, {procs} process(es), {scaling_ops} ops each")
            samples = [
                measure_scaling(engine, where, name, procs, scaling_ops) for _ in range(repeats)
            ]
            scaling[engine][str(procs)] = Summary.of(samples).as_dict()
        if engine == "postgres":
            made.append(safepool.PostgresBudget(where, name, SCALING_LIMIT))
        elif engine == "redis":
            made.append(safepool.RedisBudget(where, name, SCALING_LIMIT))
    leftover = {b.name: b.stats().in_use for b in made}
    for budget in made:
        unlink = getattr(budget, "unlink", None)
        if unlink is not None:
            unlink()
    for step in cleanup:
        step()
    return {
        "benchmark": "net_budget",
        "calls_per_round": calls,
        "repeats": repeats,
        "us_per_op": {name: Summary.of(v).as_dict() for name, v in values.items()},
        "round_trips": round_trips,
        "scaling_limit": SCALING_LIMIT,
        "scaling_ops_per_process": scaling_ops,
        "ops_per_second": scaling,
        "permits_left_held": leftover,
        "skipped": skipped,
        "targets": check_targets(round_trips, scaling),
    }


def check_targets(round_trips: dict[str, Any], scaling: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name in ("PostgresBudget", "RedisBudget"):
        measured = round_trips.get(name, {}).get("median")
        out.append(
            {
                "target": f"{name} acquire+release <= {TARGET_ROUND_TRIPS} floor round trips",
                "ratio": measured,
                "met": None if measured is None else measured <= TARGET_ROUND_TRIPS,
            }
        )
    for engine, cells in scaling.items():
        if engine.endswith("floor"):
            continue
        best = max(c["median"] for c in cells.values())
        most = cells[max(cells, key=int)]["median"]
        out.append(
            {
                "target": f"{engine}: no throughput collapse at {max(cells, key=int)} processes "
                f"(>= {COLLAPSE:g}x the best)",
                "ratio": most / best,
                "met": most / best >= COLLAPSE,
            }
        )
    return out


def _fmt(d: dict[str, Any], digits: int = 1) -> str:
    return Summary(d["median"], d["min"], d["max"]).fmt(digits=digits)


def report(data: dict[str, Any]) -> str:
    rows = []
    for name, us in data["us_per_op"].items():
        trips = data["round_trips"].get(name)
        rows.append([name, _fmt(us), _fmt(trips, 2) if trips else "-"])
    lines = [
        f"One process: µs per acquire + release (median, min-max of {data['repeats']} rounds "
        f"of {data['calls_per_round']})",
        "",
        table(["operation", "µs per op", "floor round trips"], rows),
        "",
        f"Scaling: total acquire + release per second, one budget of {data['scaling_limit']}, "
        f"{data['scaling_ops_per_process']} ops per process",
    ]
    for engine, cells in data["ops_per_second"].items():
        cells_text = ", ".join(f"{n}: {_fmt(c, 0)}/s" for n, c in cells.items())
        lines.append(f"  {engine}: {cells_text}")
    for engine, why in data["skipped"].items():
        lines.append(f"skipped {engine}: {why}")
    lines.append(f"permits still held at the end: {data['permits_left_held']}")
    for t in data["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        shown = "" if t["ratio"] is None else f" ({t['ratio']:.2f})"
        lines.append(f"target {t['target']}: {state}{shown}")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    lines = ["| operation | µs per acquire + release | ÷ engine floor |", "| --- | --- | --- |"]
    for name, us in data["us_per_op"].items():
        trips = data["round_trips"].get(name)
        lines.append(f"| {name} | {_fmt(us)} | {_fmt(trips, 2) if trips else '-'} |")
    procs = sorted({int(n) for cells in data["ops_per_second"].values() for n in cells})
    lines += ["", "| engine | " + " | ".join(f"{n} proc." for n in procs) + " |",
              "| --- " * (len(procs) + 1) + "|"]  # fmt: skip
    for engine, cells in data["ops_per_second"].items():
        row = [f"{cells[str(n)]['median']:,.0f}/s" if str(n) in cells else "-" for n in procs]
        lines.append(f"| {engine} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def chart(data: dict[str, Any], path: Path) -> None:
    """Left: µs per operation (log scale). Right: total ops/s against processes."""
    from charts import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    names = list(data["us_per_op"])
    medians = [data["us_per_op"][n]["median"] for n in names]
    low = [m - data["us_per_op"][n]["min"] for m, n in zip(medians, names, strict=True)]
    high = [data["us_per_op"][n]["max"] - m for m, n in zip(medians, names, strict=True)]
    left.bar(range(len(names)), medians, yerr=[low, high], capsize=3,
             color=["grey" if n in FLOORS.values() else "C0" for n in names])  # fmt: skip
    left.set_xticks(range(len(names)))
    left.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("µs per acquire + release (grey: one engine round trip)")
    left.set_title("One process (median, min-max)")
    for engine, cells in data["ops_per_second"].items():
        xs = [int(n) for n in cells]
        right.errorbar(
            xs,
            [c["median"] for c in cells.values()],
            yerr=[[c["median"] - c["min"] for c in cells.values()],
                  [c["max"] - c["median"] for c in cells.values()]],
            marker="o", capsize=3, label=engine,
        )  # fmt: skip
    right.set_xscale("log", base=2)
    right.set_xlabel("processes sharing one budget")
    right.set_ylabel("acquire + release per second, all processes")
    right.set_title(f"Scaling (limit {data['scaling_limit']}; higher is better)")
    right.legend()
    right.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
