"""Waits that a signal handler raising anywhere cannot break (safepool._waiting), and the places
that use them: a Ctrl+C in ``AsyncResult.get()`` or ``imap``'s ``next()`` leaves the worker pool
working; nothing the waiter was interrupted in keeps a lock. The pool's own lock (a token in a
``queue.SimpleQueue``, safepool._poolstate.pool_lock) too: it excludes, and no exit, exception
or interruption while waiting for it leaves it held or gives it back twice.

The control shows what they replace: ``threading.Condition`` interrupted at swept points leaves
its lock held (the next ``with`` deadlocks) or releases it twice.
"""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Callable, Iterator

import pytest

from helpers import LONG, SHORT, seeded, sweep_size
from interrupts import INTERRUPTIONS, Interrupted, Interrupter
from safepool import WorkerSetup
from safepool._poolstate import PoolLock, pool_lock
from safepool._waiting import Beacon, Flag


def lock_is_free(lock: threading.Lock) -> bool:
    if not lock.acquire(timeout=SHORT):
        return False
    lock.release()
    return True


class Churn:
    """A thread that keeps notifying (``step()``) until stopped, counting its steps: a notifier
    that stops counting is stuck on a lock the interrupted waiter left behind."""

    def __init__(self, step: Callable[[], object]) -> None:
        self.steps = 0
        self._step = step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._step()
            self.steps += 1
            time.sleep(20e-6)

    def progressing(self) -> bool:
        before, deadline = self.steps, time.monotonic() + SHORT
        while time.monotonic() < deadline:
            if self.steps > before:
                return True
            time.sleep(1e-3)
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(LONG)


@pytest.fixture
def interrupter() -> Iterator[Interrupter]:
    with Interrupter() as started:
        yield started


def sweep(
    interrupter: Interrupter, name: str, operation: Callable[[], object], after: Callable[[], None]
) -> None:
    rng = seeded(name)
    for point in range(sweep_size(300, other_versions=100)):
        exc = rng.choice(INTERRUPTIONS)
        caught = interrupter.run_until_interrupted(operation, rng.uniform(0, 2e-4), exc)
        assert caught is exc, f"point {point}"
        after()


def test_beacon_wakes_waiters_and_times_out_never_early() -> None:
    beacon = Beacon()
    seen = beacon.sequence()
    start = time.monotonic()
    assert beacon.wait(seen, 0.05) is False
    assert time.monotonic() - start >= 0.05
    threading.Timer(0.02, beacon.bump).start()
    assert beacon.wait(seen, LONG) is True
    assert beacon.sequence() == seen + 1
    assert beacon.wait(seen, 0) is True  # changed already: no wait


def test_flag_is_an_event() -> None:
    flag = Flag()
    assert not flag.is_set() and flag.wait(0.01) is False
    threading.Timer(0.02, flag.set).start()
    assert flag.wait(None) is True and flag.is_set()
    flag.clear()
    assert not flag.is_set() and flag.wait(0) is False


def test_interrupted_beacon_waits_leave_no_lock_held(interrupter: Interrupter) -> None:
    beacon = Beacon()
    churn = Churn(beacon.bump)

    def after() -> None:
        assert lock_is_free(beacon._lock)
        assert churn.progressing(), "the notifier is stuck"

    try:
        sweep(interrupter, "beacon", lambda: beacon.wait(beacon.sequence(), 1e-4), after)
        assert len(beacon._waiters) <= 1  # interrupted waiters do not pile up
    finally:
        churn.stop()


def test_interrupted_flag_waits_leave_no_lock_held(interrupter: Interrupter) -> None:
    flag = Flag()
    churn = Churn(lambda: flag.clear() if flag.is_set() else flag.set())

    def after() -> None:
        assert lock_is_free(flag._lock)
        assert churn.progressing(), "the setter is stuck"

    try:
        sweep(interrupter, "flag", lambda: flag.wait(1e-4), after)
    finally:
        churn.stop()


def test_control_an_interrupted_condition_breaks(interrupter: Interrupter) -> None:
    """What Beacon replaces: interrupted at swept points, a ``threading.Condition`` is left
    locked or is released twice (RuntimeError instead of the interruption) at some of them."""
    cond = threading.Condition(threading.Lock())

    def operation() -> None:
        with cond:
            cond.wait(0)

    rng, broken = seeded("condition-control"), 0
    for _ in range(100):
        try:
            interrupter.run_until_interrupted(operation, rng.uniform(0, 2e-4), Interrupted)
        except RuntimeError:  # "release unlocked lock": the interruption was replaced
            broken += 1
        if cond._lock.locked():  # type: ignore[attr-defined]
            broken += 1
            cond._lock.release()  # type: ignore[attr-defined]
    assert broken > 0


