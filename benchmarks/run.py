"""Run the benchmarks: a table on stdout, results.json and PNG charts in one directory.

    python benchmarks/run.py [--quick | --smoke] [--output DIR] [--only SECTION[,SECTION]]

Sections, in order (each is a module here with ``run()``, ``report()`` and ``markdown()``):

* ``lock_strategies``: inherited, initializer-passed and ``Manager().Lock()`` locks across
  processes under fork, spawn and forkserver, with a no-lock control.
* ``pool_inprocess``: safepool against a floor, DBUtils, psycopg_pool and SQLAlchemy, in one
  process.
* ``pool_manager``: safepool through ``PoolManager`` across processes (optional).
* ``cache_get``: the client cache (optional).
* ``host_budget``: ``HostBudget`` beside other cross-process counting semaphores and a
  ``PoolManager`` lease, at 1 process and with 4 processes contending a limit of 2.
* ``net_budget``: ``PostgresBudget`` and ``RedisBudget`` beside their engines' floors, and
  scaling from 1 to 32 processes (optional: needs PostgreSQL and/or Redis).
* ``worker_pools``: ``WorkerSetup().Pool().map`` (per-task blame, time limits) against the stdlib
  ``Pool.map``, billiard, pebble and loky; how fast a dead worker's task fails.
* ``pool_server``: ``python -m safepool serve``: a new client's connect and first lease over TCP
  and a Unix socket; a connected client's lease p99, idle and with 1,000 hostile connections.

A section whose module is not there, or needs something not installed, is skipped with a line
saying why; so is a peer or a server that is missing. Progress goes to stderr. ``--quick``
takes under a minute; the full run under ten; ``--smoke`` is the smallest run (for the tests:
its timings mean nothing). Writes ``DIR/results.json`` (machine facts, every section's data, the
targets met or missed), ``DIR/results.md`` (the Markdown tables) and ``DIR/<section>.png`` when
matplotlib is installed. Exit status 1 if a section failed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, progress, write_json

SECTIONS = {
    "lock_strategies": "Lock strategies across processes",
    "pool_inprocess": "Pools in one process",
    "pool_manager": "Pools across processes (PoolManager)",
    "cache_get": "Client cache get",
    "host_budget": "HostBudget: a host-wide limit",
    "net_budget": "Budgets across hosts (PostgreSQL, Redis)",
    "worker_pools": "Worker pools",
    "pool_server": "A pool server: connects, and under attack",
}
SCHEMA = 1
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results"
CHARTS_HINT = "pip install -e '.[charts]'"


# The unit of a target's measurement, by the key a section stores it under.
_UNITS = {"ratio": "x", "value": "ops/s"}


def load(name: str) -> tuple[Any, str | None]:
    """The section's module, or None and why it is skipped."""
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None, f"benchmarks/{name}.py is not there"
        return None, f"needs {exc.name!r}, which is not installed (pip install -e '.[bench]')"
    except ImportError as exc:
        return None, f"an optional dependency is missing: {exc}"


def call_run(module: Any, mode: str) -> tuple[dict[str, Any], str]:
    """``module.run()`` in ``mode``; a module without a smoke mode runs quick. (data, mode)."""
    params = inspect.signature(module.run).parameters
    if mode == "smoke" and "smoke" in params:
        return module.run(quick=True, smoke=True), "smoke"
    if mode in ("smoke", "quick"):
        return module.run(quick=True), "quick"
    return module.run(quick=False), "full"


def run_section(name: str, mode: str) -> tuple[dict[str, Any], Any]:
    """One section's entry for results.json, and its module (None unless it ran)."""
    module, why = load(name)
    if module is None:
        return {"status": "skipped", "reason": why}, None
    progress(f"== {name}")
    start = time.perf_counter()
    try:
        data, ran_as = call_run(module, mode)
    except ImportError as exc:
        return {"status": "skipped", "reason": f"an optional dependency is missing: {exc}"}, None
    except Exception as exc:
        progress(traceback.format_exc())
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}, None
    seconds = time.perf_counter() - start
    progress(f"== {name}: {seconds:.1f}s ({ran_as} mode)")
    return {"status": "ok", "mode": ran_as, "seconds": seconds, "data": data}, module


