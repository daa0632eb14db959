"""ProcessLocal across processes: every child builds its own client on first use, never uses nor
closes nor frees what it inherited, and never hangs on a lock held at the time of the fork."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import pytest

import cache_targets
from cache_targets import FORKED, METHODS, Child, Item
from helpers import FORK_WARNING, LONG, SHORT, ThreadResult, wait_until
from safepool import FactoryError
from safepool.cache import ProcessLocal

pytestmark = pytest.mark.filterwarnings(FORK_WARNING)


@pytest.mark.parametrize("method", METHODS)
def test_each_child_builds_its_own_client_and_the_parents_is_untouched(method: str) -> None:
    cache = ProcessLocal(Item, name="items")
    item = cache.get()
    children = [Child(method, cache_targets.identity, cache) for _ in range(2)]
    results = [child.result() for child in children]
    for child, (pid, _, built_in) in zip(children, results, strict=True):
        assert pid == child.pid
        assert built_in == pid  # made in the child itself, not inherited from us
    assert cache.get() is item and item.closed_in is None


@pytest.mark.parametrize("method", METHODS)
def test_a_module_level_decorated_cache_is_per_process_too(method: str) -> None:
    parent_item = cache_targets.race_item()
    pid, _, built_in = Child(method, cache_targets.identity, cache_targets.race_item).result()
    assert built_in == pid != os.getpid()
    assert cache_targets.race_item() is parent_item


@pytest.mark.parametrize("method", FORKED)
def test_the_inherited_client_is_kept_alive_and_never_closed_in_the_child(method: str) -> None:
    cache = ProcessLocal(Item)
    parent_ref = weakref.ref(cache.get())  # the cache holds the only strong reference

    def child() -> tuple[bool, bool, int, int | None]:
        own = cache.get()
        closed = cache.clear()  # closes the child's own client only
        gc.collect()
        inherited = parent_ref()
        assert inherited is not None, "the inherited client was freed in the child"
        return own.pid == os.getpid(), cache.built, closed, inherited.closed_in

    assert run(method, child) == (True, False, 1, None)
    item = parent_ref()
    assert item is not None and item.closed_in is None and cache.get() is item


@pytest.mark.parametrize("method", FORKED)
def test_per_thread_clients_of_other_threads_survive_in_the_child(method: str) -> None:
    """CPython frees the other threads' thread-local data in a forked child (see the control
    below); the cache keeps those inherited clients alive and never closes them."""
    cache = ProcessLocal(Item, per_thread=True)
    refs, built, done = [], threading.Barrier(4), threading.Event()

    def hold() -> None:
        refs.append(weakref.ref(cache.get()))
        built.wait(LONG)
        done.wait(LONG)

    threads = [ThreadResult(hold) for _ in range(3)]
    built.wait(LONG)
    refs.append(weakref.ref(cache.get()))  # the forking thread's own client

    def child() -> tuple[int, bool, int, list[int | None]]:
        own = cache.get()
        closed = cache.clear()
        gc.collect()
        inherited = [ref() for ref in refs]
        alive = sum(item is not None for item in inherited)
        closed_in = [item.closed_in for item in inherited if item is not None]
        return alive, own.pid == os.getpid(), closed, closed_in

    try:
        alive, own, closed, closed_in = run(method, child)
        assert alive == 4, "an inherited per-thread client was freed in the child"
        assert own and closed == 1  # the child's own client, and only that, was closed
        assert closed_in == [None] * 4
    finally:
        done.set()
        for thread in threads:
            thread.join(SHORT)
    assert all(ref() is None or ref().closed_in == os.getpid() for ref in refs[:3])  # type: ignore[union-attr]


@pytest.mark.parametrize("method", FORKED)
def test_control_plain_thread_locals_of_other_threads_are_freed_in_the_child(method: str) -> None:
    """Without the cache's registry, the other threads' clients die in the child: whatever
    their finalisers do to the shared socket happens there."""
    local = threading.local()
    refs, built, done = [], threading.Barrier(4), threading.Event()

    def hold() -> None:
        local.item = Item()
        refs.append(weakref.ref(local.item))
        built.wait(LONG)
        done.wait(LONG)

    threads = [ThreadResult(hold) for _ in range(3)]
    built.wait(LONG)
    try:
        alive = run(method, lambda: (gc.collect(), sum(ref() is not None for ref in refs))[1])
        assert alive == 0
        assert all(ref() is not None for ref in refs)  # in this process they are all alive
    finally:
        done.set()
        for thread in threads:
            thread.join(SHORT)


@pytest.mark.parametrize("per_thread", [False, True])
@pytest.mark.parametrize("method", FORKED)
def test_fork_while_a_thread_is_inside_a_slow_factory_does_not_hang_the_child(
    method: str, per_thread: bool
) -> None:
    """A thread sits in the factory (holding the build lock) when the fork happens; in the
    child that thread does not exist, yet the child's get() returns at once with its own."""
    parent = os.getpid()
    entered, release = threading.Event(), threading.Event()

    def factory() -> Item:
        if os.getpid() == parent:
            entered.set()
            release.wait(LONG)  # blocks in the parent until the child has answered
        return Item()

    cache = ProcessLocal(factory, per_thread=per_thread)
    builder = ThreadResult(cache.get, name="builder")
    try:
        assert entered.wait(SHORT)
        started = time.monotonic()
        pid, _, built_in = Child(method, cache_targets.identity, cache).result(timeout=SHORT)
        assert built_in == pid != parent
        assert time.monotonic() - started < SHORT
    finally:
        release.set()
    item = builder.join(SHORT)
    assert item.pid == parent
    if per_thread:  # the builder thread has exited: its client is closed, here in the parent
        wait_until(lambda: item.closed_in == parent, what="the builder's client closed")
    else:
        assert item.closed_in is None and cache.get() is item


