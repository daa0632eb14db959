"""Process targets for the cross-process fault-injection tests (importable under spawn and
forkserver, so nothing here is a lambda or a closure)."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from helpers import SHORT, wait_until
from interrupts import Interrupter, check_pool, pick
from safepool import LeaseError, PoolProxy


def echo(item: object, value: object) -> object:
    return value


def pause(item: object, seconds: float) -> str:
    time.sleep(seconds)
    return "paused"


class Tokens:
    """By-value items: distinct strings."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self) -> str:
        self.made += 1
        return f"item-{os.getpid()}-{self.made}"


class Conn:
    """A hosted item: an object with a close() the pool calls."""

    def close(self) -> None:
        pass


# -- operations to interrupt ---------------------------------------------------------------------


def _release_all(pool: PoolProxy[Any], held: list[Any]) -> None:
    """The test's own bookkeeping after an interruption: what it still holds goes back."""
    for item in held:
        with contextlib.suppress(LeaseError):  # the interrupted release() did happen
            pool.release(item)
    held.clear()


def operations(pool: PoolProxy[Any], hosted: bool) -> dict[str, Callable[[], object]]:
    """Each operation of the proxies, as a loop body to interrupt. `held` is filled by C code
    (list.extend over map), so that an item acquired is recorded without a Python instruction
    in between, where the interruption would land in the test's frame rather than safepool's."""
    held: list[Any] = []

    def acquire_release() -> None:
        held.extend(map(pool.acquire, (SHORT,)))
        pool.release(held[-1])
        del held[-1]

    def lease() -> None:
        with pool.lease(SHORT):
            pass

    ops: dict[str, Callable[[], object]] = {
        "acquire+release": acquire_release,
        "lease": lease,
        "stats": pool.stats,
        "leases": pool.leases,
        "describe": pool.describe,
    }
    if hosted:

        def lease_call() -> None:
            with pool.lease(SHORT) as conn:
                assert conn.call(echo, "in-lease") == "in-lease"

        ops["call"] = lambda: pool.call(echo, "direct")
        ops["call slow"] = lambda: pool.call(pause, 2e-4)
        ops["lease+call"] = lease_call
    ops["_held"] = held  # type: ignore[assignment]
    return ops


def check_own_results(pool: PoolProxy[Any], hosted: bool, point: int) -> None:
    """Later calls return their own results, on this proxy and any other to the server."""
    marker = f"point-{point}"
    if hosted:
        assert pool.call(echo, marker) == marker
    description = pool.describe()
    assert description["share"] == ("hosted" if hosted else "value"), description
    assert pool.stats().max_size == description["max_size"]


def wait_consistent(pool: PoolProxy[Any]) -> None:
    """An aborted call's lease goes back as soon as the server reads the abort, which may come
    after this process's next call on another connection: allow it 1 s."""

    def settled() -> bool:
        stats = pool.stats()
        return stats.leased == 0 and stats.waiting == 0 and stats.pending == 0

    wait_until(settled, timeout=1.0, what="the interrupted call's lease back in the pool")


class Holder:
    """A thread that keeps taking the pool's only item for a moment, so the main thread's
    acquire waits and is handed the item (the interruption lands in waits and hand-offs)."""

    def __init__(self, pool: PoolProxy[Any], rng: random.Random) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.holds = [rng.uniform(0, 5e-4) for _ in range(64)]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                with self.pool.lease(SHORT):
                    time.sleep(self.holds[i % len(self.holds)])
                i += 1
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(SHORT)
        assert not self.thread.is_alive() and self.error is None, self.error


def sweep(pools: dict[str, PoolProxy[Any]], points: int, seed: str, out: Any) -> None:
    """Interrupt every proxy operation at swept delays, checking the invariants after each.

    ``pools``: "value", "hosted" (max_size 2) and "single" (hosted, max_size 1, for waits).
    Sends ("ok", {operation: count}) or ("error", text) on ``out``.
    """
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    interrupter: Interrupter | None = None
    point, name = -1, ""
    try:
        with Interrupter() as interrupter:
            for point in range(points):
                kind = rng.choice(("value", "hosted", "single"))
                pool = pools[kind]
                hosted = kind != "value"
                ops = operations(pool, hosted)
                held = ops.pop("_held")
                name = rng.choice(sorted(ops))
                holder = Holder(pool, rng) if kind == "single" else None
                try:
                    interrupter.run_until_interrupted(ops[name], rng.uniform(0, 4e-4), pick(rng))
                finally:
                    _release_all(pool, held)  # type: ignore[arg-type] # (the holder waits)
                    if holder is not None:
                        holder.join()
                counts[f"{kind} {name}"] = counts.get(f"{kind} {name}", 0) + 1
                check_own_results(pool, hosted, point)
                wait_consistent(pool)
                check_pool(pool)
        out.send(("ok", counts))
    except BaseException as exc:
        landed = interrupter.landed if interrupter is not None else ""
        out.send((
            "error",
            f"seed {seed}, point {point} ({name}; the interruption landed at {landed}): "
            f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
        ))  # fmt: skip


def lease_forever(pool: PoolProxy[Any], mode: str, ready: Any) -> None:
    """Until killed: lease and release in a loop (mode "lease"), or block in acquire (mode
    "wait", the pool being exhausted by the parent)."""
    ready.send(os.getpid())
    if mode == "wait":
        pool.acquire(timeout=float("inf"))
    while True:
        with pool.lease(SHORT) as item:
            if not isinstance(item, str):
                item.call(echo, 1)


def start_managers(out: Any) -> None:
    """Start a PoolManager and a plain stdlib BaseManager, send their server pids, then wait
    (to be SIGKILLed: neither is ever shut down)."""
    from multiprocessing.managers import BaseManager

    from safepool import PoolManager

    ours, theirs = PoolManager(), BaseManager()
    ours.start()
    theirs.start()
    out.send((ours._process.pid, theirs._process.pid))  # type: ignore[attr-defined]
    out.recv()


def manager_start_sweep(points: int, seed: str, out: Any) -> None:
    """For test_a_manager_start_cut_short_leaves_no_server: ``PoolManager.start()`` cut short at
    seeded random instants; after each, no server process may be left. Sends ("ok", how many
    landed) or ("error", what)."""
    import multiprocessing

    from safepool import PoolManager
    from safepool._stdlib import State

    rng = random.Random(f"{seed}:manager-start")
    made: list[Any] = []

    def start() -> None:
        manager = PoolManager()
        made.append(manager)
        manager.start()

    def servers_left() -> list[str]:
        return [p.name for p in multiprocessing.active_children() if "PoolManager" in p.name]

    point, landed = 0, ""
    try:
        with Interrupter() as interrupter:
            for point in range(points):
                interrupter.run_until_interrupted(start, rng.uniform(0, 0.03), pick(rng))
                landed = interrupter.landed
                for manager in made:
                    if manager._state.value == State.STARTED:
                        manager.shutdown()
                made.clear()
                wait_until(lambda: not servers_left(), SHORT, f"point {point}: no server left")
            out.send(("ok", interrupter.fired))
    except BaseException as exc:
        out.send(("error", f"seed {seed}, point {point} (landed at {landed}): {exc!r}"))