def collect_targets(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, entry in sections.items():
        if entry["status"] != "ok":
            continue
        for t in entry["data"].get("targets", []):
            item = {"section": name, "target": t["target"], "met": t.get("met")}
            # The sections name the measurement differently: measured, ratio, value, measured_ns.
            keys = ["measured", "ratio", "value", *(k for k in t if k.startswith("measured_"))]
            key = next((k for k in keys if isinstance(t.get(k), int | float)), None)
            if key is not None:
                item["measured"] = t[key]
                if key.startswith("measured_"):
                    item["unit"] = key.removeprefix("measured_")
                elif key in _UNITS:
                    item["unit"] = _UNITS[key]
            out.append(item)
    return out


def write_charts(
    sections: dict[str, dict[str, Any]], modules: dict[str, Any], out: Path
) -> dict[str, Any]:
    """PNG per section into ``out``. {"written": {section: file}, "skipped": {...}}."""
    try:
        import charts

        charts.pyplot()
    except ImportError as exc:
        return {"skipped": f"matplotlib is not installed ({exc.name}): {CHARTS_HINT}"}
    written, failed = {}, {}
    for name, entry in sections.items():
        if entry["status"] != "ok":
            continue
        path = out / f"{name}.png"
        try:
            charts.draw(name, entry["data"], path, modules.get(name), SECTIONS[name])
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
            progress(f"no chart for {name}: {failed[name]}")
            continue
        written[name] = path.name
    return {"written": written, "failed": failed}


def render(results: dict[str, Any], modules: dict[str, Any], kind: str) -> str:
    """Every section's report (``kind="report"``) or Markdown (``kind="markdown"``)."""
    blocks = []
    for name, entry in results["sections"].items():
        heading = f"{SECTIONS[name]} [{name}]"
        heading = f"## {heading}" if kind == "markdown" else f"=== {heading} ==="
        if entry["status"] == "ok":
            body = getattr(modules[name], kind)(entry["data"])
            note = f"({entry['mode']} mode, {entry['seconds']:.0f}s)"
            blocks.append(f"{heading}\n{note}\n\n{body}")
        else:
            blocks.append(f"{heading}\n{entry['status']}: {entry['reason']}")
    return "\n\n".join(blocks)


def summary(results: dict[str, Any]) -> str:
    lines = ["=== Targets ==="]
    for t in results["targets"]:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        unit = f" {t['unit']}" if "unit" in t else ""
        shown = f" (measured {t['measured']:,.4g}{unit})" if "measured" in t else ""
        lines.append(f"[{t['section']}] {t['target']}: {state}{shown}")
    charts = results["charts"]
    if "skipped" in charts:
        lines.append(f"charts skipped: {charts['skipped']}")
    else:
        lines += [f"chart: {file}" for file in charts["written"].values()]
        lines += [f"no chart for {name}: {why}" for name, why in charts["failed"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    speed.add_argument("--smoke", action="store_true", help="smallest run, for tests")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="directory (default: %(default)s)"
    )
    parser.add_argument(
        "--only", help=f"comma-separated sections to run, of: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--no-charts", action="store_true", help="do not draw PNG charts")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown or not only:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    args.only = only
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    started = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    modules: dict[str, Any] = {}
    for name in SECTIONS:
        if name not in args.only:
            sections[name] = {"status": "skipped", "reason": "not selected (--only)"}
            continue
        sections[name], module = run_section(name, mode)
        if module is not None:
            modules[name] = module
        else:
            progress(f"== {name}: {sections[name]['status']}: {sections[name]['reason']}")
    info = machine()
    try:
        import matplotlib

        info["versions"]["matplotlib"] = matplotlib.__version__
    except ImportError:
        info["versions"]["matplotlib"] = None
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": mode,
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "machine": info,
        "sections": sections,
        "targets": collect_targets(sections),
    }
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    if args.no_charts:
        results["charts"] = {"skipped": "--no-charts"}
    else:
        progress("== charts")
        results["charts"] = write_charts(sections, modules, out)
    results["seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    (out / "results.md").write_text(render(results, modules, "markdown") + "\n")
    print(render(results, modules, "report"))
    print()
    print(summary(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({results['seconds']:.0f}s)")
    return 1 if any(e["status"] == "error" for e in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
