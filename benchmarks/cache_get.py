"""The cost of a warm ProcessLocal.get(), beside what it guards against and what it replaces.

    python benchmarks/cache_get.py [--quick] [--output results.json] [--markdown]

Candidates, each measured in the same run (ns per call, the statement unrolled 10x per loop
iteration so loop overhead is ~1 ns):

* ``attribute read``: ``holder.client`` on a slotted object -- the floor: a plain global cache.
* ``os.getpid()``: the system call a pid check on every access would add.
* ``ProcessLocal.get()``: safepool, warm (the client is built). ``ProcessLocal()``: the same
  through ``__call__``, which is how a ``@per_process`` function is called.
* ``per_thread get()``: ``ProcessLocal(per_thread=True).get()``, warm; beside it the floor for
  per-thread storage, a ``threading.local`` attribute read.
* ``dict by os.getpid()``: the common workaround (a dict of sessions keyed by the pid, looked
  up on every call).
* Two designs not taken, as ``ProcessLocal`` subclasses: ``get() + pid check`` (compare a stored
  pid with ``os.getpid()`` on every call) and ``get() + fork generation check`` (compare a stored
  counter with ``safepool._fork.generation()``). The at-fork hook makes both unnecessary.
"""

from __future__ import annotations

import os
import sys
import threading
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Summary, measure_rounds, progress, ratio, section_main, table
from safepool import _fork
from safepool.cache import _UNSET, ProcessLocal

UNROLL = 10
TARGET_NS = 250.0  # the target for a warm get(), on CPython 3.11


class Client:
    pass


class Holder:
    __slots__ = ("client",)

    def __init__(self) -> None:
        self.client = Client()


class PidChecked(ProcessLocal[Any]):
    """A design not taken: a stored pid compared with os.getpid() on every call."""

    __slots__ = ("_pid",)

    def get(self) -> Any:
        value = self._value
        if value is not _UNSET and self._pid == os.getpid():
            return value
        self._pid = os.getpid()
        self._value = _UNSET
        return super().get()


class GenerationChecked(ProcessLocal[Any]):
    """A design not taken: a fork counter compared on every call."""

    __slots__ = ("_generation",)

    def get(self) -> Any:
        value = self._value
        if value is not _UNSET and self._generation == _fork.generation():
            return value
        self._generation = _fork.generation()
        self._value = _UNSET
        return super().get()


_by_pid: dict[int, Client] = {}


def naive_session() -> Client:
    """The seed-002 workaround: a dict of clients keyed by the pid."""
    pid = os.getpid()
    client = _by_pid.get(pid)
    if client is None:
        client = _by_pid[pid] = Client()
    return client


def candidates() -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (statement, namespace). Statements read local names (timeit's setup binds them)."""
    holder = Holder()
    cache = ProcessLocal(Client, name="bench")
    per_thread = ProcessLocal(Client, per_thread=True, name="bench-per-thread")
    local = threading.local()
    local.client = Client()
    pid_checked = PidChecked(Client)
    pid_checked._pid = os.getpid()
    generation_checked = GenerationChecked(Client)
    generation_checked._generation = _fork.generation()
    for warm in (cache, per_thread, pid_checked, generation_checked, naive_session):
        warm()
    return {
        "attribute read": ("h.client", {"h": holder}),
        "os.getpid()": ("os.getpid()", {"os": os}),
        "ProcessLocal.get()": ("c.get()", {"c": cache}),
        "ProcessLocal() / @per_process": ("c()", {"c": cache}),
        "per_thread get()": ("c.get()", {"c": per_thread}),
        "threading.local read": ("loc.client", {"loc": local}),
        "dict by os.getpid() (common workaround)": ("f()", {"f": naive_session}),
        "get() + pid check": ("c.get()", {"c": pid_checked}),
        "get() + fork generation check": ("c.get()", {"c": generation_checked}),
    }


def ns_per_call(statement: str, namespace: dict[str, Any], calls: int) -> float:
    setup = "; ".join(f"{name} = _ns[{name!r}]" for name in namespace)  # locals: LOAD_FAST
    timer = timeit.Timer(";".join([statement] * UNROLL), setup=setup, globals={"_ns": namespace})
    loops = max(1, calls // UNROLL)
    return timer.timeit(loops) / (loops * UNROLL) * 1e9


def run(*, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Measure every candidate; ``smoke`` is the smallest run (for tests: timings mean nothing)."""
    repeats = 2 if smoke else 3 if quick else 9
    calls = 20_000 if smoke else 200_000 if quick else 2_000_000
    progress(f"cache_get: {repeats} rounds of {calls} calls per candidate")
    statements = candidates()
    values = measure_rounds(
        {
            name: (lambda s=statement, ns=namespace: ns_per_call(s, ns, calls))
            for name, (statement, namespace) in statements.items()
        },
        repeats=repeats,
    )
    get = Summary.of(values["ProcessLocal.get()"])
    return {
        "benchmark": "cache_get",
        "calls_per_round": calls,
        "repeats": repeats,
        "ns_per_call": {name: Summary.of(v).as_dict() for name, v in values.items()},
        "vs_attribute_read": {
            name: ratio(values, name, "attribute read").as_dict() for name in values
        },
        "vs_getpid": {name: ratio(values, name, "os.getpid()").as_dict() for name in values},
        "targets": [
            {
                "target": f"warm ProcessLocal.get() <= {TARGET_NS:g} ns",
                "measured_ns": get.median,
                "met": get.median <= TARGET_NS,
            }
        ],
    }


def _fmt(d: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    return Summary(d["median"], d["min"], d["max"]).fmt(scale, digits)


def report(data: dict[str, Any]) -> str:
    rows = [
        [
            name,
            _fmt(ns, digits=1),
            _fmt(data["vs_attribute_read"][name]),
            _fmt(data["vs_getpid"][name]),
        ]
        for name, ns in data["ns_per_call"].items()
    ]
    lines = [
        f"Warm ProcessLocal.get() and its neighbours (median, min-max of {data['repeats']} "
        f"rounds of {data['calls_per_round']} calls)",
        "",
        table(["candidate", "ns per call", "/ attribute read", "/ os.getpid()"], rows),
        "",
    ]
    for t in data["targets"]:
        state = "met" if t["met"] else "MISSED"
        lines.append(f"target {t['target']}: {state} (measured {t['measured_ns']:.1f} ns)")
    return "\n".join(lines)


def markdown(data: dict[str, Any]) -> str:
    """The results as a Markdown table (for the README)."""
    lines = [
        "| candidate | ns per call | ÷ attribute read | ÷ `os.getpid()` |",
        "| --- | --- | --- | --- |",
    ]
    for name, ns in data["ns_per_call"].items():
        cells = [
            name,
            _fmt(ns, digits=1),
            _fmt(data["vs_attribute_read"][name]),
            _fmt(data["vs_getpid"][name]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return section_main(__doc__, run, report, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