@pytest.mark.parametrize("method", METHODS)
def test_eight_threads_racing_in_a_child_build_once(method: str) -> None:
    cache = ProcessLocal(cache_targets.race_factory, name="race")
    cache.get()  # built in the parent first: a forked child inherits a warm cache
    assert Child(method, cache_targets.race, cache).result() == (1, 1, True)
    assert Child(method, cache_targets.race, cache_targets.race_item).result() == (1, 1, True)


@pytest.mark.parametrize("method", METHODS)
def test_per_thread_racing_threads_in_a_child_build_one_each(method: str) -> None:
    cache = ProcessLocal(cache_targets.race_factory, per_thread=True)
    cache.get()
    assert Child(method, cache_targets.race, cache).result() == (8, 8, True)


FINALISE_SCRIPT = """
import os, sys
from safepool.cache import ProcessLocal

class Client:
    def __init__(self):
        self.made_in = os.getpid()

    def __del__(self):
        if self.made_in != os.getpid():
            print("inherited client finalised in the child", flush=True)

cache = ProcessLocal(Client)
cache.get()
pid = os.fork()
if pid == 0:
    cache.get()
    sys.exit(0)  # a normal interpreter exit, unlike multiprocessing's os._exit()
os.waitpid(pid, 0)
"""


def test_a_raw_child_that_exits_normally_never_finalises_inherited_clients() -> None:
    result = subprocess.run(
        [sys.executable, "-c", FINALISE_SCRIPT],
        check=False,
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert result.returncode == 0, result.stderr
    assert "finalised" not in result.stdout


# -- after_fork ---------------------------------------------------------------------------------


def test_after_fork_can_adopt_the_inherited_client() -> None:
    seen: list[tuple[int, int]] = []

    def adopt(item: Item) -> Item:
        seen.append((os.getpid(), id(item)))
        return item

    cache = ProcessLocal(Item, after_fork=adopt)
    item = cache.get()

    def child() -> tuple[bool, bool, list[tuple[int, int]]]:
        assert not cache.built
        adopted = cache.get()
        assert cache.get() is adopted
        return adopted is item, item.closed_in is None, seen

    same, open_, calls = run("raw", child)
    assert same and open_
    assert len(calls) == 1 and calls[0][1] == id(item)
    assert seen == []  # never called in the parent


def test_after_fork_returning_none_builds_a_new_client() -> None:
    cache = ProcessLocal(Item, after_fork=lambda item: None)
    item = cache.get()
    assert run("raw", lambda: cache.get() is not item and cache.get().pid == os.getpid())


def test_after_fork_that_raises_fails_once_then_the_factory_builds() -> None:
    def broken(item: Item) -> Item:
        raise RuntimeError("cannot reuse")

    cache = ProcessLocal(Item, after_fork=broken, name="engine")
    item = cache.get()

    def child() -> tuple[str, bool]:
        try:
            cache.get()
        except FactoryError as exc:
            message = str(exc)
        fresh = cache.get()
        return message, fresh is not item and item.closed_in is None

    message, ok = run("raw", child)
    assert message.startswith("process-local 'engine': the after_fork hook raised RuntimeError")
    assert ok


def test_a_grandchild_gets_the_hook_too_and_each_generation_its_own_client() -> None:
    adopted: list[int] = []
    cache = ProcessLocal(Item, after_fork=lambda item: adopted.append(os.getpid()))
    item = cache.get()

    def child() -> tuple[int, int, bool]:
        # The child never calls get(): the grandchild still sees the original as inherited.
        grandchild = Child("raw", lambda: (os.getpid(), cache.get().pid, adopted))
        pid, built_in, hooked = grandchild.result()
        own = cache.get()
        return int(pid == built_in and hooked == [pid]), own.pid, item.closed_in is None

    ok, own_pid, untouched = run("raw", child)
    assert ok == 1 and own_pid != os.getpid() and untouched


# -- helpers ------------------------------------------------------------------------------------


def run(method: str, fn: Any) -> Any:
    """Run a closure in a child forked by ``method`` ("raw" or "fork": no pickling needed)."""
    return Child(method, fn).result()
