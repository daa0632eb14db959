"""The pool's observer hook (what safepool.metrics builds on): every item made, every item
obtained and every lease ended is reported once, with its duration, outside the pool lock."""

from __future__ import annotations

import time

from helpers import SHORT, ThreadResult, wait_until
from safepool import SafeConnectionPool


class Recorder:
    def __init__(self, pool: SafeConnectionPool[object]) -> None:
        self.pool = pool
        self.events: list[tuple[str, str, float]] = []

    def _record(self, kind: str, name: str, seconds: float) -> None:
        assert not self.pool._lock.locked(), "called under the pool lock"
        self.events.append((kind, name, seconds))

    def created(self, pool: str, seconds: float) -> None:
        self._record("created", pool, seconds)

    def waited(self, pool: str, seconds: float) -> None:
        self._record("waited", pool, seconds)

    def used(self, pool: str, seconds: float) -> None:
        self._record("used", pool, seconds)


def slow_factory() -> object:
    time.sleep(0.02)
    return object()


def test_each_event_is_reported_once_with_its_duration() -> None:
    pool = SafeConnectionPool(factory=slow_factory, max_size=1, name="db")
    recorder = Recorder(pool)
    pool._observer = recorder
    item = pool.acquire()  # made: slow path
    time.sleep(0.02)
    pool.release(item)
    with pool.lease():  # fast path: no wait at all
        pass
    held = pool.acquire()
    waiter = ThreadResult(lambda: pool.acquire(timeout=SHORT))
    wait_until(lambda: pool.stats().waiting == 1)
    time.sleep(0.03)
    pool.release(held)
    pool.release(waiter.join())
    kinds = [kind for kind, _, _ in recorder.events]
    assert kinds[:6] == ["created", "waited", "used", "waited", "used", "waited"]
    assert sorted(kinds[6:]) == ["used", "used", "waited"]  # two threads: either order
    assert all(name == "db" for _, name, _ in recorder.events)
    created, first_wait, first_use = (s for _, _, s in recorder.events[:3])
    assert created >= 0.02 and first_wait >= 0.02 and first_use >= 0.02
    assert recorder.events[3][2] == 0.0  # an idle item, at once
    assert max(s for kind, _, s in recorder.events[6:] if kind == "waited") >= 0.03
