"""ProcessLocal in one process: building once, per-thread clients, clear(), validation, pickling."""

from __future__ import annotations

import functools
import gc
import logging
import pickle
import re
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import cache_targets
from cache_targets import Item
from helpers import LONG, SHORT, ThreadResult, run_threads, wait_until
from safepool import FactoryError
from safepool.cache import ProcessLocal, per_process


def counting(calls: list[int]) -> Any:
    def factory() -> Item:
        calls.append(1)
        return Item()

    return factory


# -- building -----------------------------------------------------------------------------------


def test_get_builds_on_first_use_and_returns_the_same_client() -> None:
    calls: list[int] = []
    cache = ProcessLocal(counting(calls))
    assert not cache.built and calls == []
    item = cache.get()
    assert cache.built
    assert cache.get() is item
    assert cache() is item  # __call__ is get
    assert len(calls) == 1


def test_eight_racing_threads_build_the_client_exactly_once() -> None:
    cache = ProcessLocal(cache_targets.race_factory)
    calls, distinct, own = cache_targets.race(cache, threads=8)
    assert (calls, distinct, own) == (1, 1, True)


def test_a_factory_that_raises_is_wrapped_and_nothing_is_cached() -> None:
    attempts: list[int] = []

    def flaky() -> Item:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionRefusedError("server not up yet")
        return Item()

    cache = ProcessLocal(flaky, name="flaky")
    with pytest.raises(FactoryError, match="process-local 'flaky': the factory raised Connection"):
        cache.get()
    assert not cache.built
    assert isinstance(cache.get(), Item)  # tried again, and the lock was released
    assert len(attempts) == 2


def test_a_factory_error_chains_the_original() -> None:
    def broken() -> Item:
        raise ValueError("bad dsn")

    with pytest.raises(FactoryError) as info:
        ProcessLocal(broken).get()
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("per_thread", [False, True])
def test_base_exceptions_from_the_factory_pass_through_and_cache_nothing(per_thread: bool) -> None:
    calls: list[int] = []

    def factory() -> Item:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return Item()

    cache = ProcessLocal(factory, per_thread=per_thread)
    with pytest.raises(KeyboardInterrupt):
        cache.get()
    assert not cache.built
    assert isinstance(cache.get(), Item)


@pytest.mark.parametrize("per_thread", [False, True])
def test_get_inside_its_own_factory_is_an_error_not_a_deadlock(per_thread: bool) -> None:
    cache: ProcessLocal[Any]

    def factory() -> Item:
        cache.get()
        return Item()

    def call() -> BaseException | None:
        try:
            cache.get()
        except FactoryError as exc:
            return exc.__cause__
        return None

    cache = ProcessLocal(factory, per_thread=per_thread, name="selfish")
    cause = ThreadResult(call).join(SHORT)  # a deadlock would time out here
    assert isinstance(cause, RuntimeError)
    assert "get() was called from inside its own factory" in str(cause)


def test_a_slow_factory_blocks_only_callers_of_the_same_cache() -> None:
    release = threading.Event()

    def slow() -> Item:
        release.wait(LONG)
        return Item()

    slow_cache = ProcessLocal(slow)
    other = ProcessLocal(Item)
    waiter = ThreadResult(slow_cache.get)
    wait_until(slow_cache._lock.locked, what="the slow factory started")
    assert isinstance(other.get(), Item)  # not held up
    assert not slow_cache.built
    release.set()
    assert waiter.join(SHORT) is slow_cache.get()


# -- per-thread clients -------------------------------------------------------------------------


def test_per_thread_gives_each_thread_its_own_client() -> None:
    calls: list[int] = []
    cache = ProcessLocal(counting(calls), per_thread=True)
    main = cache.get()
    hold = threading.Barrier(4)

    def work(_: int) -> int:
        item = cache.get()
        assert cache.get() is item and cache.built
        hold.wait(LONG)  # all four alive at once: no thread reuses another's client
        return id(item)

    ids = run_threads(4, work)
    assert len(set(ids)) == 4 and id(main) not in ids
    assert cache.get() is main
    assert len(calls) == 5


def test_a_threads_client_is_closed_when_the_thread_exits() -> None:
    cache = ProcessLocal(Item, per_thread=True)
    item = ThreadResult(cache.get).join(SHORT)
    wait_until(lambda: item.closed_in is not None, what="the exited thread's client closed")
    assert "clients=0" in repr(cache)


