"""Shared benchmark machinery: repetitions, medians with min-max, ratios, machine facts.

Method (the machine is noisy): every candidate is warmed up, then measured ``repeats`` times;
within one repetition all candidates run back to back in a shuffled order, and ratios against the
baseline are computed *inside* each repetition before taking their median, so a slow patch of
time affects both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Summary:
    median: float
    low: float
    high: float
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "samples": self.samples}

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        return (
            f"{self.median * scale:.{digits}f} "
            f"({self.low * scale:.{digits}f}-{self.high * scale:.{digits}f})"
        )


def measure_rounds(
    candidates: dict[str, Callable[[], float]], *, repeats: int, seed: int = 0
) -> dict[str, list[float]]:
    """Run each candidate ``repeats`` times after one warm-up, shuffled within each round.

    Each candidate returns one measurement (e.g. ns per op). Returns, per candidate, the list of
    measurements; index ``i`` of every list comes from the same round.
    """
    rng = random.Random(seed)
    names = list(candidates)
    for name in names:  # warm-up
        candidates[name]()
    values: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            values[name].append(candidates[name]())
    return values


def ratio(values: dict[str, list[float]], numerator: str, denominator: str) -> Summary:
    """``numerator / denominator``, computed within each round, summarised."""
    return Summary.of([a / b for a, b in zip(values[numerator], values[denominator], strict=True)])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for module in ("safepool", "psycopg", "psycopg_pool", "sqlalchemy", "dbutils", "redis"):
        try:
            mod = __import__(module)
            versions[module] = getattr(mod, "__version__", "?")
        except ImportError:
            versions[module] = None
    info["versions"] = versions
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def section_main(
    doc: str | None,
    run: Callable[..., dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    markdown: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None = None,
) -> int:
    """The command line every benchmark section shares: --quick, --smoke (when ``run`` has a
    smoke mode), --output FILE.json, --markdown."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    has_smoke = "smoke" in inspect.signature(run).parameters
    if has_smoke:
        speed.add_argument("--smoke", action="store_true", help="one short round (for tests)")
    parser.add_argument("--output", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = parser.parse_args(argv)
    data = run(quick=args.quick, smoke=args.smoke) if has_smoke else run(quick=args.quick)
    data["machine"] = machine()
    print(report(data))
    if args.markdown:
        print()
        print(markdown(data))
    if args.output:
        write_json(args.output, data)
    return 0