def tokens(lock: PoolLock) -> int:
    """How many tokens the lock's queue holds: 1 when free, 0 when held, never more."""
    queue = type(lock).__enter__.__self__  # the SimpleQueue whose bound get() is __enter__
    return int(queue.qsize())


class Falsy(Exception):
    def __bool__(self) -> bool:  # __exit__ is put(item, block, timeout): block is tested
        return False


def test_the_pool_lock_is_c_code_and_excludes() -> None:
    lock = pool_lock()
    for name in ("__enter__", "__exit__", "locked"):  # no Python frame: no signal check point
        assert isinstance(getattr(type(lock), name), types.BuiltinMethodType), name
    counter = [0]

    def add(times: int) -> None:
        for _ in range(times):
            with lock:
                seen = counter[0]
                time.sleep(0)  # hands the GIL to another thread while the lock is held
                counter[0] = seen + 1

    threads = [threading.Thread(target=add, args=(300,), daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LONG)
    assert not any(thread.is_alive() for thread in threads), "a thread is stuck on the lock"
    assert counter[0] == 1200  # no update lost: one holder at a time
    assert not lock.locked() and tokens(lock) == 1


@pytest.mark.parametrize("exc", [KeyError, Falsy, KeyboardInterrupt, SystemExit])
def test_the_pool_lock_comes_back_once_however_its_block_ends(exc: type[BaseException]) -> None:
    lock = pool_lock()

    def end_inside() -> None:
        with lock:
            assert lock.locked() and tokens(lock) == 0
            raise exc("inside")

    with pytest.raises(exc):
        end_inside()
    assert not lock.locked() and tokens(lock) == 1
    with lock:  # usable again, by this thread and by another
        pass
    other = threading.Thread(target=lambda: lock.__enter__() and None, daemon=True)
    other.start()
    other.join(LONG)
    assert not other.is_alive(), "the other thread could not take the lock"
    assert lock.locked() and tokens(lock) == 0  # the other thread took it and still holds it
    lock.__exit__(None, None, None)
    assert tokens(lock) == 1


def test_interrupted_pool_lock_waits_take_nothing(interrupter: Interrupter) -> None:
    """The main thread takes the lock at swept moments while another thread keeps taking and
    holding it: an interruption while waiting for it, while holding it or while giving it back
    never leaves it held (the other thread stops progressing) or adds a second token."""
    lock = pool_lock()

    def hold() -> None:
        with lock:
            time.sleep(20e-6)

    churn = Churn(hold)

    def after() -> None:
        assert tokens(lock) <= 1, "the lock was given back twice"
        assert churn.progressing(), "the other thread is stuck: the lock was left held"

    def operation() -> None:
        with lock:
            pass

    try:
        sweep(interrupter, "pool-lock", operation, after)
    finally:
        churn.stop()
    assert not lock.locked() and tokens(lock) == 1


def square(x: int) -> int:
    return x * x


@pytest.mark.slow
def test_ctrl_c_in_get_and_next_leaves_the_worker_pool_working(interrupter: Interrupter) -> None:
    """KeyboardInterrupt (and other raising handlers) at swept points of ``get()`` and of an
    ``imap`` iterator's ``next()`` while results arrive; afterwards the same pool still returns
    every result right (its manager thread never blocked on a lock the caller left held)."""
    rng = seeded("workerpool-get")
    with WorkerSetup().Pool(2) as pool:

        def get() -> None:
            pool.map_async(square, range(50), chunksize=1).get(LONG)

        def iterate() -> None:
            for _ in pool.imap_unordered(square, range(50), chunksize=1):
                pass

        for point in range(sweep_size(60, other_versions=20)):
            operation = rng.choice((get, iterate))
            exc = rng.choice(INTERRUPTIONS)
            assert interrupter.run_until_interrupted(operation, rng.uniform(0, 5e-3), exc) is exc
            assert pool.map(square, range(20), chunksize=3) == [x * x for x in range(20)], point
        pool.close()
        pool.join(LONG)