def test_clear_closes_every_threads_client_once_and_threads_rebuild(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = ProcessLocal(Item, per_thread=True)
    built = threading.Barrier(3)
    cleared = threading.Event()

    def work() -> tuple[Item, Item]:
        first = cache.get()
        built.wait(LONG)
        cleared.wait(LONG)
        return first, cache.get()

    workers = [ThreadResult(work) for _ in range(2)]
    built.wait(LONG)
    main = cache.get()
    assert cache.clear() == 3
    assert main.closed_in is not None and not cache.built
    with caplog.at_level(logging.WARNING, logger="safepool"):
        cleared.set()
        for worker in workers:
            first, second = worker.join(SHORT)
            assert first.closed_in is not None
            assert second is not first
            # The rebuilt client is closed as its thread exits.
            wait_until(lambda s=second: s.closed_in is not None, what="rebuilt client closed")
        gc.collect()
        assert cache.get() is not main
    # Cleared clients are not closed again at thread exit (Item.close raises on a second close,
    # and _close_quietly would log it).
    assert caplog.text == ""


def test_clear_closes_with_the_close_hook_and_logs_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[Item] = []

    def close(item: Item) -> None:
        closed.append(item)
        raise OSError("socket already gone")

    cache = ProcessLocal(Item, close=close, name="noisy")
    item = cache.get()
    with caplog.at_level(logging.WARNING, logger="safepool"):
        assert cache.clear() == 0  # attempted, failed, logged: not raised
    assert closed == [item]
    assert "process-local 'noisy': closing a Item failed: OSError" in caplog.text
    assert cache.get() is not item


def test_clear_uses_close_if_present_and_tolerates_clients_without_it() -> None:
    cache = ProcessLocal(Item)
    item = cache.get()
    assert cache.clear() == 1 and item.closed_in is not None
    assert cache.clear() == 0
    plain = ProcessLocal(object)
    plain.get()
    assert plain.clear() == 1


def test_per_thread_sqlite3_connections_are_usable_in_their_thread(tmp_path: Path) -> None:
    """The sqlite3 recipe: check_same_thread stays on, each thread has its own connection."""
    path = str(tmp_path / "db.sqlite")
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, who TEXT)")
    setup.close()
    cache = ProcessLocal(functools.partial(sqlite3.connect, path, timeout=LONG), per_thread=True)
    _, _, distinct = cache_targets.sqlite_child(cache, threads=4)
    assert distinct == 4
    conn = cache.get()
    assert conn.execute("SELECT count(*) FROM rows").fetchone() == (4,)
    cache.clear()


# -- validation ---------------------------------------------------------------------------------


def needs_args(host: str, port: int = 5432) -> object:
    return object()


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "message"),
    [
        (("postgresql://u:s3cret@db/app",), {}, TypeError, "factory must be callable, got a str"),
        ((needs_args,), {}, TypeError, "factory must be callable with no arguments, but "
         "needs_args requires 'host'; bind them first, e.g. functools.partial"),
        ((Item,), {"per_thread": 1}, TypeError, "per_thread must be a bool, got int 1"),
        ((Item,), {"close": "close"}, TypeError, "close must be callable, got a str object"),
        ((Item,), {"after_fork": 3}, TypeError, "after_fork must be callable, got a int object"),
        ((Item,), {"after_fork": print, "per_thread": True}, ValueError,
         "after_fork cannot be combined with per_thread=True"),
        ((Item,), {"name": ""}, TypeError, "name must be a non-empty str"),
        ((Item,), {"name": 7}, TypeError, "name must be a non-empty str, got int 7"),
    ],
)  # fmt: skip
def test_bad_configuration_is_rejected_at_construction(
    args: tuple[Any, ...], kwargs: dict[str, Any], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=re.escape(message)) as info:
        ProcessLocal(*args, **kwargs)
    assert "s3cret" not in str(info.value)


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        ProcessLocal(Item, True)  # type: ignore[misc]


def test_repr_names_the_cache_never_the_factory_arguments() -> None:
    cache = ProcessLocal(functools.partial(needs_args, "user:s3cret@db"))
    assert "s3cret" not in repr(cache)
    assert re.fullmatch(r"<ProcessLocal 'process-local-\d+' empty pid=\d+>", repr(cache))
    cache.get()
    assert " built " in repr(cache)
    assert ProcessLocal(Item).name == "Item"
    assert ProcessLocal(Item, name="sessions").name == "sessions"


# -- the decorator ------------------------------------------------------------------------------


def test_per_process_bare_keeps_the_functions_metadata() -> None:
    @per_process
    def session() -> Item:
        """This process's session."""
        return Item()

    assert isinstance(session, ProcessLocal)
    assert session.__name__ == "session"
    assert session.__doc__ == "This process's session."
    assert session.__module__ == __name__
    assert session.__wrapped__.__name__ == "session"  # type: ignore[attr-defined]
    assert session.name.endswith("session")
    item = session()
    assert session() is item and session.get() is item
    assert session.clear() == 1 and item.closed_in is not None


def test_per_process_with_options() -> None:
    closed: list[Item] = []

    @per_process(per_thread=True, close=closed.append, name="conns")
    def conn() -> Item:
        return Item()

    assert conn.per_thread and conn.name == "conns"
    other = ThreadResult(conn).join(SHORT)
    assert conn() is not other
    wait_until(lambda: closed == [other], what="the exited thread's client closed")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: per_process(True), "per_process takes the function to decorate, got a bool "
         "object; pass options by keyword, e.g. @per_process(per_thread=True)"),
        (lambda: per_process(per_thread="yes"), "per_thread must be a bool, got str 'yes'"),
        (lambda: per_process(close=1), "close must be callable, got a int object"),
        (lambda: per_process(needs_args), "factory must be callable with no arguments"),
    ],
)  # fmt: skip
def test_per_process_rejects_bad_use_at_once(call: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        call()


# -- pickling (how a cache reaches a spawn or forkserver child) -------------------------------


def test_pickling_sends_the_recipe_never_the_client() -> None:
    cache = ProcessLocal(Item, per_thread=True, close=Item.close, name="items")
    cache.get()
    copy = pickle.loads(pickle.dumps(cache))
    assert copy is not cache and not copy.built
    assert (copy.name, copy.per_thread) == ("items", True)
    assert copy.get() is not cache.get()


def test_a_module_level_decorated_cache_pickles_by_reference() -> None:
    assert pickle.loads(pickle.dumps(cache_targets.race_item)) is cache_targets.race_item

    @per_process
    def local_one() -> Item:
        return Item()

    copy = pickle.loads(pickle.dumps(ProcessLocal(Item)))  # not reachable by name: a recipe
    assert isinstance(copy, ProcessLocal)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local_one)  # a local function's factory cannot be pickled at all
