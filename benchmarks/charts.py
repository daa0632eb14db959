"""PNG charts of the benchmark results (needs matplotlib: ``pip install -e '.[charts]'``).

Each chart is drawn from a section's JSON data alone, so it can be redrawn from a saved
``results.json``:

    python benchmarks/charts.py results.json [--output DIR]

``lock_strategies`` has a chart of its own. Every other section gets the generic chart: every
mapping of candidates to ``{"median", "min", "max"}`` summaries found under a key such as
``ns_per_op`` or ``us_per_call`` (e.g. ``{"threads": {"1": {"ns_per_op": {...}}}}``) becomes
one group of bars, with min-max error bars. A section module can draw its own chart instead
by defining ``chart(data, path)``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

NS_UNITS = ((1e6, "ms"), (1e3, "µs"), (1.0, "ns"))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display). ImportError when not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_summary(value: Any) -> bool:
    return isinstance(value, dict) and {"median", "min", "max"} <= value.keys()


def find_series(data: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """Every non-empty dict whose values are all summaries, with its key path."""
    if not isinstance(data, dict):
        return []
    if data and all(is_summary(v) for v in data.values()):
        return [(path, data)]
    found = []
    for key, value in data.items():
        found += find_series(value, (*path, str(key)))
    return found


def _bars(
    ax: Any,
    groups: list[tuple[str, dict[str, dict[str, float]]]],
    names: list[str],
    scale: float,
) -> None:
    """Grouped bars: one colour per group, one slot per name; min-max error bars."""
    width = 0.8 / max(1, len(groups))
    for i, (label, series) in enumerate(groups):
        xs, heights, low, high = [], [], [], []
        for j, name in enumerate(names):
            s = series.get(name)
            if s is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            heights.append(s["median"] / scale)
            low.append((s["median"] - s["min"]) / scale)
            high.append((s["max"] - s["median"]) / scale)
        ax.bar(xs, heights, width, yerr=[low, high], capsize=2, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.grid(axis="y", which="both", alpha=0.3)
    if len(ax.get_legend_handles_labels()[0]) > 1:  # one unnamed group needs no legend
        ax.legend(fontsize=8)


def _unit(values: list[float]) -> tuple[float, str]:
    top = max(values, default=1.0)
    return next((s, u) for s, u in NS_UNITS if top >= s * 10 or u == "ns")


def lock_strategies_chart(data: dict[str, Any], path: Path) -> None:
    """ns per locked increment, strategy x start method, one bar per N; log scale."""
    plt = pyplot()
    names, by_procs = [], {str(n): {} for n in data["procs"]}
    for strategy in data["strategies"]:
        for method in data["start_methods"]:
            cells = data["results"].get(strategy, {}).get(method)
            if not cells or "na" in cells:
                continue
            name = f"{strategy}\n{method}"
            names.append(name)
            for n, c in cells.items():
                by_procs[n][name] = c["ns_per_op"]
    fig, ax = plt.subplots(figsize=(12, 5.5), layout="constrained")
    for t in data.get("targets", []):  # the targets measured before, as dotted lines
        if "/op" in t["target"] and t.get("expected", 0) > 10:
            label = f"target: {t['target'].split(' @')[0]} at N = 1"
            ax.axhline(t["expected"], color="grey", linestyle=":", linewidth=1, label=label)
    groups = [(f"N = {n} process{'es' * (n != '1')}", s) for n, s in by_procs.items()]
    _bars(ax, groups, names, 1.0)
    ax.set_yscale("log")
    ax.set_ylabel("ns per locked increment (log scale)")
    ax.set_title(
        "Locked increments of a shared counter: ns per op "
        f"(median, min-max of {data['repeats']} rounds; lower is better)"
    )
    ax.set_xticklabels(names, rotation=0, ha="center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


TIME_KEY = re.compile(r"^(ns|us|ms|s)_per_(\w+)$")
TO_NS = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}


def generic_chart(data: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars for every ``<unit>_per_<thing>`` mapping of candidates to summaries.

    ``<unit>`` is ns, us, ms or s (e.g. ``ns_per_op``); the first such key found is charted,
    one group of bars per place it occurs.
    """
    found = [(p, s) for p, s in find_series(data) if p and TIME_KEY.match(p[-1])]
    if not found:
        raise ValueError("no '<ns|us|ms|s>_per_<x>' summaries to chart in this section's data")
    key = found[0][0][-1]
    unit_of_key, per = key.split("_per_", 1)
    factor = TO_NS[unit_of_key]
    series = [
        (
            _group_label(p),
            {n: {k: v[k] * factor for k in ("median", "min", "max")} for n, v in s.items()},
        )
        for p, s in found
        if p[-1] == key
    ]
    names: list[str] = []
    for _, s in series:
        names += [n for n in s if n not in names]
    values = [v["median"] for _, s in series for v in s.values()]
    scale, unit = _unit(values)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    _bars(ax, series, names, scale)
    if max(values) > 30 * min(values):
        ax.set_yscale("log")
    ax.set_ylabel(f"{unit} per {per.replace('_', ' ')}")
    ax.set_title(f"{title} (median, min-max; lower is better)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _group_label(path: tuple[str, ...]) -> str:
    head = path[:-1]
    if len(head) >= 2:
        return f"{head[-2]} = {head[-1]}"
    return head[-1] if head else path[-1]


SPECIFIC: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "lock_strategies": lock_strategies_chart,
}


def draw(
    section: str, data: dict[str, Any], path: Path, module: Any = None, title: str = ""
) -> None:
    """The section's chart into ``path``: its module's ``chart()``, ours, or the generic one."""
    own = getattr(module, "chart", None)
    if callable(own):
        own(data, path)
    elif section in SPECIFIC:
        SPECIFIC[section](data, path)
    else:
        generic_chart(data, path, title or section.replace("_", " "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redraw the charts from a results.json")
    parser.add_argument("results", type=Path)
    parser.add_argument("--output", type=Path, help="directory (default: next to the JSON)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    out = args.output or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    for section, entry in results["sections"].items():
        if entry.get("status") == "ok":
            draw(section, entry["data"], out / f"{section}.png")
            print(out / f"{section}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
